"""Attention, and the opt-in capture of self-attention logits.

Every attention call of the causal model goes through ``attention``. With the capture off it is one
flag check and torch's scaled-dot-product attention. With it on, self-attention calls are counted
over the whole inference (call ``c`` belongs to transformer block ``c % num_layers``) and the calls
of the requested layers are recorded. The capture only reads q and k; the attention output is the
same computation either way, so a run with capture on gives bit-identical latents.

Two keep policies:
- ``keep="all"`` copies every matching call's [B, N, Lq, Lk] fp32 matrix to the host as it happens
  (waiting for the device each time). Fine for tiny models; at full size one last-block call is
  1.84e9 elements (7.4 GB in fp32) and a 21-frame run has 35 calls per layer, so hundreds of GB.
- ``keep="largest_k"`` keeps, per layer, only the ``keep_pass``-th call among those with the largest
  key length seen (``keep_pass=0``: the first, as a stable sort by descending K would pick), holding
  just that call's q and a copy of its keys on the device (about 115 MB per layer at full size).
  Logits are computed from them only when asked, one (head, query frame) tile at a time.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils.attention_stats import summarize_logits


def attention(q, k, v, self_attention=False):
    """Softmax attention without mask. q: [B, Lq, N, D], k and v: [B, Lk, N, D] -> [B, Lq, N, D].

    ``self_attention`` marks the calls the capture may record (cross-attention never is).
    """
    if self_attention and ATTENTION_WEIGHT_CAPTURE.enabled:
        ATTENTION_WEIGHT_CAPTURE.observe(q, k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_logits(q, k, head, rows=slice(None)):
    """Pre-softmax logits (q . k^T) / sqrt(D) of one head in fp32: [B, len(rows), Lk]."""
    scale = q.shape[-1] ** -0.5
    return torch.einsum("bqd,bkd->bqk", q[:, rows, head].float(), k[:, :, head].float()) * scale


@dataclass
class CapturedCall:
    """One recorded self-attention call: its place in the run and, while kept, its q and k."""

    layer_idx: int
    call_idx: int
    q_shape: tuple
    k_shape: tuple
    labels: dict
    q: torch.Tensor = field(repr=False)
    k: torch.Tensor = field(repr=False)

    @property
    def num_heads(self):
        return self.q_shape[2]

    def weights(self, head, rows=slice(None), logits=True):
        """Logits (or softmax probabilities over all keys) of one head, fp32: [B, rows, Lk]."""
        scores = attention_logits(self.q, self.k, head, rows)
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

    def summary(self, frame_seq_length):
        """Figure 4 reductions from exact fp32 logits (see ``utils.attention_stats``)."""
        num_query_frames = self.q_shape[1] // frame_seq_length

        def tile(head, frame):
            return self.weights(head, slice(frame * frame_seq_length, (frame + 1) * frame_seq_length))

        return summarize_logits(tile, self.num_heads, num_query_frames, frame_seq_length)


class AttentionWeightCapture:
    """Global switch and store for self-attention captures (see the module docstring)."""

    def __init__(self):
        self.enabled = False
        self._clear()

    def _clear(self):
        self.layer_indices = None
        self.capture_logits = True
        self.num_layers = None
        self.keep = "all"
        self.keep_pass = 0
        self.current_layer_idx = 0  # self-attention calls seen since enable()
        self.calls_seen = 0  # of those, calls of a requested layer
        self.labels = {}
        self._records = []  # keep="all": dicts in call order
        self._kept = {}  # keep="largest_k": layer -> CapturedCall
        self._largest = {}  # keep="largest_k": layer -> (largest Lk seen, calls seen with it)
        self._materialized = None

    def enable(self, layer_indices=None, capture_logits=True, num_layers=None, keep="all", keep_pass=0):
        """Start capturing. ``layer_indices=None`` captures every layer; ``num_layers=None`` takes the
        model's block count at its first forward."""
        if keep not in ("all", "largest_k"):
            raise ValueError(f"keep must be 'all' or 'largest_k', got {keep!r}")
        self._clear()
        self.layer_indices = None if layer_indices is None else frozenset(int(i) for i in layer_indices)
        self.capture_logits = capture_logits
        self.keep = keep
        self.keep_pass = keep_pass
        self.enabled = True
        if num_layers is not None:
            self._set_num_layers(num_layers)

    def disable(self):
        """Stop capturing and drop everything captured."""
        self.enabled = False
        self._clear()

    def _set_num_layers(self, num_layers):
        bad = sorted(i for i in (self.layer_indices or ()) if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"layer indices {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        self.num_layers = num_layers

    def begin_forward(self, num_layers):
        """Called by the model at the start of each forward while enabled."""
        if self.num_layers is None:
            self._set_num_layers(num_layers)

    def annotate(self, **labels):
        """Labels (block, pass, timestep, ...) attached to the calls recorded from now on."""
        self.labels = labels

    def observe(self, q, k):
        """Record one self-attention call (q: [B, Lq, N, D], k: [B, Lk, N, D]). Shapes are Python
        ints: nothing here waits for the device."""
        if self.num_layers is None:
            raise RuntimeError("ATTENTION_WEIGHT_CAPTURE: num_layers unknown; pass it to enable()")
        call_idx = self.current_layer_idx
        self.current_layer_idx += 1
        layer = call_idx % self.num_layers
        if self.layer_indices is not None and layer not in self.layer_indices:
            return
        self.calls_seen += 1
        self._materialized = None
        if self.keep == "all":
            record = CapturedCall(layer, call_idx, tuple(q.shape), tuple(k.shape), dict(self.labels), q, k)
            self._records.append(self._as_dict(record, record.to_host(logits=self.capture_logits)))
            return
        k_len = k.shape[1]
        largest, count = self._largest.get(layer, (-1, 0))
        if k_len > largest:
            largest, count = k_len, 0
            self._kept.pop(layer, None)
        if k_len == largest:
            if count == self.keep_pass:
                # q is a fresh tensor nobody writes to again; k is a view of the KV cache, which later
                # passes overwrite, so it is copied.
                self._kept[layer] = CapturedCall(
                    layer, call_idx, tuple(q.shape), tuple(k.shape), dict(self.labels), q, k.clone()
                )
            self._largest[layer] = (largest, count + 1)

    def _as_dict(self, record, weights):
        return {
            "layer_idx": record.layer_idx,
            "call_idx": record.call_idx,
            "attn_weights": weights,
            "is_logits": self.capture_logits,
            "q_shape": torch.Size(record.q_shape),
            "k_shape": torch.Size(record.k_shape),
            **record.labels,
        }

    @property
    def kept_calls(self):
        """keep="largest_k": the kept ``CapturedCall`` per layer, in call order."""
        return sorted(self._kept.values(), key=lambda r: r.call_idx)

    @property
    def captured_weights(self):
        """Captured calls as dicts in call order, each with 'attn_weights' [B, N, Lq, Lk] fp32 on the
        host. With keep="largest_k" the matrices are computed on first access."""
        if self.keep == "all":
            return self._records
        if self._materialized is None:
            self._materialized = [self._as_dict(r, r.to_host(logits=self.capture_logits)) for r in self.kept_calls]
        return self._materialized

    @property
    def calls_kept(self):
        return len(self._records) if self.keep == "all" else len(self._kept)


ATTENTION_WEIGHT_CAPTURE = AttentionWeightCapture()
