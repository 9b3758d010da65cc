"""ATTENTION_WEIGHT_CAPTURE on the tiny model: exact logits, layer meaning, selection, no side effects."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import wan.modules.causal_model as causal_model
from pipeline.causal_inference import CausalInferencePipeline
from utils.wan_wrapper import WanDiffusionWrapper
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

    def spy(q, k, v, self_attention=False):
        out = real_attention(q, k, v, self_attention=self_attention)
        if self_attention:
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
