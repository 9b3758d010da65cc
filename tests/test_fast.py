"""The fast numerics mode against the exact one, in fp32 on the CPU: each fused piece, the whole model
(global cache and local windows), the pipeline, the capture in fast mode, the skipped last cache pass,
and one small torch.compile run."""
import pickle
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.causal_inference import CausalInferencePipeline
from test_capture import FixedTextEncoder
from test_causal_model import CallObserver, inputs, observing, policy, run_blocks, tiny_model
from pipeline.wrappers import WanDiffusionWrapper
from wan.modules.attention import (
    ATTENTION_WEIGHT_CAPTURE,
    MIN_SPLIT_KEYS,
    fast_attention_kernel,
    merge_key_splits,
    sdpa,
    split_keys_pays,
)
from wan.modules.causal_model import (
    RMSNorm, RoPE3D, apply_rope, apply_rope_fp32, gate, gated_residual, layer_norm_modulate, linear_gelu_tanh, modulate, rms_norm_fp32,
)


@pytest.fixture(autouse=True)
def capture_off():
    yield
    ATTENTION_WEIGHT_CAPTURE.disable()


def assert_near(fast, exact, rel=2e-6):
    scale = exact.abs().max().item()
    err = (fast - exact).abs().max().item()
    assert scale > 0.1 and err <= rel * scale, f"max|diff| {err:.3g}, max|exact| {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# Pieces


def test_rope_tables_match_complex128_rope():
    rope = RoPE3D(head_dim=16)
    grid = (3, 4, 6)
    x = torch.randn(2, 3 * 4 * 6, 4, 16, generator=torch.Generator().manual_seed(0))
    for start_frame in (0, 5, 700):
        cos, sin = rope.cos_sin(grid, start_frame, x.device)
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (72, 1, 16)
        assert_near(apply_rope_fp32(x, cos, sin), apply_rope(x, rope.freqs(grid, start_frame, x.device)))
        freqs = rope.freqs(grid, start_frame, x.device)  # pair p rotates members 2p and 2p+1 by the same angle
        assert torch.equal(cos[..., 0::2], freqs.real.float()) and torch.equal(cos[..., 1::2], freqs.real.float())
        assert torch.equal(sin[..., 0::2], -freqs.imag.float()) and torch.equal(sin[..., 1::2], freqs.imag.float())
    first = rope.cos_sin(grid, 5, x.device)
    assert rope.cos_sin(torch.Size(grid), 5, x.device) is first  # cached, whatever the grid's type
    assert not torch.equal(rope.cos_sin(grid, 6, x.device)[0], first[0])


def test_rope_tables_kept_are_bounded():
    """A long rollout asks for one table per block: only the last few stay."""
    rope = RoPE3D(head_dim=16)
    for start_frame in range(0, 240, 3):
        rope.cos_sin((3, 2, 2), start_frame, torch.device("cpu"))
    assert len(rope._cos_sin) == RoPE3D.CACHED_TABLES
    assert [key[1] for key in rope._cos_sin] == list(range(240 - 3 * RoPE3D.CACHED_TABLES, 240, 3))


def test_fused_norms_match_the_modules():
    gen = torch.Generator().manual_seed(1)
    frames, tokens, dim = 3, 5, 32
    x = torch.randn(2, frames * tokens, dim, generator=gen)
    y = torch.randn(2, frames * tokens, dim, generator=gen)
    shift, scale, g = torch.randn(3, 2, frames, 1, dim, generator=gen)
    norm = nn.LayerNorm(dim, 1e-6, elementwise_affine=False)
    assert_near(layer_norm_modulate(x, shift, scale, 1e-6), modulate(norm(x), shift, scale))
    assert_near(gated_residual(x, y, g), x + gate(y, g))
    rms = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        rms.weight.copy_(1 + 0.3 * torch.randn(dim, generator=gen))
    assert_near(rms_norm_fp32(x, rms), rms(x))
    assert torch.equal(rms_norm_fp32(x, nn.Identity()), x)


def test_ffn_up_projection_with_gelu_matches_the_formula():
    """On the CPU the op computes the two steps (the fused cuBLASLt epilogue is the CUDA path, checked
    against this formula by the GPU benchmark); the formula is written out here, in float64."""
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(7, 16, generator=gen, dtype=torch.float64), torch.randn(24, 16, generator=gen, dtype=torch.float64), torch.randn(24, generator=gen, dtype=torch.float64)
    a = x @ weight.T + bias
    expected = 0.5 * a * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (a + 0.044715 * a**3)))
    assert torch.allclose(linear_gelu_tanh(x, weight, bias), expected, rtol=1e-12, atol=1e-12)


def test_fast_attention_kernel_falls_back_to_sdpa():
    """FlashAttention only on a GPU; on the CPU torch's attention, which takes [B, L, N, D] as
    FlashAttention does."""
    assert fast_attention_kernel(torch.device("cpu"), torch.bfloat16, 128) is sdpa
    assert fast_attention_kernel(torch.device("cpu"), torch.float32, 128) is sdpa
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 3, 8, generator=gen, dtype=torch.float64) for n in (5, 7, 7))
    weights = torch.einsum("bqnd,bknd->bnqk", q, k).mul(8**-0.5).softmax(dim=-1)
    assert torch.allclose(sdpa(q, k, v), torch.einsum("bnqk,bknd->bqnd", weights, v))


def stand_in_flash_attention_3(namespace, arguments):
    """A FlashAttention-3 forward op ``torch.ops.<namespace>.fwd`` with the given schema arguments,
    attention written out in float64, returning (out, lse, and two unused tensors) as the real one
    does; its calls are recorded in the returned list."""
    library = torch.library.Library(namespace, "DEF")
    library.define(f"fwd({arguments}) -> (Tensor, Tensor, Tensor, Tensor)")
    calls = []

    def forward(q, k, v, softmax_scale=None, num_splits=0):
        calls.append((q.shape[0], k.shape[1], q.stride(0), softmax_scale, num_splits))
        out, lse = direct_attention(q, k, v)
        return out, lse, q.new_empty(0), q.new_empty(0)

    library.impl("fwd", forward, "CompositeExplicitAutograd")
    return library, calls


FA3_LIBRARY, FA3_CALLS = stand_in_flash_attention_3(
    "wan_test_fa3", "Tensor q, Tensor k, Tensor v, float? softmax_scale=None, int num_splits=0")
OLD_FA3_LIBRARY, _ = stand_in_flash_attention_3("wan_test_fa3_old", "Tensor q, Tensor k, Tensor v, float? softmax_scale=None")


def install_flash_attention(monkeypatch, fa3=None, fa4=None):
    """Stand-in FlashAttention packages (no GPU here): ``fa3``, the namespace of a stand-in op whose
    extension module is then importable; ``fa4``, ``flash_attn.cute.flash_attn_func``. A package left
    out is not installed (its import fails)."""
    import sys
    import types

    from wan.modules import attention

    monkeypatch.setattr(attention, "FLASH_ATTENTION_3_OPS", (("wan_test_fa3_ext", fa3 or "wan_test_none"),))
    monkeypatch.setitem(sys.modules, "wan_test_fa3_ext", types.ModuleType("wan_test_fa3_ext") if fa3 else None)
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, None)
    if fa4 is not None:
        monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
        monkeypatch.setitem(sys.modules, "flash_attn.cute", types.SimpleNamespace(flash_attn_func=fa4))


def pretend_gpu(monkeypatch, major, sms=132):
    import types

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(multi_processor_count=sms))


def test_fast_attention_kernel_picks_the_flash_attention_that_runs(monkeypatch):
    """FlashAttention-3 on Hopper for bf16 (its op called with the softmax scale and one split);
    FlashAttention-4 on Hopper for fp16 or without FlashAttention-3, and on Blackwell; torch's
    attention elsewhere."""
    fa4_calls = []

    def fa4(q, k, v, return_lse=False):
        fa4_calls.append(return_lse)
        return direct_attention(q, k, v)[0], None

    cuda = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64) for n in (5, 7, 7))
    expected = direct_attention(q, k, v)[0]

    def pick(dtype, head_dim, major):
        fast_attention_kernel.cache_clear()
        pretend_gpu(monkeypatch, major)
        return fast_attention_kernel(cuda, dtype, head_dim)

    try:
        install_flash_attention(monkeypatch, fa3="wan_test_fa3", fa4=fa4)
        kernel = pick(torch.bfloat16, 8, 9)
        FA3_CALLS.clear()
        assert kernel.__name__ == "flash_attention_3" and torch.allclose(kernel(q, k, v), expected, rtol=1e-12, atol=1e-12)
        assert FA3_CALLS == [(1, 7, q.stride(0), 8**-0.5, 1)]
        assert pick(torch.bfloat16, 256, 9).__name__ == "flash_attention_3"
        kernel = pick(torch.float16, 8, 9)  # FlashAttention-3 here is bf16 only
        assert kernel.__name__ == "flash_attention_4" and torch.allclose(kernel(q, k, v), expected, rtol=1e-12, atol=1e-12)
        assert fa4_calls == [False]
        assert pick(torch.bfloat16, 128, 10).__name__ == "flash_attention_4"  # Blackwell
        assert pick(torch.bfloat16, 256, 10) is sdpa  # FlashAttention-4 on Blackwell: up to 128
        assert pick(torch.float32, 128, 9) is sdpa
        assert pick(torch.bfloat16, 12, 9) is sdpa and pick(torch.bfloat16, 264, 9) is sdpa
        assert pick(torch.bfloat16, 128, 8) is sdpa  # Ampere
        install_flash_attention(monkeypatch, fa3="wan_test_fa3_old", fa4=fa4)  # an op without num_splits
        assert pick(torch.bfloat16, 128, 9).__name__ == "flash_attention_4"
        install_flash_attention(monkeypatch, fa4=fa4)
        assert pick(torch.bfloat16, 128, 9).__name__ == "flash_attention_4"
        install_flash_attention(monkeypatch, fa3="wan_test_fa3")
        assert pick(torch.bfloat16, 128, 9).__name__ == "flash_attention_3" and pick(torch.float16, 128, 9) is sdpa
        install_flash_attention(monkeypatch)
        assert pick(torch.bfloat16, 128, 9) is sdpa
    finally:
        fast_attention_kernel.cache_clear()


def direct_attention(q, k, v):
    """Softmax attention and the log-sum-exp of its logits, written out: q [B, Lq, N, D], k and v
    [B, Lk, N, D] -> [B, Lq, N, D] and [B, N, Lq]."""
    logits = torch.einsum("bqnd,bknd->bnqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bnqk,bknd->bqnd", logits.softmax(dim=-1), v), logits.logsumexp(dim=-1)


def test_merging_key_splits_gives_attention_over_all_keys():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 9, 3, 8, generator=gen, dtype=torch.float64)
    k, v = (3 * torch.randn(1, 24, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = direct_attention(q, k, v)[0]
    for parts in ((12, 12), (5, 19), (8, 8, 8)):
        outs, lses = zip(*(direct_attention(q, kp, vp) for kp, vp in zip(k.split(parts, dim=1), v.split(parts, dim=1))))
        merged = merge_key_splits(torch.cat(outs), torch.cat(lses))
        assert merged.shape == expected.shape and torch.allclose(merged, expected, rtol=1e-12, atol=1e-12)


def test_keys_are_split_only_where_the_last_wave_is_mostly_idle():
    # 4680 queries in 37 tiles of 128, 12 heads: 444 tiles on 132 SMs take 4 waves; 888 half tiles 3.5.
    assert split_keys_pays(1, 4680, 12, 32760, 132)
    assert not split_keys_pays(1, 4680, 12, MIN_SPLIT_KEYS - 2, 132)  # too few keys to pay for the merge
    assert split_keys_pays(1, 128, 12, 32760, 132)  # 12 tiles: 24 half tiles keep twice the SMs busy
    assert not split_keys_pays(1, 128 * 11, 12, 32760, 132)  # 132 tiles fill one wave exactly
    assert not split_keys_pays(1, 128 * 25, 10, 32760, 132)  # 250 tiles: 2 waves, and 4 half waves


@pytest.mark.parametrize("package", ["fa3", "fa4"])
def test_flash_attention_splits_the_keys_of_one_video_and_merges(monkeypatch, package):
    """With stand-in FlashAttention-3 or -4 (attention written out in float64) on a pretend Hopper
    GPU of 4 SMs: 3 heads x 2 query tiles leave the second wave half idle, so the keys are split
    into a batch of two halves when a merge is given, and the merged result is attention over all
    keys."""
    fa4_calls = []

    def fa4(q, k, v, return_lse=False):
        fa4_calls.append((q.shape[0], k.shape[1], q.stride(0)))
        out, lse = direct_attention(q, k, v)
        return out, (lse if return_lse else None)

    def batches():
        """(batch, keys, query batch stride) of each launch."""
        return [call[:3] for call in FA3_CALLS] if package == "fa3" else fa4_calls

    install_flash_attention(monkeypatch, **({"fa3": "wan_test_fa3"} if package == "fa3" else {"fa4": fa4}))
    FA3_CALLS.clear()
    pretend_gpu(monkeypatch, 9, sms=4)
    cuda = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 200, 3, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, MIN_SPLIT_KEYS, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = direct_attention(q, k, v)[0]
    try:
        fast_attention_kernel.cache_clear()
        split = fast_attention_kernel(cuda, torch.bfloat16, 8, merge_key_splits)
        assert split.__name__ == f"flash_attention_{package[-1]}"
        assert torch.allclose(split(q, k, v), expected, rtol=1e-12, atol=1e-12)
        assert batches() == [(2, MIN_SPLIT_KEYS // 2, 0)]  # one launch: the query broadcast over the two halves
        assert torch.allclose(split(q, k[:, :-2], v[:, :-2]), direct_attention(q, k[:, :-2], v[:, :-2])[0], rtol=1e-12, atol=1e-12)
        assert batches()[-1] == (1, MIN_SPLIT_KEYS - 2, q.stride(0))  # too few keys: not split
        unsplit = fast_attention_kernel(cuda, torch.bfloat16, 8)
        assert torch.allclose(unsplit(q, k, v), expected, rtol=1e-12, atol=1e-12) and batches()[-1][0] == 1
    finally:
        fast_attention_kernel.cache_clear()


def test_header_names_the_numerics():
    model = tiny_model(seed=0)
    assert model.describe_numerics("cpu", torch.float32) == "exact"
    model.set_numerics("fast")
    assert model.describe_numerics("cpu", torch.bfloat16) == "fast (not compiled; self-attention: sdpa)"


def test_fast_blocks_get_the_residual_stream_row_major():
    """The patch embedding leaves x channel-major; fast mode's fused norms over C want it row-major."""
    model = tiny_model(seed=2)
    model.set_numerics("fast")
    layouts = []
    inner = model._attention_inputs

    def spy(block, x, e, cos, sin):
        layouts.append(x.is_contiguous())
        return inner(block, x, e, cos, sin)

    model._attention_inputs = spy
    x, context = inputs(frames=3, seed=1)
    with torch.no_grad():
        model(x, torch.full((1, 3), 1000.0), context)
    assert layouts == [True] * len(model.blocks)


def in_both_modes(model, run):
    """``run()`` with exact, then fast numerics, without grad: {"exact": ..., "fast": ...}."""
    outs = {}
    with torch.no_grad():
        for precision in ("exact", "fast"):
            model.set_numerics(precision)
            outs[precision] = run()
    return outs


def test_fast_cache_holds_the_exact_keys_and_values():
    model = tiny_model(seed=5)
    x, context = inputs(frames=6, seed=2)
    t = torch.full((1, 6), 937.5)
    caches = in_both_modes(model, lambda: run_blocks(model, x, t, context, 3)[1])
    for exact, fast in zip(caches["exact"], caches["fast"]):
        assert (fast.global_end, fast.local_end, fast.key_frames()) == (exact.global_end, exact.local_end, exact.key_frames())
        assert_near(fast.k, exact.k)
        assert_near(fast.v, exact.v)


# ------------------------------------------------------------------------------------------------
# Whole model


# A 3-frame window has no room for a sink next to a 3-frame block: the window policy refuses (3, 1).
@pytest.mark.parametrize("window,sink", [(-1, 0), (3, 0), (5, 1), (9, 1)])
def test_fast_model_matches_exact(window, sink):
    model = tiny_model(seed=21, cache_policy=policy(local_attn_size=window, sink_size=sink))
    x, context = inputs(frames=12, batch=2, seed=4)
    t = torch.tensor([[1000.0, 937.5, 833.3, 625.0] * 3, [250.0, 0.0, 500.0, 750.0] * 3])
    junk = (torch.randn(x.shape, generator=torch.Generator().manual_seed(9)), torch.full_like(t, 1000.0))
    outs = in_both_modes(model, lambda: run_blocks(model, x, t, context, 3, rerun_first_with=junk)[0] + [model(x, t, context)])
    for fast, exact in zip(outs["fast"], outs["exact"]):
        assert_near(fast, exact, rel=1e-5)


@pytest.mark.parametrize("mode", [
    dict(attention_mode="deep_sink", local_attn_size=7, sink_size=2),
    dict(attention_mode="participative_compression", local_attn_size=9, sink_size=2, budget=7, recent=4),
])
def test_fast_model_matches_exact_with_deep_forcing_caches(mode):
    """Deep Sink shifts and compression (which scores by the layer's queries) in fast mode: 5 blocks,
    the window full and compressed from block 2 on."""
    model = tiny_model(seed=23, cache_policy=policy(**mode))
    x, context = inputs(frames=15, seed=7)
    t = torch.tensor([[1000.0, 937.5, 833.3] * 5])
    outs = in_both_modes(model, lambda: run_blocks(model, x, t, context, 3)[0])
    for fast, exact in zip(outs["fast"], outs["exact"]):
        assert_near(fast, exact, rel=1e-5)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        tiny_model().set_numerics("fastest")


# ------------------------------------------------------------------------------------------------
# Pipeline: config keys, capture in fast mode, the skipped last cache pass


@pytest.fixture(scope="module")
def config():
    return OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load("configs/tiny.yaml"))


def make_pipeline(config, precision, frames_window=-1, sink=0):
    cfg = OmegaConf.merge(config, {"precision": precision, "model_kwargs": {"local_attn_size": frames_window, "sink_size": sink}})
    sizes = cfg.model_config
    return CausalInferencePipeline(cfg, "cpu", generator=WanDiffusionWrapper.from_config(cfg),
                                   text_encoder=FixedTextEncoder(sizes.text_len, sizes.text_dim))


def run(pipeline, config, frames=6, seed=0):
    torch.manual_seed(seed)
    shape = (1, frames, config.model_config.in_dim, config.height // 8, config.width // 8)
    return pipeline.inference(torch.randn(shape), ["a prompt"], return_latents=True)


def test_config_chooses_the_numerics(config):
    exact, fast = make_pipeline(config, "exact"), make_pipeline(config, "fast")
    assert exact.generator.model.precision == "exact" and fast.generator.model.precision == "fast"
    assert not fast.generator.model.compiled  # compile: null means off on the CPU


@pytest.mark.parametrize("frames,window,sink", [(6, -1, 0), (12, 9, 1)])
def test_fast_pipeline_matches_exact(config, frames, window, sink):
    exact = run(make_pipeline(config, "exact", window, sink), config, frames)
    fast = run(make_pipeline(config, "fast", window, sink), config, frames)
    assert_near(fast, exact, rel=1e-5)


def test_fast_capture_is_bit_identical_and_labelled_like_exact(config):
    fast = make_pipeline(config, "fast")
    plain = run(fast, config)
    everything = dict(passes=[0, 1, 2, 3, "cache"], blocks=[0, "last"])
    ATTENTION_WEIGHT_CAPTURE.enable([1, 4], **everything)
    assert torch.equal(run(fast, config), plain)
    fast_calls = ATTENTION_WEIGHT_CAPTURE.kept_calls
    ATTENTION_WEIGHT_CAPTURE.enable([1, 4], **everything)
    run(make_pipeline(config, "exact"), config)
    exact_calls = ATTENTION_WEIGHT_CAPTURE.kept_calls
    labels = [(r.layer_idx, r.labels["block"], r.labels["step"]) for r in exact_calls]
    assert [(r.layer_idx, r.labels["block"], r.labels["step"]) for r in fast_calls] == labels
    assert len(labels) == 2 * 2 * 5
    for f, e in zip(fast_calls, exact_calls):
        assert (f.call_idx, f.q_shape, f.k_shape, f.key_frames) == (e.call_idx, e.q_shape, e.k_shape, e.key_frames)
        for head in range(f.num_heads):
            logits = f.weights(head)
            assert logits.dtype == torch.float32
            assert_near(logits, e.weights(head), rel=1e-5)


def test_capture_wants_the_passes_it_keeps():
    assert not ATTENTION_WEIGHT_CAPTURE.wants(1, 2, "cache")
    ATTENTION_WEIGHT_CAPTURE.enable([0], passes=[0])
    assert ATTENTION_WEIGHT_CAPTURE.wants(1, 2, 0) and not ATTENTION_WEIGHT_CAPTURE.wants(1, 2, "cache")
    assert not ATTENTION_WEIGHT_CAPTURE.wants(0, 2, 0)
    ATTENTION_WEIGHT_CAPTURE.enable([0], passes=["cache"], blocks=[0])
    assert ATTENTION_WEIGHT_CAPTURE.wants(0, 2, "cache") and not ATTENTION_WEIGHT_CAPTURE.wants(1, 2, "cache")
    ATTENTION_WEIGHT_CAPTURE.enable([0], passes=[0, "cache"], blocks=["last"])
    assert ATTENTION_WEIGHT_CAPTURE.wants(1, 2, "cache") and not ATTENTION_WEIGHT_CAPTURE.wants(0, 2, "cache")
    ATTENTION_WEIGHT_CAPTURE.disable()
    assert not ATTENTION_WEIGHT_CAPTURE.wants(1, 2, "cache")


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_skipping_the_last_cache_pass_changes_no_latents(config, precision, monkeypatch):
    pipeline = make_pipeline(config, precision)
    forwards = []
    real_forward = pipeline._forward

    def forward(*args):
        place = args[-1]  # the forward's labels: block, num_blocks, step
        forwards.append((place["block"], place["num_blocks"], place["step"]))
        return real_forward(*args)

    monkeypatch.setattr(pipeline, "_forward", forward)
    skipped = run(pipeline, config)
    assert len(forwards) == 2 * 5 - 1 and (1, 2, "cache") not in forwards and forwards[-1] == (1, 2, 3)
    forwards.clear()
    with observing(pipeline.generator.model, CallObserver(wants=True)):  # an observer that wants every pass
        assert torch.equal(run(pipeline, config), skipped)
    assert len(forwards) == 2 * 5 and forwards[-1] == (1, 2, "cache")


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_capturing_the_cache_pass_still_runs_it(config, precision):
    pipeline = make_pipeline(config, precision)
    plain = run(pipeline, config)
    ATTENTION_WEIGHT_CAPTURE.enable([0, 3], passes=["cache"])
    assert torch.equal(run(pipeline, config), plain)
    kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    assert [(r.layer_idx, r.labels["block"], r.labels["step"], r.labels["timestep"]) for r in kept] == [
        (0, 1, "cache", 0.0), (3, 1, "cache", 0.0)]


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler (inductor), none found")
def test_compiled_fast_model_matches_exact_with_one_graph_per_half():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(seed=21, num_layers=3)
    x, context = inputs(frames=6, seed=4)
    t = torch.full((1, 6), 625.0)
    with torch.no_grad():
        exact = run_blocks(model, x, t, context, 3)[0]
        model.set_numerics("fast", compile=True)
        compiled = run_blocks(model, x, t, context, 3)[0]
    for fast, reference in zip(compiled, exact):
        assert_near(fast, reference, rel=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # one per block half, shared by every block and block position


def test_norm_rows_up_to_2048_wide_are_reduced_in_registers():
    """The one heuristic fast mode changes in inductor: an inner reduction of <= 2048 elements is a
    persistent one (inductor's own limit is 1024); others are left to inductor."""
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from wan.modules.inductor_heuristics import WholeRowReductions

    class Features:
        def __init__(self, numel, hint):
            self.reduction_numel, self.hint = numel, hint

        def get_reduction_hint(self):
            return self.hint

    class Graph:
        class sizevars:
            statically_known_leq = staticmethod(lambda a, b: a <= b)

    choices = WholeRowReductions()
    with V.set_graph_handler(Graph()):
        assert choices.should_use_persistent_reduction(Features(1536, ReductionHint.INNER), False)
        assert choices.should_use_persistent_reduction(Features(512, ReductionHint.INNER), False)
        assert not choices.should_use_persistent_reduction(Features(4096, ReductionHint.INNER), False)
        assert not choices.should_use_persistent_reduction(Features(1536, ReductionHint.OUTER_TINY), False)
    assert choices.uuid() == WholeRowReductions().uuid()  # part of the on-disk cache key: stable
    assert pickle.loads(pickle.dumps(WholeRowReductions)) is WholeRowReductions  # the cache key pickles it


def test_compiled_functions_use_deterministic_inductor_with_whole_row_reductions(monkeypatch):
    from torch._inductor import config as inductor_config

    from wan.modules.compilation import compiled
    from wan.modules.inductor_heuristics import WholeRowReductions

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic, options: seen.update(options, dynamic=dynamic) or fn)
    assert compiled.__wrapped__(abs) is abs
    assert seen["deterministic"] is True and seen["dynamic"] is False
    if hasattr(inductor_config, "inductor_choices_class"):
        assert seen["inductor_choices_class"] is WholeRowReductions
