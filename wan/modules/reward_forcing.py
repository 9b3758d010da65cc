"""Reward Forcing's EMA-sink cache (JaydenLyh/Reward-Forcing @ 4317f5a, wan/modules/causal_model.py).

``RawKeyCache``'s window (keys stored without RoPE, the whole buffer rotated from position 0 at every
read, the queries at its last frames), whose first S = ``sink_size`` frames blend in the frames the
FIFO evicts: on the first pass of a block that does not fit, the oldest non-sink block (frames
cs - W + S .. cs - W + 2S - 1 for cs the block's first frame, as written by their clean cache pass)
is evicted, and sink frame i becomes α · sink_i + (1 - α) · evicted_i (keys and values alike,
element-wise; the release's α = 0.999, ``wan.cache_policies.reward_forcing.SINK_ALPHA``) before the
pass attends. The policy's checks make every eviction exactly S frames (S = the block size, W - S a
multiple of it), the case the release blends; its other branch, which copies evicted frames over the
sink, never runs with them.

The blend is computed as the release computes it, in the cache's dtype, each product rounded before
the sum: in bf16, α · x rounds back to x for every x, so the sink only gains the rounded
(1 - α) · evicted term, and it drifts from the real-valued EMA. ``ema_precision`` "float32" keeps an
fp32 copy of the sink, blends there and stores the rounded result (not the release's)."""
import torch

from utils.attention_cache import EMA_SINK
from wan.modules.infinite_forcing import RawKeyCache

class EmaSinkCache(RawKeyCache):
    """``RawKeyCache`` whose sink blends each evicted block (module docstring). ``sink_updates``: the
    blends so far. ``alpha``: the sink's weight; ``ema_precision``: "release" (the cache's dtype) or "float32"."""

    def __init__(self, batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device, alpha,
                 ema_precision):
        super().__init__(batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device)
        self.alpha = alpha
        self.ema_precision = ema_precision
        self.sink_updates = 0
        self.sink_fp32 = None  # ("float32") the fp32 sink keys and values, [2, B, S * frame_seq_length, N, D]

    def update(self, k, v, current_start, queries=None):
        num_new, sink = k.shape[1], self.sink_tokens
        evicting = current_start + num_new > self.global_end and self.local_end + num_new > self.k.shape[1]
        if evicting:
            if self.local_end + num_new - self.k.shape[1] != sink:
                raise ValueError(f"an EMA sink of {sink // self.frame_seq_length} frames blends evictions of as many frames, "
                                 f"not {(self.local_end + num_new - self.k.shape[1]) // self.frame_seq_length}")
            evicted = torch.stack([self.k[:, sink : 2 * sink], self.v[:, sink : 2 * sink]])  # a copy, [2, B, S*F, N, D]
        keys, values = super().update(k, v, current_start, queries)
        if evicting:
            self._blend(evicted)
        return keys, values

    def _blend(self, evicted):
        sink = self.sink_tokens
        if self.ema_precision == "release":
            for buf, new in ((self.k, evicted[0]), (self.v, evicted[1])):
                buf[:, :sink] = self.alpha * buf[:, :sink] + (1 - self.alpha) * new
        else:
            if self.sink_fp32 is None:
                self.sink_fp32 = torch.stack([self.k[:, :sink], self.v[:, :sink]]).float()
            self.sink_fp32 = self.alpha * self.sink_fp32 + (1 - self.alpha) * evicted.float()
            self.k[:, :sink] = self.sink_fp32[0]
            self.v[:, :sink] = self.sink_fp32[1]
        self.sink_updates += 1

    def key_roles(self):
        """The first S frames are the EMA sink, the rest plain cached keys."""
        roles = super().key_roles()
        roles[:, : self.sink_tokens] = EMA_SINK
        return roles
