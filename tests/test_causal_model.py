"""Tests of the causal Wan transformer (wan/modules/causal_model.py) and its weight loading.

Independent references used here:
- the full-size key/shape manifest of the official WanModel (shared/manifests);
- diffusers' own ``WanTransformer3DModel``, filled through the key map of key-maps.md section 3,
  which is written out in this file;
- a dense attention with a boolean block-causal (or local-window) mask written in this file, run on
  all frames in one pass, against which the block-wise KV-cached run is compared.
"""
import contextlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import wan.modules.causal_model as cm
from utils.loading import WeightFileError
from utils.wan21 import WAN_T2V_1_3B
from wan.cache_policies import GlobalAttention, PolicyError, Window, policy_from_kwargs
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE
from wan.modules.causal_model import CausalWanModel
from wan.modules.kv_cache import KVCache

# Tiny model of the same architecture: head_dim 16, so RoPE pairs split [4, 2, 2] (time, rows, cols).
TINY = dict(
    patch_size=(1, 2, 2), text_len=16, in_dim=4, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
    out_dim=4, num_heads=4, num_layers=2, qk_norm=True, cross_attn_norm=True, eps=1e-6,
)
PER_BLOCK = 3  # latent frames per block in the block-wise runs of these tests


def policy(**kwargs):
    """The cache policy of the model_kwargs ``kwargs`` (attention_mode and its options) for blocks of
    ``PER_BLOCK`` frames, e.g. ``policy(local_attn_size=5, sink_size=1)``."""
    return policy_from_kwargs(kwargs, PER_BLOCK)


def tiny_model(seed=0, **overrides):
    """A tiny CausalWanModel whose norm weights and biases are perturbed away from their default
    (1 and 0), so that a wrongly mapped or ignored norm changes the output. ``overrides``: sizes, or
    ``cache_policy=policy(...)``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CausalWanModel(**dict(TINY, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(frames, height=8, width=8, batch=1, seed=1, cfg=TINY):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_dim"], frames, height, width, generator=gen)
    context = torch.zeros(batch, cfg["text_len"], cfg["text_dim"])
    context[:, :5] = torch.randn(batch, 5, cfg["text_dim"], generator=gen)  # 5 "real" rows, zero padding after
    return x, context


class CallObserver:
    """A test observer with the model's observer interface: hands every self-attention call
    (layer index, rotated queries, attended keys, the cache) to ``on_call`` and remembers the layer of
    the last one in ``layer`` (``observe`` comes right before the call's ``attention``). As a pipeline's
    observer it ignores the pass labels and ``wants`` every pass or none."""

    enabled = True

    def __init__(self, on_call=None, wants=False):
        self.on_call = on_call
        self.wants_passes = wants
        self.layer = None
        self.forwards = 0

    def begin_forward(self, num_layers):
        self.forwards += 1

    def observe(self, layer_idx, q, k, kv_cache=None):
        self.layer = layer_idx
        if self.on_call is not None:
            self.on_call(layer_idx, q, k, kv_cache)

    def wants(self, block, num_blocks, step):
        return self.wants_passes

    def annotate(self, **labels):
        pass


@contextlib.contextmanager
def observing(model, observer):
    """``model``'s self-attention calls handed to ``observer`` inside the block; then back to the
    default observer, the global capture."""
    model.set_observer(observer)
    try:
        yield observer
    finally:
        model.set_observer(ATTENTION_WEIGHT_CAPTURE)


# ------------------------------------------------------------------------------------------------
# Manifest


def test_full_size_state_dict_matches_manifest(official_manifest):
    manifest = official_manifest("wan2.1_t2v_1.3b_transformer.json")
    with torch.device("meta"):
        model = CausalWanModel(**WAN_T2V_1_3B)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: shape for k, (shape, _dtype) in manifest["keys"].items()}
    assert len(expected) == manifest["num_tensors"] == 825
    assert sorted(set(ours) - set(expected)) == [], "keys not in the official WanModel"
    assert sorted(set(expected) - set(ours)) == [], "official keys missing"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert wrong == {}
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_elements"]
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


# ------------------------------------------------------------------------------------------------
# from_pretrained: config.json + diffusion_pytorch_model.safetensors

# Fields as in the official config.json; text_dim and patch_size are not in it (upstream lists them
# in ignore_for_config), so from_pretrained takes them from WAN_T2V_1_3B: text_dim 4096.
LOAD_CONFIG = {
    "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 32, "eps": 1e-06, "ffn_dim": 64,
    "freq_dim": 16, "in_dim": 4, "model_type": "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 4,
    "text_len": 8,
}


def random_state_dict(config, seed=0):
    """Random tensors with the shapes of the model that ``config`` describes (built on meta)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalWanModel(**config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def write_model_dir(folder, state, config=LOAD_CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def load_sizes():
    return dict(WAN_T2V_1_3B, **{k: LOAD_CONFIG[k] for k in (
        "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")})


def test_from_pretrained_reads_weights_bit_exactly(tmp_path):
    state = random_state_dict(load_sizes())
    assert state["text_embedding.0.weight"].shape == (32, 4096)  # text_dim from the 1.3B defaults
    model = CausalWanModel.from_pretrained(write_model_dir(tmp_path / "m", state))
    assert not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].device.type == "cpu", key
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    assert model.config["text_dim"] == 4096 and model.config["patch_size"] == (1, 2, 2)
    assert model.config["dim"] == 32 and model.config["num_layers"] == 2 and model.config["text_len"] == 8
    assert set(model.config) == set(TINY)  # the sizes only: the cache policy is the model's cache_policy
    assert model.cache_policy == GlobalAttention()
    assert model.cache_policy.settings["local_attn_size"] == -1 and model.cache_policy.settings["sink_size"] == 0
    # A window policy reaches the model and its caches.
    windowed = CausalWanModel.from_pretrained(tmp_path / "m", cache_policy=policy(local_attn_size=4, sink_size=1))
    assert isinstance(windowed.cache_policy, Window)
    assert windowed.cache_policy.settings["local_attn_size"] == 4 and windowed.cache_policy.settings["sink_size"] == 1
    kv, _ = windowed.new_caches(1, 12, 4, torch.float32, "cpu")
    assert all(type(c) is KVCache and c.k.shape[1] == 4 * 4 and c.sink_tokens == 1 * 4 for c in kv)
    # And the loaded model runs.
    x = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        out = model(x, torch.full((1, 2), 500.0), torch.zeros(1, 8, 4096))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_from_pretrained_missing_files(tmp_path):
    state = random_state_dict(load_sizes())
    folder = write_model_dir(tmp_path / "m", state)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    with pytest.raises(WeightFileError) as err:
        CausalWanModel.from_pretrained(folder)
    assert str(weights) in str(err.value)
    (folder / "config.json").unlink()
    with pytest.raises(WeightFileError) as err:
        CausalWanModel.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_from_pretrained_bad_keys_name_file_and_key(tmp_path, defect):
    state = random_state_dict(load_sizes())
    key = "blocks.1.cross_attn.norm_k.weight"
    if defect == "missing":
        del state[key]
    elif defect == "extra":
        key = "blocks.1.cross_attn.k_img.weight"
        state[key] = torch.zeros(32, 32)
    else:
        state[key] = torch.zeros(33)
    folder = write_model_dir(tmp_path / "m", state)
    with pytest.raises(WeightFileError) as err:
        CausalWanModel.from_pretrained(folder)
    message = str(err.value)
    assert str(folder / "diffusion_pytorch_model.safetensors") in message
    assert key in message


# ------------------------------------------------------------------------------------------------
# Self-Forcing checkpoints: {'generator': ..., 'generator_ema': ...} with 'model.'-prefixed keys


class NotATensor:
    """A pickled object that weights_only loading refuses."""

    def __init__(self):
        self.step = 7


def wrapper_and_states():
    from pipeline.wrappers import WanDiffusionWrapper

    wrapper = WanDiffusionWrapper(tiny_model(seed=3))
    shapes = {k: v.shape for k, v in wrapper.state_dict().items()}
    assert all(k.startswith("model.") for k in shapes)
    gen = torch.Generator().manual_seed(5)
    sd_a = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    sd_b = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    return wrapper, sd_a, sd_b


def assert_state_equals(module, expected):
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("use_ema", [True, False])
def test_generator_checkpoint_loads_ema_or_generator(tmp_path, use_ema):
    from pipeline.wrappers import load_generator_checkpoint

    wrapper, sd_a, sd_b = wrapper_and_states()
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": sd_a, "generator_ema": sd_b}, path)
    key = load_generator_checkpoint(wrapper, path, use_ema=use_ema)
    assert key == ("generator_ema" if use_ema else "generator")
    assert_state_equals(wrapper, sd_b if use_ema else sd_a)


def test_generator_checkpoint_without_ema_names_file(tmp_path):
    from pipeline.wrappers import load_generator_checkpoint

    wrapper, sd_a, _ = wrapper_and_states()
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    path = tmp_path / "no_ema.pt"
    torch.save({"generator": sd_a}, path)
    with pytest.raises(WeightFileError) as err:
        load_generator_checkpoint(wrapper, path, use_ema=True)
    assert str(path) in str(err.value) and "generator_ema" in str(err.value)
    assert_state_equals(wrapper, before)  # nothing was loaded
    assert load_generator_checkpoint(wrapper, path, use_ema=False) == "generator"
    assert_state_equals(wrapper, sd_a)


def test_generator_checkpoint_wrong_key_names_file_and_key(tmp_path):
    from pipeline.wrappers import load_generator_checkpoint

    wrapper, sd_a, sd_b = wrapper_and_states()
    good = "model.blocks.0.self_attn.q.weight"
    bad = "_fsdp_wrapped_module.blocks.0.self_attn.q.weight"
    sd_b[bad] = sd_b.pop(good)
    path = tmp_path / "renamed.pt"
    torch.save({"generator": sd_a, "generator_ema": sd_b}, path)
    with pytest.raises(WeightFileError) as err:
        load_generator_checkpoint(wrapper, path, use_ema=True)
    message = str(err.value)
    assert str(path) in message and good in message and bad in message


def test_generator_checkpoint_with_objects_needs_allow_pickle(tmp_path):
    from pipeline.wrappers import load_generator_checkpoint

    wrapper, sd_a, sd_b = wrapper_and_states()
    path = tmp_path / "pickled.pt"
    torch.save({"generator": sd_a, "generator_ema": sd_b, "trainer_state": NotATensor()}, path)
    with pytest.raises(WeightFileError) as err:
        load_generator_checkpoint(wrapper, path, use_ema=True)
    assert str(path) in str(err.value)
    assert load_generator_checkpoint(wrapper, path, use_ema=True, allow_pickle=True) == "generator_ema"
    assert_state_equals(wrapper, sd_b)


# ------------------------------------------------------------------------------------------------
# Independent implementation: diffusers' WanTransformer3DModel through the key map of key-maps.md §3

# Wan name -> diffusers name; every Wan key must match exactly one rule.
KEY_MAP = [
    (r"^patch_embedding\.(.+)$", r"patch_embedding.\1"),
    (r"^text_embedding\.0\.(.+)$", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"^text_embedding\.2\.(.+)$", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"^time_embedding\.0\.(.+)$", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"^time_embedding\.2\.(.+)$", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"^time_projection\.1\.(.+)$", r"condition_embedder.time_proj.\1"),
    (r"^head\.head\.(.+)$", r"proj_out.\1"),
    (r"^head\.modulation$", r"scale_shift_table"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.(.+)$", r"blocks.\1.attn1.to_\2.\3"),
    (r"^blocks\.(\d+)\.self_attn\.o\.(.+)$", r"blocks.\1.attn1.to_out.0.\2"),
    (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.weight$", r"blocks.\1.attn1.norm_\2.weight"),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.(.+)$", r"blocks.\1.attn2.to_\2.\3"),
    (r"^blocks\.(\d+)\.cross_attn\.o\.(.+)$", r"blocks.\1.attn2.to_out.0.\2"),
    (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.weight$", r"blocks.\1.attn2.norm_\2.weight"),
    (r"^blocks\.(\d+)\.norm3\.(weight|bias)$", r"blocks.\1.norm2.\2"),  # the norms are crossed
    (r"^blocks\.(\d+)\.ffn\.0\.(.+)$", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"^blocks\.(\d+)\.ffn\.2\.(.+)$", r"blocks.\1.ffn.net.2.\2"),
]


def to_diffusers(state):
    out = {}
    for key, value in state.items():
        names = [re.sub(pattern, repl, key) for pattern, repl in KEY_MAP if re.match(pattern, key)]
        assert len(names) == 1, f"{key}: {len(names)} rules match"
        out[names[0]] = value
    return out


def diffusers_twin(model):
    from diffusers import WanTransformer3DModel

    c = model.config
    twin = WanTransformer3DModel(
        patch_size=c["patch_size"], num_attention_heads=c["num_heads"], attention_head_dim=c["dim"] // c["num_heads"],
        in_channels=c["in_dim"], out_channels=c["out_dim"], text_dim=c["text_dim"], freq_dim=c["freq_dim"],
        ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=c["eps"], image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    )
    mapped = to_diffusers(model.state_dict())
    assert set(mapped) == set(twin.state_dict()), "key map does not cover the diffusers model exactly"
    twin.load_state_dict(mapped, strict=True)
    return twin.eval()


def test_no_cache_forward_matches_diffusers():
    torch.manual_seed(0)
    model = tiny_model(seed=11)
    twin = diffusers_twin(model)
    x, context = inputs(frames=3, height=8, width=12, batch=2)  # 3 x 4 x 6 tokens: H != W
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        ours = model(x, t[:, None].expand(2, 3), context)
        ref = twin(x, t, context, return_dict=False)[0]
    assert ours.shape == ref.shape == x.shape
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"diffusers, uniform t: max|diff| {err:.3g}, max|ref| {scale:.3g}")
    assert scale > 0.5
    assert err < 2e-5 * max(1.0, scale)

    # Per-frame timesteps, through diffusers' per-token timestep path ([B, seq_len]).
    t_frames = torch.tensor([[1000.0, 833.3333, 0.0], [625.0, 937.5, 4.98]])
    tokens_per_frame = (8 // 2) * (12 // 2)
    with torch.no_grad():
        ours_pf = model(x, t_frames, context)
        ref_pf = twin(x, t_frames.repeat_interleave(tokens_per_frame, dim=1), context, return_dict=False)[0]
    err_pf = (ours_pf - ref_pf).abs().max().item()
    print(f"diffusers, per-frame t: max|diff| {err_pf:.3g}")
    assert err_pf < 2e-5 * max(1.0, ref_pf.abs().max().item())

    # Sensitivity: the comparison can fail. A small change of one cross-attention norm weight, or of
    # one frame's timestep, moves the output far beyond the tolerance.
    with torch.no_grad():
        twin.blocks[1].attn2.norm_k.weight.mul_(1.05)
        moved = twin(x, t, context, return_dict=False)[0]
        t_moved = model(x, torch.tensor([[937.5, 937.5, 900.0], [250.0] * 3]), context)
    assert (moved - ref).abs().max() > 1e-3
    assert (t_moved - ours).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# KV cache against one dense masked pass over all frames

FSL = (8 // 2) * (8 // 2)  # tokens per 8x8 latent frame


def dense_attention_with(mask_frames):
    """An ``attention`` replacement (``attention`` is self-attention only; cross-attention calls
    ``sdpa`` itself): self-attention with the frame-level boolean mask ``mask_frames[query_frame,
    key_frame]`` expanded to tokens, by an explicit softmax. q, k, v: [B, L, N, D]."""
    token_mask = mask_frames.repeat_interleave(FSL, 0).repeat_interleave(FSL, 1)

    def attention(q, k, v, kernel=None):
        logits = torch.einsum("blnd,bmnd->bnlm", q, k) * q.shape[-1] ** -0.5
        assert token_mask.shape == logits.shape[-2:]
        logits = logits.masked_fill(~token_mask, float("-inf"))
        return torch.einsum("bnlm,bmnd->blnd", logits.softmax(dim=-1), v)

    return attention


def block_causal_mask(num_frames, per_block):
    """Query frame i may see key frame j iff j // per_block <= i // per_block."""
    return torch.tensor([[j // per_block <= i // per_block for j in range(num_frames)] for i in range(num_frames)])


def window_mask(num_frames, per_block, window, sink):
    """Visible key frames per query frame under upstream's eviction rule (facts §4), for a cache of
    ``window`` frames, blocks of ``per_block`` frames and ``sink`` sink frames.

    Derivation, in frames (L = per_block, W = window, S = sink): block b writes its L frames; before that,
    if local_end + L > W, it evicts E = local_end + L - W frames, rolls the R = local_end - E - S
    frames after the sink forward to slot S, and local_end becomes local_end + L - E; the block is
    written at [local_end - L, local_end) and attends to [0, local_end). So the buffer always ends
    with the block, preceded by the most recent earlier frames and, when S + L <= W, the S sink
    frames at the front. When S + L > W (e.g. W = L = 3, S = 1) R is negative, nothing rolls and the
    block's write at slot 0 overwrites the sink: only the block itself stays visible. This function
    replays that slot bookkeeping on frame indices."""
    slots = []  # frame index held in each buffer slot, [0, local_end)
    visible = {}
    for b in range(num_frames // per_block):
        block = list(range(b * per_block, (b + 1) * per_block))
        if len(slots) + per_block > window:
            evicted = len(slots) + per_block - window
            rolled = len(slots) - evicted - sink
            if rolled > 0:
                slots[sink : sink + rolled] = slots[sink + evicted : sink + evicted + rolled]
            end = len(slots) + per_block - evicted
        else:
            end = len(slots) + per_block
        slots = (slots + [None] * window)[:end]
        slots[end - per_block : end] = block
        for f in block:
            visible[f] = set(slots)
    return torch.tensor([[j in visible[i] for j in range(num_frames)] for i in range(num_frames)])


def test_window_mask_derivation_examples():
    # W=5, L=3: block 1 sees frames 1..5 (S=0) or 0,2..5 (S=1); block 2 sees 4..8 or 0,5..8.
    m0 = window_mask(9, 3, 5, 0)
    m1 = window_mask(9, 3, 5, 1)
    assert m0[4].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert m0[8].nonzero().flatten().tolist() == [4, 5, 6, 7, 8]
    assert m1[4].nonzero().flatten().tolist() == [0, 2, 3, 4, 5]
    assert m1[8].nonzero().flatten().tolist() == [0, 5, 6, 7, 8]
    # W = L = 3: only the block itself, with or without a sink.
    assert torch.equal(window_mask(9, 3, 3, 1), window_mask(9, 3, 3, 0))
    assert window_mask(9, 3, 3, 1)[7].nonzero().flatten().tolist() == [6, 7, 8]
    # Global cache (W = all frames): block-causal.
    assert torch.equal(window_mask(6, 3, 6, 0), block_causal_mask(6, 3))


def run_blocks(model, x, t, context, per_block, rerun_first_with=None):
    """Block-wise cached run; returns the per-block outputs and the caches. With
    ``rerun_first_with=(x_junk, t_junk)`` every block is first run on junk input (a denoising step),
    then on the real input at the same offset (the cache-update pass must overwrite the slots)."""
    batch, _, frames, height, width = x.shape
    fsl = model.frame_seq_length(height, width)
    kv, xattn = model.new_caches(batch, frames, fsl, x.dtype, x.device)
    outs = []
    for first in range(0, frames, per_block):
        sl = slice(first, first + per_block)
        if rerun_first_with is not None:
            x_junk, t_junk = rerun_first_with
            model(x_junk[:, :, sl], t_junk[:, sl], context, kv, xattn, current_start=first * fsl)
        outs.append(model(x[:, :, sl], t[:, sl], context, kv, xattn, current_start=first * fsl))
    return outs, kv


def dense_reference(model, x, t, context, mask, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(cm, "attention", dense_attention_with(mask))
        return model(x, t, context)


def check_blocks(outs, ref, per_block, label):
    worst = 0.0
    for b, out in enumerate(outs):
        expected = ref[:, :, b * per_block : (b + 1) * per_block]
        err = (out - expected).abs().max().item()
        worst = max(worst, err)
        assert err < 1e-5 * max(1.0, expected.abs().max().item()), f"{label}: block {b} max|diff| {err:.3g}"
    print(f"{label}: max|diff| {worst:.3g}")
    return worst


def test_kv_cache_global_matches_dense_block_causal(monkeypatch):
    model = tiny_model(seed=21)
    x, context = inputs(frames=6, batch=2, seed=4)
    t = torch.tensor([[1000.0, 1000.0, 1000.0, 625.0, 937.5, 833.3], [250.0, 0.0, 500.0, 750.0, 750.0, 4.98]])
    gen = torch.Generator().manual_seed(9)
    junk = (torch.randn(x.shape, generator=gen), torch.full_like(t, 1000.0))
    with torch.no_grad():
        outs, kv = run_blocks(model, x, t, context, 3, rerun_first_with=junk)
        ref = dense_reference(model, x, t, context, block_causal_mask(6, 3), monkeypatch)
        # The mask matters: full bidirectional attention gives block 0 a different result.
        full = dense_reference(model, x, t, context, torch.ones(6, 6, dtype=torch.bool), monkeypatch)
    check_blocks(outs, ref, 3, "global cache vs dense block-causal")
    assert (full[:, :, :3] - ref[:, :, :3]).abs().max() > 1e-3
    assert all(c.global_end == 6 * FSL and c.local_end == 6 * FSL for c in kv)


@pytest.mark.parametrize("window,sink", [(3, 0), (5, 0), (5, 1)])
def test_kv_cache_local_window_matches_dense_window(monkeypatch, window, sink):
    model = tiny_model(seed=31, cache_policy=policy(local_attn_size=window, sink_size=sink))
    x, context = inputs(frames=9, seed=6)
    t = torch.tensor([[1000.0, 937.5, 833.3, 625.0, 625.0, 0.0, 500.0, 250.0, 750.0]])
    gen = torch.Generator().manual_seed(10)
    junk = (torch.randn(x.shape, generator=gen), torch.full_like(t, 937.5))
    mask = window_mask(9, 3, window, sink)
    with torch.no_grad():
        outs, kv = run_blocks(model, x, t, context, 3, rerun_first_with=junk)
        ref = dense_reference(model, x, t, context, mask, monkeypatch)
        causal = dense_reference(model, x, t, context, block_causal_mask(9, 3), monkeypatch)
    check_blocks(outs, ref, 3, f"local window {window}, sink {sink} vs dense")
    # The window matters: the global block-causal mask gives the last block a different result.
    assert (causal[:, :, 6:] - ref[:, :, 6:]).abs().max() > 1e-3
    assert all(c.k.shape[1] == window * FSL for c in kv)
    assert all(c.global_end == 9 * FSL and type(c.global_end) is int and type(c.local_end) is int for c in kv)


def test_window_that_would_overwrite_the_sink_is_refused():
    """W = L = 3 with S = 1 (the KVCache's overwritten sink, see ``window_mask``): the window policy
    refuses it for blocks of 3 frames, naming the key; with 1-frame blocks it fits."""
    with pytest.raises(PolicyError, match=r"model_kwargs\.local_attn_size = 3; expected .*3 \+ 1"):
        policy(local_attn_size=3, sink_size=1)
    assert policy_from_kwargs(dict(local_attn_size=3, sink_size=1), 1) == Window(1, local_attn_size=3, sink_size=1)


# ------------------------------------------------------------------------------------------------
# KVCache bookkeeping


def test_kv_cache_indices_stay_python_ints():
    cache = KVCache(1, 4, 2, 1, 2, 0, torch.float32, "cpu")  # 4 frames of 2 tokens, no sink
    k = torch.randn(1, 2, 1, 2)
    for start in (0, 0, 2, 2, 4, 6, 8, 8):  # includes re-runs of a block and evictions
        keys, values = cache.update(k, k + 1, start)
        assert type(cache.global_end) is int and type(cache.local_end) is int
        assert cache.global_end == start + 2
        assert keys.shape[1] == cache.local_end == min(start + 2, 8)
        assert torch.equal(keys[:, -2:], k) and torch.equal(values[:, -2:], k + 1)
        last = start // 2
        assert cache.key_frames() == list(range(max(0, last - 3), last + 1))


@pytest.mark.parametrize("window,sink", [(3, 0), (3, 1), (5, 0), (5, 1), (6, 1), (9, 2)])
def test_kv_cache_key_frames_follow_the_slots(window, sink):
    """Each cache slot is written with the frame's index as its value: the frames the cache reports
    must be the ones its buffer holds, and those the dense window mask lets the block see."""
    fsl, per_block, frames = 2, 3, 12
    cache = KVCache(1, window, fsl, 1, 1, sink, torch.float32, "cpu")
    mask = window_mask(frames, per_block, window, sink)
    for first in range(0, frames, per_block):
        block = torch.arange(first, first + per_block, dtype=torch.float32).repeat_interleave(fsl).view(1, -1, 1, 1)
        for _ in range(2):  # a denoising pass, then the cache pass over the same slots
            keys, _ = cache.update(block, block, first * fsl)
        held = keys[0, ::fsl, 0, 0].long().tolist()
        assert cache.key_frames() == held
        assert sorted(held) == mask[first].nonzero().flatten().tolist()


def test_model_caches_indices_are_python_ints_after_forward():
    model = tiny_model(seed=41)
    x, context = inputs(frames=2)
    kv, xattn = model.new_caches(1, 4, FSL, torch.float32, "cpu")
    with torch.no_grad():
        for start_frame in (0, 2):
            model(x, torch.full((1, 2), 500.0), context, kv, xattn, current_start=start_frame * FSL)
            for cache in kv:
                assert type(cache.global_end) is int and type(cache.local_end) is int
                assert cache.global_end == cache.local_end == (start_frame + 2) * FSL
    assert all(c.k is not None for c in xattn)


def test_checkpoint_fills_a_meta_generator_without_reading_base_weights(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint

    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LOAD_CONFIG))  # no safetensors file: it must not be needed
    cfg = OmegaConf.create({"model_dir": str(folder), "random_init": False, "model_kwargs": {"timestep_shift": 5.0}})
    wrapper = WanDiffusionWrapper.from_config(cfg, load_weights=False)
    assert all(p.is_meta for p in wrapper.parameters())
    config = dict(WAN_T2V_1_3B, **{k: LOAD_CONFIG[k] for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")})
    ema = {f"model.{k}": v for k, v in random_state_dict(config, seed=4).items()}
    path = tmp_path / "sf.pt"
    torch.save({"generator": {k: v + 1 for k, v in ema.items()}, "generator_ema": ema}, path)
    assert load_generator_checkpoint(wrapper, path, device="cpu", dtype=torch.bfloat16) == "generator_ema"
    assert not any(p.is_meta for p in wrapper.parameters())
    state = wrapper.state_dict()
    assert set(state) == set(ema)
    for key, value in ema.items():
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], value.bfloat16()), key
