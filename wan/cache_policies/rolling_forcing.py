"""Rolling Forcing's cache (TencentARC/RollingForcing, wan/modules/causal_model.py): every call writes
one block, the first of its input; the first block of the video is an anchor stored before RoPE and
rotated when read; a call attends to at most ``attention_size`` = A frames (the release: 21) out of a
cache of ``cache_size`` = C frames (24), evicting FIFO after the anchor. The release hard-codes both
sizes (``local_attn_size`` and ``sink_size`` of its config are not read). The cache:
``wan.modules.rolling_forcing.RollingCache``, whose docstring gives the reads of each kind of call.
"""
from wan.cache_policies.base import CachePolicy, Option, positive_int


def _frames(what, smallest):
    def check(value, settings, per_block):
        least = smallest(settings, per_block)
        if positive_int(value) and value % per_block == 0 and value >= least:
            return None
        return f"a multiple of num_frame_per_block ({per_block}) >= {least}: {what}"

    return check


class RollingForcing(CachePolicy):
    name = "rolling_forcing"
    pipeline = "rolling"  # its cache calls are told apart (``set_cache_pass``) by the rolling loop only
    options = {
        "attention_size": Option(21, _frames("the frames one call attends to: the anchor block and at least one more",
                                             lambda settings, per_block: 2 * per_block)),
        "cache_size": Option(24, _frames("the frames the cache holds: at least attention_size (the cache pass reads "
                                         "that many)", lambda settings, per_block: settings["attention_size"]
                                         if positive_int(settings["attention_size"]) else per_block)),
    }

    def __init__(self, per_block=1, **settings):
        super().__init__(per_block, **settings)
        self.per_block = per_block

    def cache_frames(self, num_frames):
        return self.settings["cache_size"]

    def describe(self):
        s = self.settings
        return (f"rolling_forcing: one block written per call into {s['cache_size']} frames; the first block kept as an "
                f"anchor before RoPE, rotated next to the keys read; at most {s['attention_size']} frames attended")

    def new_cache(self, layout):
        from wan.modules.rolling_forcing import RollingCache

        s = self.settings
        return RollingCache(layout.batch, s["cache_size"], layout.frame_seq_length, layout.num_heads, layout.head_dim,
                            self.per_block, s["attention_size"], layout.dtype, layout.device)
