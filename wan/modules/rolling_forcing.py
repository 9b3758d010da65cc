"""Rolling Forcing's cache (TencentARC/RollingForcing @ a1477d0, wan/modules/causal_model.py), exact to
its release. Sizes below are in frames of ``frame_seq_length`` tokens: a block of P frames, the cache of
C frames, the attention limit A; a call starts at frame cs and holds Lq frames.

Writes. Every call, denoising or cache, writes the first block of its input (its first P frames) into
the cache: the slot after the last one when cs + P passes the frames written so far (then the
pointers advance; when the cache is full the oldest block after the anchor is dropped and the rest
shift down, FIFO), else the slot it wrote before (the cache call overwrites the noisy keys its
window's denoising call wrote with clean ones). The release stores keys rotated at their own frames,
except in the cache's first slot: the anchor, video frames 0 .. P-1, is stored before RoPE and
rotated when read. Here every key is stored before RoPE (``stores_raw_keys``) and the model rotates
the keys a call reads at the positions ``rope_starts`` gives: each key at the frame the release
rotated it at, the anchor where the release rotates it. The keys read always sit at consecutive
positions, so one start says it; the rotation is the same function of the same stored values, so the
keys are the release's, bit for bit.

Reads (the keys a call attends to, in order):
- a call whose block lands in the first slot (cs = 0): its own keys only;
- a cache call (``cache_pass``): the last A frames of the cache up to its own block; where they start
  at the first slot the anchor is rotated at frames 0 .. P-1, else (past A frames) it is not read;
- a denoising call: [anchor | working | its own keys], the working frames being the cached ones
  before its own block, after the anchor, as many as A - Lq - P allows; the anchor is rotated at the
  P frames just before the first working frame, whatever video frame that is.
"""
import torch

from utils.attention_cache import CACHED, SINK
from wan.modules.kv_cache import KVCache


class RollingCache(KVCache):
    """One transformer block's keys (before RoPE) and values, [B, C * frame_seq_length, N, D] (module
    docstring): ``KVCache``'s buffer, pointers and FIFO with the anchor as its sink, written one block per
    call."""

    stores_raw_keys = True

    def __init__(self, batch, frames, frame_seq_length, num_heads, head_dim, block_frames, attention_frames, dtype,
                 device):
        super().__init__(batch, frames, frame_seq_length, num_heads, head_dim, block_frames, dtype, device)
        self.block_frames = block_frames
        self.block = self.sink_tokens  # tokens of a block, and of the anchor
        self.attention = attention_frames * frame_seq_length
        self.cache_pass = False
        self.last_read = ((), ())  # (frame slots read, own frames) of the last update; labelled on demand
        self.query_start = self.key_start = 0  # temporal RoPE frames of the last read's first query and key

    def set_cache_pass(self, on):
        """Whether the next calls are cache calls (the release's ``updating_cache``)."""
        self.cache_pass = on

    def update(self, k, v, current_start, queries=None):
        """Write the first block of k (before RoPE), v [B, Lq, N, D] and return the keys (before RoPE)
        and values to attend to (module docstring)."""
        fsl = self.frame_seq_length
        first = current_start // fsl
        self.query_start = first
        # KVCache's write of the first block: a new slot when it passes the frames written so far (the
        # oldest block after the anchor evicted when full), else the slot written before.
        super().update(k[:, : self.block], v[:, : self.block], current_start)
        slot = self.local_end - self.block
        if slot == 0:
            self.key_start = first
            self.last_read = ((), range(first, first + k.shape[1] // fsl))
            return k, v
        if self.cache_pass:
            return self._cache_read(self.local_end)
        return self._denoising_read(k, v, slot, first)

    def rope_starts(self):
        """(temporal RoPE frame of the last read's first query, of its first key): its keys sit at
        consecutive frames from there."""
        return self.query_start, self.key_start

    def _cache_read(self, end):
        start = max(0, end - self.attention)
        slots = range(start // self.frame_seq_length, end // self.frame_seq_length)
        self.key_start = self.frames[slots[0]]  # the anchor at 0 .. P-1 when read; the others at their frames
        self.last_read = (slots, ())
        return self.k[:, start:end], self.v[:, start:end]

    def _denoising_read(self, k, v, slot, first):
        fsl = self.frame_seq_length
        room = self.attention - k.shape[1] - self.block  # tokens left for working frames
        if room < 0:
            raise ValueError(f"a call of {k.shape[1] // fsl} frames and the {self.block_frames}-frame anchor exceed "
                             f"the {self.attention // fsl} frames a call may attend to (attention_size)")
        start = max(self.block, slot - room)
        working = (slot - start) // fsl
        self.key_start = first - working - self.block_frames  # the anchor just before the working frames
        keys = torch.cat([self.k[:, : self.block], self.k[:, start:slot], k], dim=1)  # [B, (P + working + Lq) * F, N, D]
        values = torch.cat([self.v[:, : self.block], self.v[:, start:slot], v], dim=1)
        slots = (*range(self.block_frames), *range(start // fsl, slot // fsl))  # the anchor, the working frames
        self.last_read = (slots, range(first, first + k.shape[1] // fsl))
        return keys, values

    def read_labels(self):
        """(video frame, temporal RoPE frame, role) of each key frame the last update returned: the
        cached slots it read (the anchor's tokens are the sink), then its own frames, at consecutive
        RoPE frames from ``key_start``."""
        slots, own = self.last_read
        read = [(self.frames[j], SINK if j < self.block_frames else CACHED) for j in slots] + [(f, CACHED) for f in own]
        return [(video, self.key_start + i, role) for i, (video, role) in enumerate(read)]

    def key_frames(self):
        """The video frame of each key frame the last update returned, in order."""
        return [video for video, _, _ in self.read_labels()]

    def _per_token(self, column, dtype):
        values = torch.tensor([entry[column] for entry in self.read_labels()], dtype=dtype)
        values = values.to(self.k.device, non_blocking=True).repeat_interleave(self.frame_seq_length)
        return values.expand(self.k.shape[0], -1).clone()

    def key_positions(self):
        """(video frame, temporal RoPE frame) of each key token the last update returned, int64 [B, Lk] each."""
        return self._per_token(0, torch.int64), self._per_token(1, torch.int64)

    def key_roles(self):
        """The anchor's tokens are the sink, the rest plain cached keys: int8 [B, Lk]."""
        return self._per_token(2, torch.int8)
