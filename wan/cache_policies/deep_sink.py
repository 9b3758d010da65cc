"""Deep Forcing's Deep Sink (arXiv 2512.05081, as its code release does it): Self-Forcing's window of W
= ``local_attn_size`` frames with S = ``sink_size`` sink frames, whose keys are moved in time on every
evicting pass so that sink frame i sits at temporal RoPE position cs - W + i (cs: the first frame of the
block being written). The cache: ``wan.modules.deep_forcing.DeepSinkCache``."""
from wan.cache_policies.window import Window


class DeepSink(Window):
    """Self-Forcing's window and sink settings; the sink moves in time."""

    name = "deep_sink"

    def describe(self):
        s = self.settings
        return (f"deep_sink: a {s['local_attn_size']}-frame window whose first {s['sink_size']} frames are a sink "
                "moved in time to just before the window")

    def new_cache(self, layout):
        from wan.modules.deep_forcing import DeepSinkCache

        return DeepSinkCache(layout.batch, self.settings["local_attn_size"], layout.frame_seq_length, layout.num_heads,
                             layout.head_dim, self.settings["sink_size"], layout.dtype, layout.device, layout.rope)
