"""Reward Forcing's EMA sink (JaydenLyh/Reward-Forcing @ 4317f5a): a window of W = ``local_attn_size``
frames whose first S = ``sink_size`` frames (the release: 9 and 3) blend in each block the window
evicts (α = ``SINK_ALPHA``), keys stored without RoPE and rotated at every read at positions
0..W-1 (21 frames, the last block: the sink at 0-2 after 4 blends of frames 3-14, 15-17 at 3-5,
18-20 at 6-8).
``ema_precision``: "release" (default) blends in the cache's dtype as the release does; "float32"
keeps an fp32 sink (not the release's arithmetic). The cache:
``wan.modules.reward_forcing.EmaSinkCache``."""
from wan.cache_policies.base import Option, is_int
from wan.cache_policies.window import WINDOW_OPTIONS, Window

EMA_PRECISIONS = ("release", "float32")
SINK_ALPHA = 0.999  # the release's compression_alpha (its attention never passes another)


def ema_sink_size(value, settings, per_block):
    """The check of ``sink_size``: one block, the frames each eviction blends in."""
    if is_int(value) and value == per_block:
        return None
    return (f"an int equal to num_frame_per_block ({per_block}): each eviction drops one block and the release "
            "blends it frame by frame into the sink only when the two have the same size")


def ema_window_size(value, settings, per_block):
    """The check of ``local_attn_size``: the window's and a whole number of blocks after the sink."""
    expected = WINDOW_OPTIONS["local_attn_size"].check(value, settings, per_block)
    sink = settings["sink_size"]
    if expected is not None or not is_int(sink) or (value - sink) % per_block == 0:
        return expected
    return f"sink_size + a multiple of num_frame_per_block ({per_block}), so that every eviction drops one whole block"


class RewardForcing(Window):
    """The window's settings, the sink one block long, and the EMA's arithmetic."""

    name = "reward_forcing"
    options = {
        "sink_size": Option(None, ema_sink_size),  # checked first: the window's check reads it
        "local_attn_size": Option(None, ema_window_size),
        "ema_precision": Option("release", lambda value, settings, per_block:
                                None if value in EMA_PRECISIONS else f"one of {list(EMA_PRECISIONS)}"),
    }

    def describe(self):
        s = self.settings
        arithmetic = "" if s["ema_precision"] == "release" else ", blended in float32 (not the release's arithmetic)"
        return (f"reward_forcing: the last {s['local_attn_size']} frames, the first {s['sink_size']} an EMA sink of "
                f"the evicted blocks (alpha {SINK_ALPHA}){arithmetic}, keys rotated at read at positions "
                f"0..{s['local_attn_size'] - 1}")

    def new_cache(self, layout):
        from wan.modules.reward_forcing import EmaSinkCache

        s = self.settings
        return EmaSinkCache(layout.batch, s["local_attn_size"], layout.frame_seq_length, layout.num_heads,
                            layout.head_dim, s["sink_size"], layout.dtype, layout.device, SINK_ALPHA, s["ema_precision"])
