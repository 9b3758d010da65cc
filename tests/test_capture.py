"""ATTENTION_WEIGHT_CAPTURE on the tiny model: exact logits, layer meaning, selection, no side effects.

Independent references written here: a spy on ``attention`` (every self-attention call's q, k, v and
output, and the transformer block module it ran in, told by module hooks); an observer in front of the
capture (``Tee``) that copies each call's q, k, pass labels and key positions at the time of the call;
float64 einsums of the logits.
"""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import wan.modules.causal_model as causal_model
from pipeline.causal_inference import CausalInferencePipeline
from pipeline.wrappers import WanDiffusionWrapper
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE

NUM_FRAMES = 6  # 2 blocks of 3
ALL_PASSES = [0, 1, 2, 3, "cache"]  # the 4 denoising passes and the cache pass of tiny.yaml's schedule


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
def record_calls(monkeypatch, request):
    """``start(model)``: from then on every self-attention call of ``model`` is recorded with its
    inputs, its output and the transformer block it came from (told by module hooks on each block's
    self-attention, independently of the layer index the model hands its observer); returns the list
    the calls go to. (``attention`` is self-attention only: cross-attention calls ``sdpa`` itself.)"""

    def start(model):
        calls, current_block = [], [None]
        handles = [
            block.self_attn.register_forward_pre_hook(lambda module, args, i=i: current_block.__setitem__(0, i))
            for i, block in enumerate(model.blocks)
        ]
        request.addfinalizer(lambda: [handle.remove() for handle in handles])
        real_attention = causal_model.attention

        def spy(q, k, v, kernel=None):
            out = real_attention(q, k, v) if kernel is None else real_attention(q, k, v, kernel=kernel)
            calls.append(dict(block=current_block[0], q=q.clone(), k=k.clone(), v=v.clone(), out=out.clone()))
            return out

        monkeypatch.setattr(causal_model, "attention", spy)
        return calls

    return start


@pytest.fixture
def recorded_calls(record_calls, pipeline):
    return record_calls(pipeline.generator.model)


class Tee:
    """A test observer in front of another (by default the capture): hands it every call and label
    unchanged and records, at the time of each self-attention call, the layer index, the pass labels
    the pipeline gave, copies of q and k, and what the cache then reported of its keys (key frames and
    key positions, copied). ``calls`` holds every call, whether or not the capture keeps it."""

    def __init__(self, inner=ATTENTION_WEIGHT_CAPTURE):
        self.inner = inner
        self.labels = None
        self.calls = []

    @property
    def enabled(self):
        return self.inner.enabled

    def begin_forward(self, num_layers):
        self.inner.begin_forward(num_layers)

    def wants(self, block, num_blocks, step):
        return self.inner.wants(block, num_blocks, step)

    def annotate(self, **labels):
        self.labels = dict(labels) or None
        self.inner.annotate(**labels)

    def observe(self, layer_idx, q, k, kv_cache=None):
        positions = None if kv_cache is None else tuple(p.clone() for p in kv_cache.key_positions())
        self.calls.append(dict(layer=layer_idx, labels=self.labels, q=q.clone(), k=k.clone(), key_positions=positions,
                               key_frames=None if kv_cache is None else list(kv_cache.key_frames())))
        self.inner.observe(layer_idx, q, k, kv_cache)

    def call(self, layer, block, step):
        """The one recorded call of ``layer`` in the forward labelled (block, step)."""
        (found,) = [c for c in self.calls if c["layer"] == layer and c["labels"] is not None
                    and (c["labels"]["block"], c["labels"]["step"]) == (block, step)]
        return found


def teed(pipeline):
    """Put a ``Tee`` in front of the capture as ``pipeline``'s model's observer; ``untee`` puts the
    capture back."""
    tee = Tee()
    pipeline.generator.model.set_observer(tee)
    return tee


def untee(pipeline):
    pipeline.generator.model.set_observer(ATTENTION_WEIGHT_CAPTURE)


def dense_logits(q, k):
    """Every head's logits of q [B, Lq, N, D] and k [B, Lk, N, D], written out in float64: [B, N, Lq, Lk]."""
    return torch.einsum("bqnd,bknd->bnqk", q.double(), k.double()) / q.shape[-1] ** 0.5


def all_heads(record, logits=True):
    """A kept call's ``weights`` of every head, stacked: fp32 [B, N, Lq, Lk]."""
    return torch.stack([record.weights(head, logits=logits) for head in range(record.num_heads)], dim=1)


def test_logits_are_exact_and_belong_to_the_requested_block(pipeline, config, recorded_calls):
    layers = [1, 4]
    ATTENTION_WEIGHT_CAPTURE.enable(layers, num_layers=None, passes=ALL_PASSES, blocks=[0, 1])
    run(pipeline, config)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert len(kept) == len(layers) * 2 * 5
    assert len(recorded_calls) == 6 * 2 * 5  # the last block's cache pass runs: it is kept
    text_len = config.model_config.text_len
    for record in kept:
        call = recorded_calls[record.call_idx]
        assert call["block"] == record.layer_idx in layers
        # The call number says which forward it came from: 6 layers a forward, 5 forwards a block.
        forward, layer = divmod(record.call_idx, 6)
        assert layer == record.layer_idx
        assert (record.labels["block"], record.labels["step"]) == (forward // 5, ALL_PASSES[forward % 5])
        assert record.k_shape[1] != text_len and record.k_shape == call["k"].shape and record.q_shape == call["q"].shape
        q, k, v = call["q"], call["k"], call["v"]
        logits = all_heads(record)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits.double(), dense_logits(q, k), rtol=0, atol=1e-5)
        out = torch.einsum("bnqk,bknd->bqnd", logits.softmax(-1), v)
        torch.testing.assert_close(out, call["out"], rtol=1e-5, atol=1e-5)


def test_probabilities_are_softmax_over_all_keys(pipeline, config, recorded_calls):
    ATTENTION_WEIGHT_CAPTURE.enable([2], passes=ALL_PASSES, blocks=[0, 1])
    run(pipeline, config)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert len(kept) == 2 * 5
    for record in kept:
        call = recorded_calls[record.call_idx]
        assert call["block"] == record.layer_idx == 2
        logits = torch.einsum("bqnd,bknd->bnqk", call["q"], call["k"]) / call["q"].shape[-1] ** 0.5
        torch.testing.assert_close(all_heads(record, logits=False), logits.softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step, timestep", [(0, 1000.0), (2, 833.33), ("cache", 0.0)])
def test_pass_capture_keeps_one_pass_of_the_last_block(pipeline, config, step, timestep):
    ATTENTION_WEIGHT_CAPTURE.enable([0, 4], num_layers=6, passes=[step])
    run(pipeline, config)
    # 2 blocks x 5 passes per layer, less the last block's cache pass unless it is kept.
    assert ATTENTION_WEIGHT_CAPTURE.calls_seen == 2 * (10 - (step != "cache"))
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [r.layer_idx for r in kept] == [0, 4]
    for record in kept:
        assert record.labels["block"] == 1 and record.labels["step"] == step
        assert record.labels["timestep"] == pytest.approx(timestep, abs=0.01)
        assert record.k_shape[1] == NUM_FRAMES * 16 and record.q_shape[1] == 3 * 16
        # The call number says which forward it came from: 6 layers a forward, 5 forwards a block.
        assert record.call_idx == (5 + ALL_PASSES.index(step)) * 6 + record.layer_idx


def test_capture_leaves_latents_bit_identical(pipeline, config):
    plain = run(pipeline, config, seed=3)
    for layers, chosen, kept in ((None, dict(passes=ALL_PASSES, blocks=[0, 1]), 6 * 2 * 5), ([0, 5], {}, 2)):
        ATTENTION_WEIGHT_CAPTURE.enable(layers, **chosen)
        captured = run(pipeline, config, seed=3)
        assert ATTENTION_WEIGHT_CAPTURE.calls_kept == kept
        ATTENTION_WEIGHT_CAPTURE.disable()
        assert torch.equal(plain, captured)


def test_summaries_started_during_inference_leave_latents_bit_identical(pipeline, config):
    """With ``summarize`` each kept call's summary starts as soon as it is kept (overlapping the later
    layers and blocks on a CUDA device); the latents stay those of the capture off, and the summaries
    those of the same calls computed after the run."""
    plain = run(pipeline, config, seed=5)
    fsl = 16
    ATTENTION_WEIGHT_CAPTURE.enable(None, passes=ALL_PASSES, blocks=[0, 1], summarize=fsl)
    captured = run(pipeline, config, seed=5)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    ATTENTION_WEIGHT_CAPTURE.disable()
    assert torch.equal(plain, captured)
    assert len(kept) == 6 * 2 * 5 and all(record._started is not None for record in kept)
    for record in kept[::7]:
        logits = dense_logits(record.q, record.k)
        summary = record.summary(fsl)
        torch.testing.assert_close(summary["query_mean_logits"].double(), logits.mean(2), rtol=0, atol=1e-5)
        torch.testing.assert_close(summary["logit_min"].double(), logits.amin((2, 3)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="summarize"):
        ATTENTION_WEIGHT_CAPTURE.enable([0], summarize=0)


def test_off_means_no_bookkeeping(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.disable()
    run(pipeline, config)
    assert ATTENTION_WEIGHT_CAPTURE.current_layer_idx == 0 and ATTENTION_WEIGHT_CAPTURE.calls_seen == 0
    assert ATTENTION_WEIGHT_CAPTURE.kept_calls == []


def test_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match="6 layers"):
        ATTENTION_WEIGHT_CAPTURE.enable([0, 6], num_layers=6)
    with pytest.raises(ValueError, match="repeat"):
        ATTENTION_WEIGHT_CAPTURE.enable([0, 0])
    with pytest.raises(ValueError, match="passes"):
        ATTENTION_WEIGHT_CAPTURE.enable([0], passes=[-1])
    with pytest.raises(ValueError, match="blocks"):
        ATTENTION_WEIGHT_CAPTURE.enable([0], blocks=["first"])


def test_summary_and_host_copy_match_direct_computation(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.enable([1])  # pass 0 of the last block
    run(pipeline, config)
    (record,) = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert (record.labels["block"], record.labels["step"]) == (1, 0)
    fsl = 16
    logits = dense_logits(record.q, record.k)
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


# (3, 1) is not here: a 3-frame window with a sink cannot hold a 3-frame block, and the window policy
# refuses it (test_causal_model.test_window_that_would_overwrite_the_sink_is_refused).
@pytest.mark.parametrize("window,sink,frames", [(3, 0, 12), (5, 0, 12), (5, 1, 15), (6, 1, 12), (6, 0, 21), (9, 1, 21)])
@pytest.mark.parametrize("step", [0, "cache"])
def test_pass_capture_keeps_the_last_block_under_windows(config, window, sink, frames, step):
    pipeline = windowed_pipeline(config, window, sink)
    num_blocks = frames // 3
    tee = teed(pipeline)
    try:
        ATTENTION_WEIGHT_CAPTURE.enable([4, 1], passes=[step])
        run_frames(pipeline, config, frames)
    finally:
        untee(pipeline)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [r.layer_idx for r in kept] == [4, 1]  # the order the layers were asked in
    for record in kept:
        reference = tee.call(record.layer_idx, num_blocks - 1, step)
        assert record.labels["block"] == num_blocks - 1 and record.labels["step"] == step
        assert record.labels == reference["labels"]
        # Every call is numbered, kept or not: 6 layers a forward, 5 forwards a block.
        assert record.call_idx == ((num_blocks - 1) * 5 + ALL_PASSES.index(step)) * 6 + record.layer_idx
        assert tee.calls[record.call_idx] is reference
        # The cache holds the sink frames (unless none was evicted yet) and the newest frames up to the
        # query block, in that order; the frames it reports are those of the keys at the call.
        newest = list(range(frames - min(window, frames), frames))
        expected_frames = newest if newest[0] < sink else list(range(sink)) + newest[sink:]
        assert record.key_frames == reference["key_frames"] == expected_frames
        assert record.k_shape[1] == len(expected_frames) * 16
        # The kept q and k are the call's, bit for bit; its logits are their product.
        assert torch.equal(record.q, reference["q"]) and torch.equal(record.k, reference["k"])
        torch.testing.assert_close(all_heads(record).double(), dense_logits(reference["q"], reference["k"]), rtol=0, atol=1e-5)


def test_a_second_model_in_the_process_does_not_shift_layers(pipeline, config):
    """Calls of another model (here 4 layers, outside any labelled pass) before and during capture
    neither change which calls are kept nor their layers."""
    ATTENTION_WEIGHT_CAPTURE.enable([0, 5], passes=[1])
    run(pipeline, config)
    reference = {r.layer_idx: r for r in ATTENTION_WEIGHT_CAPTURE.kept_calls}
    other_cfg = OmegaConf.merge(config, {"model_config": {"num_layers": 4}, "init_seed": 5})
    other = WanDiffusionWrapper.from_config(other_cfg).model
    x = torch.randn(1, config.model_config.in_dim, 3, config.height // 8, config.width // 8)
    context = torch.randn(1, config.model_config.text_len, config.model_config.text_dim)
    ATTENTION_WEIGHT_CAPTURE.enable([0, 5], passes=[1])
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
    ATTENTION_WEIGHT_CAPTURE.enable([2], passes=["cache", 0, 1, 2, 3], blocks=[0, "last"])
    run(pipeline, config)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [(r.labels["block"], r.labels["step"]) for r in kept] == [(b, s) for b in (0, 1) for s in (0, 1, 2, 3, "cache")]
    assert [r.key_frames for r in kept] == [[0, 1, 2]] * 5 + [list(range(6))] * 5
    assert ATTENTION_WEIGHT_CAPTURE.calls_seen == 10


def test_num_layers_is_checked_against_the_model(pipeline, config):
    ATTENTION_WEIGHT_CAPTURE.enable([0], num_layers=30)
    with pytest.raises(ValueError, match="30.*6 layers"):
        run(pipeline, config)


def test_a_call_kept_under_several_places_is_summarized_once(monkeypatch):
    """A call of the rolling loop is kept under each wanted (block, step) of its window: the same q and k,
    so one summary, shared (not one per place)."""
    import wan.modules.attention as attention

    computed = []
    real = attention.summarize_qk
    monkeypatch.setattr(attention, "summarize_qk", lambda q, k, fsl: computed.append(1) or real(q, k, fsl))
    fsl, generator = 2, torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3 * fsl, 2, 8, generator=generator), torch.randn(1, 4 * fsl, 2, 8, generator=generator)
    capture = attention.AttentionWeightCapture()
    capture.enable([0], passes=[0, 1, 2], blocks=[0, 1, 2], summarize=fsl)
    capture.annotate(num_blocks=3, places=((0, 2, 250.0), (1, 1, 500.0), (2, 0, 750.0)), window=[0, 3])
    capture.observe(0, q, k)
    capture.annotate()
    kept = capture.kept_calls
    assert [(r.labels["block"], r.labels["step"]) for r in kept] == [(0, 2), (1, 1), (2, 0)] and len(computed) == 1
    logits = dense_logits(q, k)
    for record in kept:
        torch.testing.assert_close(record.summary(fsl)["query_mean_logits"].double(), logits.mean(2), rtol=0, atol=1e-5)
