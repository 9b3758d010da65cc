"""LongLive's cache (NVlabs/LongLive 1.0): Self-Forcing's window of W = ``local_attn_size`` frames whose
first S = ``sink_size`` frames are a sink (the release: 12 and 3), and on a prompt switch the KV recache
of the last W frames with the new prompt, keeping the sink when ``global_sink`` (the release's
interactive config) and re-encoding it too otherwise (the release's default). The cache:
``wan.modules.longlive.LongLiveCache``.

The release applies each pass's writes after all layers ran and keeps the cache still during a block's
later passes; each layer reads only its own cache, so the keys are those of writing at once, as here.
"""
from wan.cache_policies.base import Option
from wan.cache_policies.window import WINDOW_OPTIONS, Window


class LongLive(Window):
    """The window's settings, and whether a prompt switch keeps the sink."""

    name = "longlive"
    options = {**WINDOW_OPTIONS, "global_sink": Option(False, lambda value, settings, per_block:
                                                       None if isinstance(value, bool) else "true or false")}

    def recache_frames(self):
        """Frames re-encoded with the new prompt after a prompt switch: the window's."""
        return self.settings["local_attn_size"]

    def describe(self):
        s = self.settings
        kept = "kept" if s["global_sink"] else "re-encoded too"
        return (f"longlive: the last {s['local_attn_size']} frames, the first {s['sink_size']} kept as a sink; on a "
                f"prompt switch the window is re-encoded with the new prompt, the sink {kept}")

    def new_cache(self, layout):
        from wan.modules.longlive import LongLiveCache

        s = self.settings
        return LongLiveCache(layout.batch, s["local_attn_size"], layout.frame_seq_length, layout.num_heads, layout.head_dim,
                             s["sink_size"], layout.dtype, layout.device, s["global_sink"])
