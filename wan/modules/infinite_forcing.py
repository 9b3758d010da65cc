"""A window cache that stores keys without RoPE and rotates them at every read (Infinite-Forcing,
SOTAMak1r/Infinite-Forcing @ b8feaf5, wan/modules/causal_model.py; Reward Forcing's cache,
wan/modules/reward_forcing.py, builds on it).

Writes and eviction are Self-Forcing's window (``KVCache``): ``sink_size`` = S frames at the front of a
``local_attn_size`` = W frame buffer stay, the rest is a FIFO that drops its oldest frames when a new
block does not fit. What differs is where RoPE is applied: the cache holds the keys as the k
projection and its norm give them, and at every read the whole buffer [sink | window], n frames, is
rotated from temporal position 0 (slot j at position j) and the pass's queries at n - f .. n - 1 (f:
the block's frames), so positions never pass W - 1 however long the video. The release reads the
window from max(S, le - W + S) (le: the slot after the last written one); le never exceeds W, so
that is S and the read is the whole buffer. Its random-sink branch (one of the S sink frames drawn
with Python's ``random``) needs le > W, which the cache size rules out at inference: the sink is
always all S frames and no random number is drawn.

The model asks the cache for the positions (``rope_starts``) and rotates in its own numerics
(``stores_raw_keys``; wan/modules/causal_model.py)."""
import torch

from wan.modules.kv_cache import KVCache, token_frames


class RawKeyCache(KVCache):
    """``KVCache``'s window holding keys without RoPE, read at positions 0..n-1 (module docstring)."""

    stores_raw_keys = True
    block_frames = 0  # frames written by the last update

    def rope_starts(self):
        """(temporal RoPE frame of the pass's first query, of the first attended key) for the last
        ``update``: the keys [0, local_end) sit at 0.. and the queries are the last of them."""
        return self.local_end // self.frame_seq_length - self.block_frames, 0

    def update(self, k, v, current_start, queries=None):
        """Write this pass's raw k, v [B, L, N, D]; return the raw keys and the values to attend to."""
        self.block_frames = k.shape[1] // self.frame_seq_length
        return super().update(k, v, current_start, queries)

    def key_positions(self):
        """(video frame, temporal RoPE frame) of each cached token, int64 [B, local_end] each: slot j
        is read at position j."""
        video = token_frames(self.frames, self.frame_seq_length, self.k.device)
        rope = torch.arange(len(self.frames), device=self.k.device).repeat_interleave(self.frame_seq_length)
        batch = self.k.shape[0]
        return video.expand(batch, -1).clone(), rope.expand(batch, -1).clone()
