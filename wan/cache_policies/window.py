"""Self-Forcing's local window: each block attends to the last ``local_attn_size`` = W cached frames, of
which the first ``sink_size`` = S frames of the video stay as a sink; when a new block does not fit,
the oldest frames after the sink are evicted and the rest rolled forward (upstream's eviction). Keys
keep the RoPE positions they were written at."""
from wan.cache_policies.base import CachePolicy, Option, is_int


def window_size(value, settings, per_block):
    """The check of ``local_attn_size`` = W: room for the sink and one block."""
    sink = settings["sink_size"]
    smallest = per_block + sink if is_int(sink) else per_block
    if is_int(value) and value >= smallest:
        return None
    return (f"an int >= num_frame_per_block + sink_size = {per_block} + {sink}: a smaller window could not hold a "
            "block next to the sink frames, and writing the block would overwrite the sink")


def sink_size(value, settings, per_block):
    """The check of ``sink_size``."""
    return None if is_int(value) and value >= 0 else "an int >= 0 (frames kept at the start of a local attention window)"


WINDOW_OPTIONS = {"local_attn_size": Option(None, window_size), "sink_size": Option(0, sink_size)}


class Window(CachePolicy):
    name = "window"
    options = WINDOW_OPTIONS

    def cache_frames(self, num_frames):
        return self.settings["local_attn_size"]

    def describe(self):
        sink = self.settings["sink_size"]
        return f"window: the last {self.settings['local_attn_size']} frames" + (f", the first {sink} kept as a sink" if sink else "")

    def new_cache(self, layout):
        from wan.modules.kv_cache import KVCache

        return KVCache(layout.batch, self.settings["local_attn_size"], layout.frame_seq_length, layout.num_heads,
                       layout.head_dim, self.settings["sink_size"], layout.dtype, layout.device)
