"""Causal Wan2.1 text-to-video transformer with a per-block KV cache (Self-Forcing inference).

The video is generated a few latent frames (a "block") at a time. Each transformer block keeps the
RoPE-rotated keys and the values of earlier frames in a cache of the model's cache policy
(wan/cache_policies: every frame, a window with a sink, Deep Forcing's caches); a block's queries
attend, without mask, to the cached keys and to the block's own. A cache may instead store keys
without RoPE (``stores_raw_keys``: Reward Forcing's and Infinite-Forcing's); then it says at which
temporal positions the queries and the keys it returns are read, and the model rotates them there at
every call (``read_raw_keys``). Each self-attention call is handed to the model's observer (the
attention capture) when one is on. Parameter names and shapes equal the official ``WanModel``
checkpoint, so ``diffusion_pytorch_model.safetensors`` loads as is.

Token layout: a latent video [B, C, F, H, W] becomes F * (H/ph) * (W/pw) tokens, frame-major, then
row, then column; ``frame_seq_length`` is the number of tokens of one frame.

Two numerics modes (``CausalWanModel.set_numerics``):
- ``exact``: upstream Self-Forcing's arithmetic (RoPE in complex128, every op in the weights' dtype).
- ``fast``: the same model with the elementwise work fused: RoPE in fp32 real arithmetic from cos/sin
  tables cached per (grid, start frame, device), each norm and its modulation, gate or RoPE computed in
  fp32 and rounded once; the FFN's first GEMM with bias and GELU in its epilogue on a GPU
  (``linear_gelu_tanh``); self-attention on FlashAttention-3 or -4 where installed
  (``attention.fast_attention_kernel``; compiled, it may split the keys in two halves and merge them).
  Each block runs as two functions, ``fast_attention_inputs`` (norm1 + modulation + q/k/v + q/k norms +
  RoPE) and ``fast_block_output`` (o + gate + cross-attention + FFN), optionally compiled once with
  ``torch.compile`` (wan/modules/compilation.py) and shared by every block. The self-attention call,
  the KV-cache write and the attention capture stay eager between them.
"""
import collections
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from utils.config import PRECISIONS
from utils.loading import WeightFileError, load_into, read_state_dict
from utils.wan21 import ROPE_MAX_LEN, TRANSFORMER_FILE, ModelConfigError, latent_frame_tokens, read_model_config
from wan.cache_policies import CacheLayout
from wan.cache_policies.global_attention import GlobalAttention
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE, attention, fast_attention_kernel, merge_key_splits, sdpa
from wan.modules.compilation import compiled

def sinusoidal_embedding(dim, position):
    """[N] positions -> [N, dim] embedding in float64: cos in the first half, sin in the second."""
    half = dim // 2
    position = position.to(torch.float64)
    angles = torch.outer(position, torch.pow(10000, -torch.arange(half, device=position.device).to(position) / half))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RoPE3D:
    """Rotary embedding over (frame, row, column). The head dim's D/2 consecutive pairs are split
    into time, height and width parts; each part rotates with its own coordinate. Frames are
    absolute: a block starting at frame s uses angles s, s+1, ..."""

    CACHED_TABLES = 4

    def __init__(self, head_dim, max_len=ROPE_MAX_LEN, theta=10000.0):
        pairs = head_dim // 2
        self.split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
        self.max_len = max_len
        self.theta = theta
        self._tables = {}  # device -> complex128 [max_len, D/2]; built on first use on that device
        self._cos_sin = collections.OrderedDict()  # (grid, start frame, device) -> fp32 (cos, sin), each [f*h*w, 1, D]

    def _table(self, device):
        if device not in self._tables:
            position = torch.arange(self.max_len, dtype=torch.float64, device=device)
            parts = []
            for pairs in self.split:
                inv_freq = self.theta ** -(torch.arange(pairs, dtype=torch.float64, device=device) * 2 / (2 * pairs))
                angles = torch.outer(position, inv_freq)
                parts.append(torch.polar(torch.ones_like(angles), angles))
            self._tables[device] = torch.cat(parts, dim=1)
        return self._tables[device]

    def freqs(self, grid, start_frame, device):
        """Rotations for a (frames, rows, columns) token grid: complex128 [f*h*w, 1, D/2]."""
        f, h, w = grid
        if start_frame + f > self.max_len or max(h, w) > self.max_len:
            raise ValueError(f"RoPE table has {self.max_len} positions; got frames up to {start_frame + f}, grid {h}x{w}")
        time, rows, cols = self._table(device).split(self.split, dim=1)
        freqs = torch.cat(
            [
                time[start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                rows[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                cols[:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        )
        return freqs.reshape(f * h * w, 1, -1)

    def cos_sin(self, grid, start_frame, device):
        """The rotations of ``freqs`` as the fp32 tables of ``apply_rope_fp32``, [f*h*w, 1, D] each: the
        cosine for both members of a pair, and the sine signed (-sin, +sin); each is the correctly
        rounded fp32 value of the complex128 one. Built once per grid, start frame and device; the
        last ``CACHED_TABLES`` stay (a block's passes share one; a long rollout needs no more)."""
        key = (tuple(grid), start_frame, device)
        if key in self._cos_sin:
            self._cos_sin.move_to_end(key)
        else:
            freqs = self.freqs(grid, start_frame, device)
            sin = freqs.imag.float()
            self._cos_sin[key] = (freqs.real.float().repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2))
            while len(self._cos_sin) > self.CACHED_TABLES:
                self._cos_sin.popitem(last=False)
        return self._cos_sin[key]


def apply_rope(x, freqs):
    """Rotate consecutive pairs of x [B, L, N, D] by freqs [L, 1, D/2], in complex128."""
    pairs = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)))  # [B, L, N, D/2]
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


def apply_rope_fp32(x, cos, sin):
    """``apply_rope`` in fp32 real arithmetic: x [B, L, N, D] fp32 and ``RoPE3D.cos_sin``'s tables
    [L, 1, D] -> fp32. A pair (a, b) becomes (a cos - b sin, b cos + a sin) = (a, b) * cos + (b, a) *
    (-sin, sin): one multiply-add with x's pairs swapped, no gather of even and odd members."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # [B, L, N, D]: (x1, x0, x3, x2, ...)
    return x * cos + swapped * sin


class FrameRotation:
    """The RoPE of one forward's tokens in the model's numerics: rotates x [B, f*h*w, N, D], f frames of
    the forward's h x w grid, at temporal positions start .. start + f - 1 (``exact``: complex128, as
    ``apply_rope``; ``fast``: fp32, as ``apply_rope_fp32``, rounded once); ``own`` at the forward's own
    frames, from ``start``. The complex128 rotations are built once per (f, start) and shared by the
    forward's layers."""

    def __init__(self, rope, grid, start, precision):
        self.rope, self.start, self.precision = rope, start, precision
        self.rows, self.cols = grid[1:]
        self._freqs = {}  # (frames, start, device) -> complex128 [f*h*w, 1, D/2]

    def __call__(self, x, start):
        grid = (x.shape[1] // (self.rows * self.cols), self.rows, self.cols)
        if self.precision == "fast":
            cos, sin = self.rope.cos_sin(grid, start, x.device)
            return apply_rope_fp32(x.float(), cos, sin).type_as(x)
        key = (grid[0], start, x.device)
        if key not in self._freqs:
            self._freqs[key] = self.rope.freqs(grid, start, x.device)
        return apply_rope(x, self._freqs[key])

    def own(self, x):
        return self(x, self.start)


def read_raw_keys(cache, q, k, v, current_start, rotation):
    """Self-attention's inputs through a cache that stores keys without RoPE (``stores_raw_keys``, e.g.
    wan/modules/infinite_forcing.py): write the pass's k, v [B, L, N, D] as they are, then rotate the
    queries and the attended keys at the temporal positions the cache reads them at (``rope_starts``)
    with ``rotation`` (a ``FrameRotation``). Returns q [B, L, N, D], k and v [B, Lk, N, D]."""
    keys, values = cache.update(k, v, current_start)
    query_start, key_start = cache.rope_starts()
    return rotation(q, query_start), rotation(keys, key_start), values


def stores_raw_keys(cache):
    """Whether ``cache`` takes keys without RoPE and says where to rotate them (a cache without the
    attribute takes rotated keys)."""
    return getattr(cache, "stores_raw_keys", False)


def modulate(x, shift, scale):
    """x [B, F*S, C] with per-frame shift/scale [B, F, 1, C]."""
    frames = shift.shape[1]
    return (x.unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)


def gate(x, g):
    """x [B, F*S, C] times a per-frame gate [B, F, 1, C]."""
    return (x.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)


def layer_norm_modulate(x, shift, scale, eps):
    """LayerNorm without affine of x [B, F*S, C], then the per-frame modulation (fp32 shift/scale
    [B, F, 1, C]), in fp32, rounded once to x's dtype."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps).unflatten(1, (shift.shape[1], -1))
    return (normed * (1 + scale) + shift).flatten(1, 2).type_as(x)


def gated_residual(x, y, g):
    """x + y * g for x, y [B, F*S, C] and a per-frame fp32 gate [B, F, 1, C], in fp32, rounded once."""
    return (x.float() + (y.float().unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)).type_as(x)


def rms_norm_fp32(x, norm):
    """``norm`` (an RMSNorm or nn.Identity) of x, computed and returned in fp32."""
    xf = x.float()
    if isinstance(norm, nn.Identity):
        return xf
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight.float()


class RMSNorm(nn.Module):
    """RMS norm computed in fp32, over the whole width (before the head split)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class CrossAttnCache:
    """Keys and values of the text context, computed at the first forward and reused after."""

    def __init__(self):
        self.k = None
        self.v = None


class AttentionProjections(nn.Module):
    """The q, k, v, o projections and q/k RMS norms shared by self- and cross-attention."""

    def __init__(self, dim, num_heads, qk_norm, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class CausalSelfAttention(AttentionProjections):
    """Self-attention of transformer block ``layer_idx`` over the KV cache. When its ``observer`` (set
    by ``CausalWanModel.set_observer``) is on, every call's rotated queries and attended keys are shown
    to it under the layer index."""

    def __init__(self, dim, num_heads, qk_norm, eps, layer_idx):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.layer_idx = layer_idx
        self.observer = None

    def forward(self, x, rotation, cache, current_start):
        """x [B, L, C]; ``rotation``: the forward's ``FrameRotation``; ``current_start``: x's first token
        in the video (x's frames are rotated at their own positions unless the cache says otherwise)."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(2, heads)  # [B, L, N, D]
        k = self.norm_k(self.k(x)).unflatten(2, heads)
        v = self.v(x).unflatten(2, heads)
        if stores_raw_keys(cache):
            q, k, v = read_raw_keys(cache, q, k, v, current_start, rotation)
        else:
            q, k = rotation.own(q), rotation.own(k)
            if cache is not None:
                k, v = cache.update(k, v, current_start, queries=q)  # [B, Lk, N, D]
        if self.observer is not None and self.observer.enabled:
            self.observer.observe(self.layer_idx, q, k, cache)
        return self.o(attention(q, k, v).flatten(2))


class CrossAttention(AttentionProjections):
    def forward(self, x, context, cache):
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        k, v = self.text_kv(context, cache)
        return self.o(sdpa(q, k, v).flatten(2))

    def text_kv(self, context, cache):
        """Keys and values of the text context, [B, text_len, N, D]: the cached ones once filled."""
        if cache is not None and cache.k is not None:
            return cache.k, cache.v
        heads = (self.num_heads, -1)
        k = self.norm_k(self.k(context)).unflatten(2, heads)
        v = self.v(context).unflatten(2, heads)
        if cache is not None:
            cache.k, cache.v = k, v
        return k, v


class CausalWanBlock(nn.Module):
    def __init__(self, layer_idx, dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = CausalSelfAttention(dim, num_heads, qk_norm, eps, layer_idx)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e, rotation, context, cache, crossattn_cache, current_start):
        """x [B, F*S, C]; e [B, F, 6, C], the per-frame time modulation; ``rotation``: the forward's
        ``FrameRotation``."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)
        y = self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa), rotation, cache, current_start)
        x = x + gate(y, gate_sa)
        x = x + self.cross_attn(self.norm3(x), context, crossattn_cache)
        y = self.ffn(modulate(self.norm2(x), shift_ff, scale_ff))
        return x + gate(y, gate_ff)


def fast_attention_inputs(block, x, e, cos, sin):
    """Fast mode, first half of a block: norm1 + modulation, the q/k/v projections, the q/k RMS norms
    and RoPE, each elementwise chain in fp32 and rounded once. x [B, F*S, C], e [B, F, 6, C], cos/sin
    [F*S, 1, D] (None: q and k without RoPE, for a cache that rotates at read) -> q, k, v [B, F*S, N, D]
    in x's dtype and the fp32 modulation [B, F, 6, C]."""
    attn = block.self_attn
    heads = (attn.num_heads, -1)
    mod = block.modulation.float().unsqueeze(1) + e.float()
    h = layer_norm_modulate(x, mod[:, :, 0:1], mod[:, :, 1:2], block.norm1.eps)
    q = rms_norm_fp32(attn.q(h), attn.norm_q).unflatten(2, heads)
    k = rms_norm_fp32(attn.k(h), attn.norm_k).unflatten(2, heads)
    if cos is not None:
        q, k = apply_rope_fp32(q, cos, sin), apply_rope_fp32(k, cos, sin)
    v = attn.v(h).unflatten(2, heads)
    return q.type_as(x), k.type_as(x), v, mod


def fast_block_output(block, x, y, mod, text_k, text_v):
    """Fast mode, second half of a block: output projection + gate, cross-attention to the text keys
    and values [B, text_len, N, D], FFN + gate. y [B, F*S, N, D] is the self-attention output."""
    x = gated_residual(x, block.self_attn.o(y.flatten(2)), mod[:, :, 2:3])
    cross = block.cross_attn
    q = rms_norm_fp32(cross.q(block.norm3(x)), cross.norm_q).type_as(x).unflatten(2, (cross.num_heads, -1))
    x = x + cross.o(sdpa(q, text_k, text_v).flatten(2))
    h = layer_norm_modulate(x, mod[:, :, 3:4], mod[:, :, 4:5], block.norm2.eps)
    up, down = block.ffn[0], block.ffn[2]
    hidden = linear_gelu_tanh(h.flatten(0, 1), up.weight, up.bias).unflatten(0, h.shape[:2])  # [B, F*S, ffn_dim]
    return gated_residual(x, down(hidden), mod[:, :, 5:6])


WAN_OPS = torch.library.Library("wan", "DEF")  # ops that torch.compile must keep whole
WAN_OPS.define("linear_gelu_tanh(Tensor x, Tensor weight, Tensor bias) -> Tensor")


def _linear_gelu_tanh(x, weight, bias):
    """GELU (tanh approximation) of x [M, K] @ weight.T + bias -> [M, N]. On a GPU one cuBLASLt GEMM
    with the bias and the GELU in its epilogue, applied to the fp32 accumulator before the single
    rounding (torch's CUDA ``_addmm_activation``, whose GELU is the tanh form; its CPU version uses
    the erf form, so the CPU computes the two steps). An opaque op to torch.compile, which would
    otherwise split it back into a GEMM and an elementwise kernel; a plain ``Library`` op, because a
    ``torch.library.custom_op`` runs its Python wrappers at every call (host time that the first
    blocks of a run, where the CPU barely keeps ahead of the GPU, cannot spare)."""
    if x.is_cuda:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


WAN_OPS.impl("linear_gelu_tanh", _linear_gelu_tanh, "CompositeExplicitAutograd")


@torch.library.register_fake("wan::linear_gelu_tanh")
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


linear_gelu_tanh = torch.ops.wan.linear_gelu_tanh


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        """x [B, F*S, C]; e [B, F, 1, C] -> [B, F*S, out_dim * prod(patch)]."""
        shift, scale = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(modulate(self.norm(x), shift, scale))


class CausalWanModel(nn.Module):
    def __init__(
        self, *, patch_size, text_len, in_dim, dim, ffn_dim, freq_dim, text_dim, out_dim, num_heads, num_layers,
        qk_norm=True, cross_attn_norm=True, eps=1e-6, cache_policy=None,
    ):
        """The sizes of the official ``WanModel``; ``cache_policy``: which keys each block's
        self-attention keeps and attends to (a ``wan.cache_policies`` policy; default global)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.config = dict(
            patch_size=tuple(patch_size), text_len=text_len, in_dim=in_dim, dim=dim, ffn_dim=ffn_dim,
            freq_dim=freq_dim, text_dim=text_dim, out_dim=out_dim, num_heads=num_heads, num_layers=num_layers,
            qk_norm=qk_norm, cross_attn_norm=cross_attn_norm, eps=eps,
        )
        self.patch_size = tuple(patch_size)
        self.freq_dim = freq_dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cache_policy = cache_policy if cache_policy is not None else GlobalAttention()
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            CausalWanBlock(i, dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps) for i in range(num_layers)
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        self.rope = RoPE3D(self.head_dim)
        self.set_numerics("exact")
        self.set_observer(ATTENTION_WEIGHT_CAPTURE)

    def set_observer(self, observer):
        """Hand every self-attention call to ``observer`` (``AttentionWeightCapture``'s interface: an
        ``enabled`` flag, ``begin_forward(num_layers)``, ``observe(layer, q, k, cache)``, and for the
        pipeline ``wants`` and ``annotate``), or to nobody with None."""
        self.observer = observer
        for block in self.blocks:
            block.self_attn.observer = observer

    def set_numerics(self, precision, compile=False):
        """``precision``: "exact" (upstream's arithmetic) or "fast" (see the module docstring).
        ``compile``: in fast mode, run the two block halves through ``torch.compile`` (dynamic=False),
        compiled at their first call and shared by every block, and let FlashAttention split keys
        (their merge is compiled too: eager, it would cost more than the split saves); ignored in
        exact mode."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.compiled = bool(compile) and precision == "fast"
        self._attention_inputs = compiled(fast_attention_inputs) if self.compiled else fast_attention_inputs
        self._block_output = compiled(fast_block_output) if self.compiled else fast_block_output
        self._merge_key_splits = compiled(merge_key_splits) if self.compiled else None

    def describe_numerics(self, device, dtype):
        """One line for a run's header: the precision and, in fast mode, compilation and the
        self-attention kernel used for tensors on ``device`` of ``dtype``."""
        if self.precision == "exact":
            return "exact"
        kernel = fast_attention_kernel(torch.device(device), dtype, self.head_dim, self._merge_key_splits).__name__
        return f"fast ({'compiled' if self.compiled else 'not compiled'}; self-attention: {kernel})"

    @classmethod
    def from_pretrained(cls, model_dir, device="cpu", dtype=None, load_weights=True, cache_policy=None):
        """Build from ``<model_dir>/config.json`` and load ``diffusion_pytorch_model.safetensors``
        straight onto ``device`` (cast to ``dtype`` if given) without initializing random weights
        first; with ``load_weights=False`` the model stays on the meta device, for a checkpoint to
        fill. ``cache_policy``: as in the constructor."""
        try:
            config = dict(read_model_config(model_dir), cache_policy=cache_policy)
        except ModelConfigError as err:
            raise WeightFileError(str(err)) from err
        with torch.device("meta"):
            model = cls(**config)
        if not load_weights:
            return model.eval()
        weights = Path(model_dir) / TRANSFORMER_FILE
        return load_into(model, read_state_dict(weights, device=device), weights, dtype=dtype).eval()

    def frame_seq_length(self, height, width):
        """Tokens per latent frame of size height x width."""
        return latent_frame_tokens(height, width, self.patch_size)

    def new_caches(self, batch, num_frames, frame_seq_length, dtype, device):
        """Empty self- and cross-attention caches for a video of ``num_frames`` latent frames, one of
        each per block; the self-attention caches are the cache policy's. Refuses a video longer than
        the RoPE table."""
        if num_frames > self.rope.max_len:
            raise ValueError(f"{num_frames} latent frames: the RoPE table covers {self.rope.max_len}")
        layout = CacheLayout(batch, num_frames, frame_seq_length, self.num_heads, self.head_dim, dtype, device, self.rope)
        return [self.cache_policy.new_cache(layout) for _ in self.blocks], [CrossAttnCache() for _ in self.blocks]

    def forward(self, x, t, context, kv_cache=None, crossattn_cache=None, current_start=0):
        """Flow prediction for latent frames x [B, C, F, H, W] at per-frame timesteps t [B, F], text
        context [B, text_len, text_dim]. With caches, ``current_start`` is the token offset of x's
        first frame in the video and the caches are read and updated; without, x attends to itself."""
        if self.observer is not None and self.observer.enabled:
            self.observer.begin_forward(len(self.blocks))
        batch, _, frames, height, width = x.shape
        x = self.patch_embedding(x)  # [B, dim, F, H/ph, W/pw]
        grid = x.shape[2:]
        x = rearrange(x, "b c f h w -> b (f h w) c")
        frame_seq_length = self.frame_seq_length(height, width)
        e = self.time_embedding(sinusoidal_embedding(self.freq_dim, t.flatten()).to(x.dtype))  # [B*F, dim]
        e0 = self.time_projection(e).unflatten(1, (6, -1)).unflatten(0, (batch, frames))  # [B, F, 6, dim]
        if crossattn_cache is None or any(cache.k is None for cache in crossattn_cache):
            context = self.text_embedding(context)  # [B, text_len, dim]
        else:
            context = None  # every block reuses its cached text keys and values
        kv_cache = kv_cache or [None] * len(self.blocks)
        crossattn_cache = crossattn_cache or [None] * len(self.blocks)
        rotation = FrameRotation(self.rope, grid, current_start // frame_seq_length, self.precision)
        if self.precision == "fast":
            x = self._fast_blocks(x, e0, grid, frame_seq_length, context, kv_cache, crossattn_cache, current_start,
                                  rotation)
        else:
            for block, cache, xcache in zip(self.blocks, kv_cache, crossattn_cache):
                x = block(x, e0, rotation, context, cache, xcache, current_start)
        x = self.head(x, e.unflatten(0, (batch, frames)).unsqueeze(2))
        pt, ph, pw = self.patch_size
        return rearrange(
            x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw
        )

    def _fast_blocks(self, x, e0, grid, frame_seq_length, context, kv_cache, crossattn_cache, current_start, rotation):
        """The transformer blocks in fast mode: the two fused halves of each block around the eager
        self-attention call, which writes K/V into the cache and is what the capture observes (a cache
        that stores keys without RoPE gets them so, and ``rotation`` rotates at its read)."""
        # The patch embedding's rearrange leaves x [B, L, C] channel-major in memory; every norm over C
        # would then read it across tokens while reading the GEMM outputs along C. Row-major from here.
        x = x.contiguous()
        cos, sin = self.rope.cos_sin(grid, current_start // frame_seq_length, x.device)
        kernel = fast_attention_kernel(x.device, x.dtype, self.head_dim, self._merge_key_splits)
        for block, cache, xcache in zip(self.blocks, kv_cache, crossattn_cache):
            if stores_raw_keys(cache):
                q, k, v, mod = self._attention_inputs(block, x, e0, None, None)
                q, k, v = read_raw_keys(cache, q, k, v, current_start, rotation)
            else:
                q, k, v, mod = self._attention_inputs(block, x, e0, cos, sin)
                if cache is not None:
                    k, v = cache.update(k, v, current_start, queries=q)
            if self.observer is not None and self.observer.enabled:
                self.observer.observe(block.self_attn.layer_idx, q, k, cache)
            y = attention(q, k, v, kernel=kernel)
            text_k, text_v = block.cross_attn.text_kv(context, xcache)
            x = self._block_output(block, x, y, mod, text_k, text_v)
        return x
