"""Infinite-Forcing's V-sink (SOTAMak1r/Infinite-Forcing @ b8feaf5): Self-Forcing's window of W =
``local_attn_size`` frames whose first S = ``sink_size`` frames stay (the release: 6 and 1), with the
keys stored without RoPE and rotated at every read: slot j at temporal position j, the queries at the
last frames (21 frames, the last block: frame 0 at 0, 16-17 at 1-2, 18-20 at 3-5). The V-sink is the
first S frames of the video; the release's random choice of one sink frame cannot run at inference
(see wan/modules/infinite_forcing.py), so no random number is drawn. The cache:
``wan.modules.infinite_forcing.RawKeyCache``."""
from wan.cache_policies.window import WINDOW_OPTIONS, Window


class InfiniteForcing(Window):
    """The window's settings; keys rotated at read."""

    name = "infinite_forcing"
    options = WINDOW_OPTIONS

    def describe(self):
        s = self.settings
        return (f"infinite_forcing: the last {s['local_attn_size']} frames, the first {s['sink_size']} kept as a "
                f"sink, keys rotated at read at positions 0..{s['local_attn_size'] - 1}")

    def new_cache(self, layout):
        from wan.modules.infinite_forcing import RawKeyCache

        s = self.settings
        return RawKeyCache(layout.batch, s["local_attn_size"], layout.frame_seq_length, layout.num_heads,
                           layout.head_dim, s["sink_size"], layout.dtype, layout.device)
