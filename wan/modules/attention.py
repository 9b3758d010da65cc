"""Attention, and the opt-in capture of self-attention logits.

``attention`` is softmax attention without mask. The model hands every self-attention call to an
observer (``CausalWanModel.set_observer``; by default ``ATTENTION_WEIGHT_CAPTURE``, the public switch),
as diffusers hands attention to its processors: with the observer off, the call costs one flag check.
Each self-attention module passes its own layer index (the transformer block it belongs to) and the
KV cache its keys come from; the pipeline labels every forward with its block and pass. So a recorded
call knows its layer, block, pass and the video frame of every key by construction: nothing is
inferred from call order or tensor sizes. The capture only reads q and k; the attention output is the
same computation either way, so a run with the capture on gives bit-identical latents.

What is kept: per requested layer, the calls of the chosen passes (``passes``: pass indices 0.. and/or
``"cache"``) of the chosen blocks (``blocks``: block indices and/or ``"last"``), as labelled by the
pipeline. Only those calls' q and a copy of their keys stay on the device (about 115 MB per layer and
pass at full size); logits are computed from them when asked, one (head, query frame) tile at a time.

Summaries (``utils.attention_stats.summarize_qk``) may start as soon as a call is kept
(``enable(summarize=frame_seq_length)``): on a CUDA device they are queued on a second stream, after
the kept q and k are ready, and run while later layers and blocks infer; the kept q and k are never
written again and the model's own stream never waits for them, so the latents stay bit-identical.
``CapturedCall.summary`` makes the reading stream wait for its summary.
"""
import functools
import importlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils.attention_stats import exact_means, query_key_logits, summarize_qk
from utils.passes import LAST_BLOCK, block_wanted, is_block, is_pass, pass_order


def sdpa(q, k, v):
    """torch's scaled-dot-product attention on q [B, Lq, N, D], k and v [B, Lk, N, D] -> [B, Lq, N, D]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def merge_key_splits(out, lse):
    """Attention over S disjoint parts of the keys -> attention over all of them. out [S, Lq, N, D]:
    each part's own softmax-weighted values; lse [S, N, Lq]: each part's log-sum-exp of the logits.
    Part i holds exp(lse_i - logsumexp_j lse_j) of the softmax mass. Merged in lse's dtype (fp32 from
    the kernel) and rounded once: [1, Lq, N, D] in out's dtype."""
    share = lse.transpose(1, 2).unsqueeze(-1).softmax(dim=0)  # [S, Lq, N, 1]
    return (out.to(share.dtype) * share).sum(dim=0, keepdim=True).type_as(out)


HOPPER_QUERY_TILE = 128  # FlashAttention-3's and -4's query rows per thread block on Hopper for head sizes <= 256
MIN_SPLIT_KEYS = 8192  # the merge costs about what the split saves at 4680 keys; 9360 gain 6% (H200)


def split_keys_pays(batch, queries, heads, keys, sms):
    """Whether attention of [batch, queries, heads] over ``keys`` keys finishes sooner with the keys
    split in two halves, each query tile becoming two tiles of half the work in the same launch. T
    tiles on ``sms`` SMs take ceil(T / sms) waves, the last one partly idle; the 2T half tiles take
    ceil(2T / sms) / 2 full-tile times. (12 heads x 37 tiles of 128 of 4680 queries on an H200's 132
    SMs: 4 waves -> 3.5.)"""
    tiles = batch * heads * math.ceil(queries / HOPPER_QUERY_TILE)
    return keys >= MIN_SPLIT_KEYS and math.ceil(2 * tiles / sms) / 2 < math.ceil(tiles / sms)


FLASH_ATTENTION_3_OPS = (("fa3_fwd._C", "fa3_fwd"), ("flash_attn_3._C", "flash_attn_3"))  # fa3-fwd; FlashAttention's Hopper build


def flash_attention_3():
    """FlashAttention-3's forward, ``f(q, k, v, return_lse) -> (out, lse or None)``, or None: the op
    ``torch.ops.<namespace>.fwd`` that the extension of an installed package registers (``fa3-fwd``, or
    FlashAttention's own Hopper build), called directly by the names of its arguments. Its Python
    interface wraps the op in an autograd function and a ``torch.library.custom_op``, whose host time
    the first blocks of a run, where the CPU barely keeps ahead of the GPU, cannot spare. An op
    without those arguments (another version) is not used."""
    for extension, namespace in FLASH_ATTENTION_3_OPS:
        try:
            importlib.import_module(extension)
        except (ImportError, OSError):
            continue
        forward = getattr(torch.ops, namespace).fwd
        if not {"softmax_scale", "num_splits"} <= {arg.name for arg in forward.default._schema.arguments}:
            continue

        def flash_attention_3(q, k, v, return_lse=False):
            out, lse = forward(q, k, v, softmax_scale=q.shape[-1] ** -0.5, num_splits=1)[:2]
            return out, (lse if return_lse else None)

        return flash_attention_3
    return None


def flash_attention_4():
    """FlashAttention-4's forward, ``f(q, k, v, return_lse) -> (out, lse or None)``, from the optional
    package ``flash-attn-4``, or None."""
    try:
        from flash_attn.cute import flash_attn_func
    except (ImportError, OSError):
        return None

    def flash_attention_4(q, k, v, return_lse=False):
        return flash_attn_func(q, k, v, return_lse=return_lse)

    return flash_attention_4


def flash_attention(major, dtype, head_dim):
    """The fastest installed FlashAttention forward for a GPU of compute capability ``major`` and
    tensors of ``dtype`` with ``head_dim`` (a multiple of 8): FlashAttention-3 on Hopper for bf16 (a
    little faster there, and its kernels ship built where FlashAttention-4 compiles them at first use;
    ``fa3-fwd`` is built without fp16), FlashAttention-4 on Hopper (head sizes up to 256) and
    Blackwell (up to 128); None where neither runs."""
    if head_dim % 8 or dtype not in (torch.bfloat16, torch.float16):
        return None
    found = None
    if major == 9 and dtype == torch.bfloat16 and head_dim <= 256:
        found = flash_attention_3()
    if found is None and head_dim <= {9: 256, 10: 128}.get(major, 0):
        found = flash_attention_4()
    return found


@functools.cache
def fast_attention_kernel(device, dtype, head_dim, merge=None):
    """The attention kernel of fast mode for tensors on ``device`` of ``dtype`` with ``head_dim``:
    ``flash_attention``'s choice where one is installed and runs, else ``sdpa``. Both take and return
    [B, L, N, D]; FlashAttention needs no transposes and is faster than torch's cuDNN attention on the
    self-attention shapes here. ``merge``: ``merge_key_splits`` (compiled or not); given, on Hopper a
    single video whose query tiles leave the last wave of SMs mostly idle (``split_keys_pays``) attends
    to the two halves of its keys as a batch of two in one launch, and the halves are merged."""
    if device.type != "cuda":
        return sdpa
    major = torch.cuda.get_device_capability(device)[0]
    flash = flash_attention(major, dtype, head_dim)
    if flash is None:
        return sdpa
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = merge is not None and major == 9

    def kernel(q, k, v):
        if not (splits and halves_pay(q, k, v)):
            return flash(q, k, v)[0]
        halves = (2, k.shape[1] // 2, *k.shape[2:])  # [1, Lk, N, D] -> [2, Lk/2, N, D], a view
        out, lse = flash(q.expand(2, -1, -1, -1), k.view(halves), v.view(halves), return_lse=True)
        return merge(out, lse)

    def halves_pay(q, k, v):
        batch, keys = k.shape[:2]
        return (batch == 1 and keys % 2 == 0 and k.is_contiguous() and v.is_contiguous()
                and split_keys_pays(batch, q.shape[1], q.shape[2], keys, sms))

    kernel.__name__ = flash.__name__
    return kernel


def attention(q, k, v, kernel=sdpa):
    """Self-attention without mask over the cached keys. q: [B, Lq, N, D], k and v: [B, Lk, N, D] ->
    [B, Lq, N, D]. ``kernel``: ``sdpa`` (exact mode) or ``fast_attention_kernel(...)``. (Cross-attention
    to the text calls ``sdpa`` itself.)"""
    return kernel(q, k, v)


@dataclass
class CapturedCall:
    """One recorded self-attention call: its layer, its pass labels (block, step, timestep), the video
    frame of each of its key frames and, while kept, its q and k. ``key_positions``: when the cache
    labels its tokens, (video frame, temporal RoPE frame) of each key token, int64 [B, Lk] each on the
    cache's device (they differ under Deep Sink shifts and compression; see deep_forcing.py);
    ``key_roles``: what the cache keeps each key token as, int8 [B, Lk] (utils.attention_cache.KEY_ROLES);
    ``sink_updates``: the evicted blocks an EMA sink had blended in at this call (0 for other caches)."""

    layer_idx: int
    call_idx: int
    q_shape: tuple
    k_shape: tuple
    labels: dict
    key_frames: list
    q: torch.Tensor = field(repr=False)
    k: torch.Tensor = field(repr=False)
    key_positions: tuple = field(default=None, repr=False)
    key_roles: torch.Tensor = field(default=None, repr=False)
    sink_updates: int = 0
    _started: tuple = field(default=None, repr=False)  # (frame_seq_length, summary, done event or None)

    @property
    def num_heads(self):
        return self.q_shape[2]

    def weights(self, head, rows=slice(None), logits=True):
        """Logits (or softmax probabilities over all keys) of one head, fp32: [B, rows, Lk]."""
        scores = query_key_logits(self.q, self.k, head, rows)
        return scores if logits else scores.softmax(dim=-1)

    def to_host(self, dtype=torch.float32, logits=True, frame_seq_length=None):
        """The whole [B, N, Lq, Lk] matrix in host memory, computed on the device one head and one
        block of ``frame_seq_length`` query rows (default: all) at a time. From a GPU each block goes
        through one small pinned buffer: copying straight into fresh pageable memory is about 8x
        slower (measured on an H200), and pinning the whole result costs seconds per layer."""
        B, Lq, N, _ = self.q_shape
        Lk = self.k_shape[1]
        step = frame_seq_length or Lq
        host = torch.empty((B, N, Lq, Lk), dtype=dtype)
        bounce = torch.empty((B, step, Lk), dtype=dtype, pin_memory=True) if self.q.device.type == "cuda" else None
        for head in range(N):
            for start in range(0, Lq, step):
                rows = slice(start, min(start + step, Lq))
                piece = self.weights(head, rows, logits).to(dtype)  # [B, rows, Lk], on the device
                if bounce is not None:
                    piece = bounce[:, : piece.shape[1]].copy_(piece)
                host[:, head, rows] = piece
        return host

    def start_summary(self, frame_seq_length, stream=None):
        """Queue the summary's kernels now: on ``stream`` (a CUDA stream of q's device, after the work
        that made q and k on the current stream), or at once without one."""
        if stream is None:
            self._started = (frame_seq_length, summarize_qk(self.q, self.k, frame_seq_length), None)
            return
        stream.wait_stream(torch.cuda.current_stream(self.q.device))
        with torch.cuda.stream(stream):
            summary = summarize_qk(self.q, self.k, frame_seq_length)
            done = stream.record_event()
        self.q.record_stream(stream)
        self.k.record_stream(stream)
        self._started = (frame_seq_length, summary, done)

    def summary(self, frame_seq_length):
        """Figure 4 reductions of the exact logits (``utils.attention_stats.summarize_qk``): the one
        started by ``start_summary`` if any, else computed now. Waits for the device."""
        if self._started is None or self._started[0] != frame_seq_length:
            self.start_summary(frame_seq_length)
        _, summary, done = self._started
        if done is not None:
            reader = torch.cuda.current_stream(self.q.device)
            reader.wait_event(done)
            for tensor in summary.values():
                tensor.record_stream(reader)
        return exact_means(summary, self.q, self.k, frame_seq_length)


class AttentionWeightCapture:
    """The observer that keeps the chosen calls (see the module docstring). The model calls
    ``begin_forward`` and ``observe``; the pipeline ``wants`` and ``annotate``; a run ``enable``,
    ``kept_calls`` and ``disable``."""

    def __init__(self):
        self.enabled = False
        self._stream = None  # the side stream summaries run on (CUDA), made at the first one
        self._clear()

    def _clear(self):
        self.layer_indices = None  # requested layers in the order given, or None for every layer
        self._wanted_layers = None
        self.num_layers = None
        self.passes = ()
        self.blocks = ()
        self.current_layer_idx = 0  # self-attention calls seen since enable(), every layer
        self.calls_seen = 0  # of those, calls of a requested layer in a labelled forward
        self.labels = None  # the current forward's pass labels, set by the pipeline
        self._selected = []  # the (block, step, timestep) places of the current forward that are kept
        self._kept = {}  # (layer, block, pass) -> CapturedCall
        self._summarize = None  # frame_seq_length: start each kept call's summary when it is kept

    def enable(self, layer_indices=None, num_layers=None, passes=(0,), blocks=(LAST_BLOCK,), summarize=None):
        """Start capturing the calls of ``passes`` of ``blocks`` for ``layer_indices`` (None: every
        layer); ``num_layers``, when given, is checked against the model's block count at its first
        forward. ``summarize``: the frame_seq_length with which each kept call's summary starts as
        soon as it is kept (on a second stream on CUDA, see the module docstring); None: when asked."""
        if summarize is not None and (isinstance(summarize, bool) or not isinstance(summarize, int) or summarize < 1):
            raise ValueError(f"summarize must be a frame_seq_length (a positive int) or None, got {summarize!r}")
        bad = [p for p in passes if not is_pass(p)]
        if bad:
            raise ValueError(f"passes must be pass indices >= 0 or 'cache', got {bad}")
        bad = [b for b in blocks if not is_block(b)]
        if bad:
            raise ValueError(f"blocks must be block indices >= 0 or 'last', got {bad}")
        self._clear()
        if layer_indices is not None:
            layer_indices = [int(i) for i in layer_indices]
            if len(set(layer_indices)) != len(layer_indices):
                raise ValueError(f"layer indices {layer_indices} repeat a layer")
        self.layer_indices = layer_indices
        self._wanted_layers = None if layer_indices is None else frozenset(layer_indices)
        self.passes = tuple(sorted(set(passes), key=pass_order))
        self.blocks = tuple(blocks)
        self._summarize = summarize
        if num_layers is not None:
            self._check_layers(num_layers)
            self.num_layers = num_layers
        self.enabled = True

    def disable(self):
        """Stop capturing and drop everything captured."""
        self.enabled = False
        self._clear()

    def _check_layers(self, num_layers):
        bad = sorted(i for i in (self.layer_indices or ()) if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"layer indices {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")

    def begin_forward(self, num_layers):
        """Called by the model at the start of each forward while enabled. The model of a labelled
        forward (the pipeline's) is the one captured: its layer count is checked; other models'
        forwards in the same process are not."""
        if self.labels is None:
            return
        if self.num_layers is None:
            self._check_layers(num_layers)
            self.num_layers = num_layers
        elif num_layers != self.num_layers:
            raise ValueError(f"enable(num_layers={self.num_layers}) but the model has {num_layers} layers")

    def annotate(self, **labels):
        """Pass labels of the forward about to run: block, num_blocks, step (0.. or 'cache'),
        timestep; or, for a call over several blocks (the rolling loop, pipeline/rolling_inference.py),
        num_blocks and ``places``, the (block, step, timestep) of each block in it, the call being kept
        under each wanted one, plus its own labels (window, query frames and levels). ``annotate()``
        with none clears them: calls outside a labelled forward are not kept."""
        self.labels = labels or None
        if self.labels is None:
            self._selected = []
            return
        places = labels.get("places") or ((labels["block"], labels["step"], labels["timestep"]),)
        self._selected = [place for place in places if self.wants(place[0], labels["num_blocks"], place[1])]

    def wants(self, block, num_blocks, step):
        """Whether a forward with these pass labels keeps its calls (False while disabled)."""
        return self.enabled and block_wanted(block, num_blocks, self.blocks) and step in self.passes

    def observe(self, layer_idx, q, k, kv_cache=None):
        """Record one self-attention call of transformer block ``layer_idx`` (q: [B, Lq, N, D],
        k: [B, Lk, N, D]). Shapes and labels are Python values: nothing here waits for the device."""
        call_idx = self.current_layer_idx
        self.current_layer_idx += 1
        if self.labels is None or (self._wanted_layers is not None and layer_idx not in self._wanted_layers):
            return
        self.calls_seen += 1
        if self._selected:
            # q is a fresh tensor nobody writes to again; k is a view of the KV cache, which later
            # passes overwrite, so it is copied. A place seen again (a repeated level) keeps its last call.
            # The places of one call share its q, k and summary (one summary per call, not per place).
            k, frames, positions = k.clone(), _key_frames(kv_cache), _key_positions(kv_cache)
            roles, sink_updates = _key_roles(kv_cache), _sink_updates(kv_cache)
            shared = {key: value for key, value in self.labels.items() if key != "places"}
            started = None
            for block, step, timestep in self._selected:
                labels = {**shared, "block": block, "step": step, "timestep": timestep}
                call = CapturedCall(layer_idx, call_idx, tuple(q.shape), tuple(k.shape), labels, frames, q, k, positions,
                                    roles, sink_updates, _started=started)
                self._kept[layer_idx, block, step] = call
                if self._summarize is not None and started is None:
                    call.start_summary(self._summarize, self._side_stream(q.device))
                    started = call._started

    def _side_stream(self, device):
        """The stream summaries run on (one per capture, on q's CUDA device); None on other devices."""
        if device.type != "cuda":
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _layer_position(self, layer_idx):
        return layer_idx if self.layer_indices is None else self.layer_indices.index(layer_idx)

    @property
    def kept_calls(self):
        """The kept ``CapturedCall``s, in the order of the requested layers, then by block, then by pass."""
        return sorted(self._kept.values(),
                      key=lambda r: (self._layer_position(r.layer_idx), r.labels["block"], pass_order(r.labels["step"])))

    @property
    def calls_kept(self):
        return len(self._kept)


def _key_frames(kv_cache):
    """The video frame of each key frame of a call: the cache knows; None without one."""
    return kv_cache.key_frames() if kv_cache is not None else None


def _key_positions(kv_cache):
    """(video frame, temporal RoPE frame) of each key token: the cache knows; None without one."""
    return kv_cache.key_positions() if kv_cache is not None else None


def _key_roles(kv_cache):
    """What the cache keeps each key token as (sink, top-C, ...): the cache knows; None without one."""
    return kv_cache.key_roles() if kv_cache is not None else None


def _sink_updates(kv_cache):
    """Evicted blocks blended into the cache's EMA sink so far (Reward Forcing's); 0 for a cache without one."""
    return getattr(kv_cache, "sink_updates", 0)


ATTENTION_WEIGHT_CAPTURE = AttentionWeightCapture()
