"""ATTENTION_WEIGHT_CAPTURE on the tiny model: exact logits, layer meaning, selection, no side effects."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import wan.modules.causal_model as causal_model
from pipeline.causal_inference import CausalInferencePipeline
from pipeline.wrappers import WanDiffusionWrapper
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE

NUM_FRAMES = 6  # 2 blocks of 3


class FixedTextEncoder(nn.Module):
    def __init__(self, text_len, text_dim):
        super().__init__()
        self.embeds = nn.Buffer(torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, text_prompts):
        return {"prompt_embeds": self.embeds.expand(len(text_prompts), -1, -1)}


@pytest.fixture(scope="module")
def config():
    return OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load("configs/tiny.yaml"))


@pytest.fixture(scope="module")
def pipeline(config):
    generator = WanDiffusionWrapper.from_config(config)
    sizes = config.model_config
    return CausalInferencePipeline(config, "cpu", generator=generator, text_encoder=FixedTextEncoder(sizes.text_len, sizes.text_dim))


@pytest.fixture(autouse=True)
def capture_off():
    yield
    ATTENTION_WEIGHT_CAPTURE.disable()


def noise(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, NUM_FRAMES, config.model_config.in_dim, config.height // 8, config.width // 8, generator=generator)


def run(pipeline, config, seed=0):
    torch.manual_seed(seed)
    return pipeline.inference(noise(config, seed), ["a prompt"], return_latents=True)


@pytest.fixture
def recorded_calls(monkeypatch, pipeline):
    """Every attention call with its inputs, output and the transformer block it came from (told by
    module hooks on each block's self-attention, independently of the capture's counter)."""
    calls, current_block = [], [None]
    handles = [
        block.self_attn.register_forward_pre_hook(lambda module, args, i=i: current_block.__setitem__(0, i))
        for i, block in enumerate(pipeline.generator.model.blocks)
    ]
    real_attention = causal_model.attention

    def spy(q, k, v, layer_idx=None, kv_cache=None):
        out = real_attention(q, k, v, layer_idx=layer_idx, kv_cache=kv_cache)
        if layer_idx is not None:
            calls.append(dict(block=current_block[0], q=q.clone(), k=k.clone(), v=v.clone(), out=out.clone()))
        return out

    monkeypatch.setattr(causal_model, "attention", spy)
    yield calls
    for handle in handles:
        handle.remove()


def test_logits_are_exact_and_belong_to_the_requested_block(pipeline, config, recorded_calls):
    layers = [1, 4]
    ATTENTION_WEIGHT_CAPTURE.enable(layers, capture_logits=True, num_layers=None, keep="all")
    run(pipeline, config)
    captured = ATTENTION_WEIGHT_CAPTURE.captured_weights
    assert len(captured) == len(layers) * 2 * 5
    text_len = config.model_config.text_len
    for entry in captured:
        call = recorded_calls[entry["call_idx"]]
        assert call["block"] == entry["layer_idx"] in layers
        assert entry["k_shape"][1] != text_len and entry["k_shape"] == call["k"].shape
        q, k, v = call["q"], call["k"], call["v"]
        expected = torch.einsum("bqnd,bknd->bnqk", q.double(), k.double()) / q.shape[-1] ** 0.5
        torch.testing.assert_close(entry["attn_weights"].double(), expected, rtol=0, atol=1e-5)
        out = torch.einsum("bnqk,bknd->bqnd", entry["attn_weights"].softmax(-1), v)
        torch.testing.assert_close(out, call["out"], rtol=1e-5, atol=1e-5)


def test_probabilities_are_softmax_over_all_keys(pipeline, config, recorded_calls):
    ATTENTION_WEIGHT_CAPTURE.enable([2], capture_logits=False, keep="all")
    run(pipeline, config)
    for entry in ATTENTION_WEIGHT_CAPTURE.captured_weights:
        call = recorded_calls[entry["call_idx"]]
        assert entry["is_logits"] is False
        logits = torch.einsum("bqnd,bknd->bnqk", call["q"], call["k"]) / call["q"].shape[-1] ** 0.5
        torch.testing.assert_close(entry["attn_weights"], logits.softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_pass, step, timestep", [(0, 0, 1000.0), (2, 2, 833.33), (4, "cache", 0.0)])
def test_largest_k_keeps_one_pass_of_the_last_block(pipeline, config, keep_pass, step, timestep):
    ATTENTION_WEIGHT_CAPTURE.enable([0, 4], num_layers=6, keep="largest_k", keep_pass=keep_pass)
    run(pipeline, config)
    assert ATTENTION_WEIGHT_CAPTURE.calls_seen == 2 * 10  # 2 blocks x 5 passes per layer
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [r.layer_idx for r in kept] == [0, 4]
    for record in kept:
        assert record.labels["block"] == 1 and record.labels["step"] == step
        assert record.labels["timestep"] == pytest.approx(timestep, abs=0.01)
        assert record.k_shape[1] == NUM_FRAMES * 16 and record.q_shape[1] == 3 * 16
        # The call number says which forward it came from: 6 layers a forward, 5 forwards a block.
        assert record.call_idx == (5 + keep_pass) * 6 + record.layer_idx


def test_largest_k_equals_stable_sort_over_all_captures(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.enable([3], keep="all")
    run(pipeline, config)
    everything = list(ATTENTION_WEIGHT_CAPTURE.captured_weights)
    expected = sorted(everything, key=lambda e: e["k_shape"][1], reverse=True)[0]
    ATTENTION_WEIGHT_CAPTURE.enable([3], keep="largest_k")
    run(pipeline, config)
    (kept,) = ATTENTION_WEIGHT_CAPTURE.captured_weights
    assert kept["call_idx"] == expected["call_idx"]
    torch.testing.assert_close(kept["attn_weights"], expected["attn_weights"], rtol=0, atol=0)


def test_capture_leaves_latents_bit_identical(pipeline, config):
    plain = run(pipeline, config, seed=3)
    for keep in ("all", "largest_k"):
        ATTENTION_WEIGHT_CAPTURE.enable(None if keep == "all" else [0, 5], keep=keep)
        captured = run(pipeline, config, seed=3)
        ATTENTION_WEIGHT_CAPTURE.disable()
        assert torch.equal(plain, captured)


def test_off_means_no_bookkeeping(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.disable()
    run(pipeline, config)
    assert ATTENTION_WEIGHT_CAPTURE.current_layer_idx == 0
    assert ATTENTION_WEIGHT_CAPTURE.captured_weights == []


def test_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match="6 layers"):
        ATTENTION_WEIGHT_CAPTURE.enable([0, 6], num_layers=6)
    with pytest.raises(ValueError, match="keep"):
        ATTENTION_WEIGHT_CAPTURE.enable([0], keep="some")


def test_summary_and_host_copy_match_direct_computation(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.enable([1], keep="largest_k")
    run(pipeline, config)
    (record,) = ATTENTION_WEIGHT_CAPTURE.kept_calls
    fsl = 16
    logits = torch.einsum("bqnd,bknd->bnqk", record.q.double(), record.k.double()) / record.q.shape[-1] ** 0.5
    B, N, Q, K = logits.shape
    summary = record.summary(fsl)
    torch.testing.assert_close(summary["query_mean_logits"].double(), logits.mean(2), rtol=0, atol=1e-5)
    frame_mean = torch.zeros(B, N, Q // fsl, K // fsl, dtype=torch.float64)
    frame_mass = torch.zeros_like(frame_mean)
    probs = logits.softmax(-1)
    for i in range(Q // fsl):
        for j in range(K // fsl):
            tile = (slice(None), slice(None), slice(i * fsl, (i + 1) * fsl), slice(j * fsl, (j + 1) * fsl))
            frame_mean[:, :, i, j] = logits[tile].mean((-2, -1))
            frame_mass[:, :, i, j] = probs[tile].sum(-1).mean(-1)
    torch.testing.assert_close(summary["frame_mean_logits"].double(), frame_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(summary["frame_attention_mass"].double(), frame_mass, rtol=0, atol=1e-6)
    torch.testing.assert_close(summary["frame_attention_mass"].sum(-1), torch.ones(B, N, Q // fsl))
    torch.testing.assert_close(summary["logit_max"].double(), logits.amax((2, 3)), rtol=0, atol=1e-5)
    host = record.to_host(torch.float16, frame_seq_length=fsl)
    assert host.dtype == torch.float16 and host.shape == (B, N, Q, K)
    torch.testing.assert_close(host, logits.half(), rtol=0, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# The kept call is chosen by the pipeline's pass labels and the module's layer index


def windowed_pipeline(config, window, sink):
    cfg = OmegaConf.merge(config, {"model_kwargs": {"local_attn_size": window, "sink_size": sink}})
    generator = WanDiffusionWrapper.from_config(cfg)
    sizes = cfg.model_config
    return CausalInferencePipeline(cfg, "cpu", generator=generator, text_encoder=FixedTextEncoder(sizes.text_len, sizes.text_dim))


def run_frames(pipeline, config, frames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, config.model_config.in_dim, config.height // 8, config.width // 8, generator=generator)
    torch.manual_seed(seed)
    return pipeline.inference(x, ["a prompt"], return_latents=True)


@pytest.mark.parametrize("window,sink,frames", [(3, 0, 12), (3, 1, 12), (5, 0, 12), (5, 1, 15), (6, 1, 12), (6, 0, 21), (9, 1, 21)])
@pytest.mark.parametrize("step", [0, "cache"])
def test_pass_capture_keeps_the_last_block_under_windows(config, window, sink, frames, step):
    pipeline = windowed_pipeline(config, window, sink)
    per_block, num_blocks = 3, frames // 3
    ATTENTION_WEIGHT_CAPTURE.enable([1, 4], keep="all")
    run_frames(pipeline, config, frames)
    expected = {
        e["layer_idx"]: e for e in ATTENTION_WEIGHT_CAPTURE.captured_weights if e["block"] == num_blocks - 1 and e["step"] == step
    }
    assert sorted(expected) == [1, 4]
    ATTENTION_WEIGHT_CAPTURE.enable([4, 1], keep="pass", passes=[step])
    run_frames(pipeline, config, frames)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [r.layer_idx for r in kept] == [4, 1]  # the order the layers were asked in
    for record in kept:
        reference = expected[record.layer_idx]
        assert record.labels["block"] == num_blocks - 1 and record.labels["step"] == step
        # The cache holds the sink frames (unless the window is too small to keep them) and the newest
        # frames up to the query block; the frames it reports are those of the keys.
        newest = list(range(frames - min(window, frames), frames))
        assert record.key_frames == reference["key_frames"]
        assert sorted(record.key_frames) == (newest if window < per_block + sink or newest[0] < sink
                                             else list(range(sink)) + newest[sink:])
        heads = record.num_heads
        logits = torch.stack([record.weights(h) for h in range(heads)], dim=1)
        torch.testing.assert_close(logits, reference["attn_weights"], rtol=0, atol=0)


def test_largest_k_is_not_the_last_block_under_a_window(config):
    """The spec's rule keeps the first call with the largest key length: with a 6-frame window every
    block from block 1 on has it, so the rule keeps block 1, not the last block."""
    pipeline = windowed_pipeline(config, 6, 0)
    ATTENTION_WEIGHT_CAPTURE.enable([0], keep="largest_k")
    run_frames(pipeline, config, 12)
    assert [r.labels["block"] for r in ATTENTION_WEIGHT_CAPTURE.kept_calls] == [1]
    ATTENTION_WEIGHT_CAPTURE.enable([0], keep="pass")
    run_frames(pipeline, config, 12)
    assert [r.labels["block"] for r in ATTENTION_WEIGHT_CAPTURE.kept_calls] == [3]


def test_a_second_model_in_the_process_does_not_shift_layers(pipeline, config):
    """Calls of another model (here 4 layers, outside any labelled pass) before and during capture
    neither change which calls are kept nor their layers."""
    ATTENTION_WEIGHT_CAPTURE.enable([0, 5], keep="pass", passes=[1])
    run(pipeline, config)
    reference = {r.layer_idx: r for r in ATTENTION_WEIGHT_CAPTURE.kept_calls}
    other_cfg = OmegaConf.merge(config, {"model_config": {"num_layers": 4}, "init_seed": 5})
    other = WanDiffusionWrapper.from_config(other_cfg).model
    x = torch.randn(1, config.model_config.in_dim, 3, config.height // 8, config.width // 8)
    context = torch.randn(1, config.model_config.text_len, config.model_config.text_dim)
    ATTENTION_WEIGHT_CAPTURE.enable([0, 5], keep="pass", passes=[1])
    with torch.no_grad():
        other(x, torch.full((1, 3), 500.0), context)
        run(pipeline, config)
        other(x, torch.full((1, 3), 500.0), context)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [r.layer_idx for r in kept] == [0, 5]
    for record in kept:
        assert record.labels == reference[record.layer_idx].labels
        torch.testing.assert_close(record.k, reference[record.layer_idx].k, rtol=0, atol=0)
        torch.testing.assert_close(record.q, reference[record.layer_idx].q, rtol=0, atol=0)


def test_every_pass_and_block_can_be_kept(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.enable([2], keep="pass", passes=["cache", 0, 1, 2, 3], blocks=[0, "last"])
    run(pipeline, config)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [(r.labels["block"], r.labels["step"]) for r in kept] == [(b, s) for b in (0, 1) for s in (0, 1, 2, 3, "cache")]
    assert [r.key_frames for r in kept] == [[0, 1, 2]] * 5 + [list(range(6))] * 5
    assert ATTENTION_WEIGHT_CAPTURE.calls_seen == 10


def test_num_layers_is_checked_against_the_model(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.enable([0], num_layers=30)
    with pytest.raises(ValueError, match="30.*6 layers"):
        run(pipeline, config)
