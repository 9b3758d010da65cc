"""LongLive's cache (NVlabs/LongLive, wan/modules/causal_model.py and pipeline/interactive_causal_inference.py):
Self-Forcing's window with a sink, plus the KV recache that follows a prompt switch.

On a switch at block start cs, the pipeline runs one clean pass (t = 0) with the new prompt over the
last n = min(W, cs) generated latent frames, cs - n .. cs - 1, at their own positions, with the cache
in recache mode (``begin_recache``): the pass's keys and values go straight into the cache's first n
frame slots, the write pointers stay where they are, and the pass attends to the slots it filled,
without a causal mask. With ``global_sink`` the sink slots keep the keys they hold (written with the
old prompt) and the new keys of frames cs - n .. cs - n + S - 1 are dropped; without it the whole
cache is cleared first and the sink becomes those re-encoded frames, until the next switch.
"""
from wan.modules.kv_cache import KVCache


class LongLiveCache(KVCache):
    """``KVCache`` with LongLive's recache (module docstring). ``global_sink``: keep the sink on a switch."""

    def __init__(self, batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device, global_sink):
        super().__init__(batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device)
        self.global_sink = global_sink
        self.recaching = False

    def begin_recache(self):
        """The next passes re-encode the last frames with a new prompt (until ``end_recache``)."""
        if not self.global_sink:
            self.k.zero_()
            self.v.zero_()
        self.recaching = True

    def end_recache(self):
        self.recaching = False

    def update(self, k, v, current_start, queries=None):
        if not self.recaching:
            return super().update(k, v, current_start, queries)
        num_new, fsl = k.shape[1], self.frame_seq_length
        kept = self.sink_tokens if self.global_sink else 0  # slots that keep their keys
        self.k[:, kept:num_new] = k[:, kept:]
        self.v[:, kept:num_new] = v[:, kept:]
        self.frames[kept // fsl : num_new // fsl] = range((current_start + kept) // fsl, (current_start + num_new) // fsl)
        return self.k[:, :num_new], self.v[:, :num_new]
