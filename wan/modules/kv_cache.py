"""The self-attention KV cache of one transformer block: rotated keys and values of the frames generated
so far, with a local window and sink as upstream Self-Forcing evicts them (the cache of the global and
window policies, wan/cache_policies). wan/modules/deep_forcing.py builds Deep Forcing's caches on it."""
import torch

from utils.attention_cache import CACHED, SINK


class KVCache:
    """One transformer block's rotated keys and values, [B, frames * frame_seq_length, N, D], with
    Python-int bookkeeping.

    ``global_end`` is the token index (over the whole video) just after the last written token;
    ``local_end`` the slot just after it in this buffer; ``frames`` the video frame held by each frame
    slot of ``[0, local_end)``. Re-running the same block (the next denoising step, or the cache
    update) overwrites the same slots. When a new block does not fit, the oldest frames after the
    ``sink_frames`` first ones are evicted and the rest rolled forward (a local window,
    ``local_attn_size``), as upstream Self-Forcing does."""

    def __init__(self, batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device):
        self.frame_seq_length = frame_seq_length
        self.sink_tokens = sink_frames * frame_seq_length
        self.k = torch.zeros(batch, frames * frame_seq_length, num_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.global_end = 0
        self.local_end = 0
        self.frames = []

    def update(self, k, v, current_start, queries=None):
        """Write this block's k, v [B, L, N, D] at token offset ``current_start``; return the keys and
        values to attend to, [B, local_end, N, D] views of the buffer. ``queries``, the layer's rotated
        queries of the pass, are for caches that compress by them (wan/modules/deep_forcing.py)."""
        num_new = k.shape[1]
        current_end = current_start + num_new
        size, sink, fsl = self.k.shape[1], self.sink_tokens, self.frame_seq_length
        advance = current_end - self.global_end
        if advance > 0 and self.local_end + num_new > size:
            evicted = self.local_end + num_new - size
            kept = self.local_end - evicted - sink
            for buf in (self.k, self.v):
                buf[:, sink : sink + kept] = buf[:, sink + evicted : sink + evicted + kept].clone()
            if kept > 0:
                first = sink // fsl
                self.frames[first : first + kept // fsl] = self.frames[first + evicted // fsl : first + (evicted + kept) // fsl]
            advance -= evicted
        local_end = self.local_end + advance
        self.k[:, local_end - num_new : local_end] = k
        self.v[:, local_end - num_new : local_end] = v
        self.frames[(local_end - num_new) // fsl :] = range(current_start // fsl, current_end // fsl)
        self.global_end, self.local_end = current_end, local_end
        return self.k[:, :local_end], self.v[:, :local_end]

    def key_frames(self):
        """The video frame of each cached frame, in the order the keys are attended to."""
        return list(self.frames)

    def key_positions(self):
        """(video frame, temporal RoPE frame) of each cached token, int64 [B, local_end] each; equal
        here, since keys keep the position they were written at."""
        video = token_frames(self.frames, self.frame_seq_length, self.k.device)
        return video.expand(self.k.shape[0], -1).clone(), video.expand(self.k.shape[0], -1).clone()

    def key_roles(self):
        """What each cached token is kept as (``utils.attention_cache.KEY_ROLES``), int8 [B, local_end]:
        the first ``sink_frames`` frames are the sink, the rest plain cached keys."""
        roles = torch.full((self.k.shape[0], self.local_end), CACHED, dtype=torch.int8, device=self.k.device)
        roles[:, : self.sink_tokens] = SINK
        return roles


def token_frames(frames, frame_seq_length, device):
    """The frame of each token of ``frames`` (a list of per-slot frames), int64 [len(frames) *
    frame_seq_length] on ``device``. The host-to-device copy is queued, not waited for (a blocking copy
    would wait for every kernel queued before it, in the capture's hot path)."""
    return torch.tensor(frames).to(device, non_blocking=True).repeat_interleave(frame_seq_length)
