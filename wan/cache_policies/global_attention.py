"""Global attention (Self-Forcing's default): each block attends to every frame generated before it and
to its own frames; nothing is evicted, so the cache holds the whole video."""
from wan.cache_policies.base import CachePolicy, Option, is_int


def _no_window(value, settings, per_block):
    return None if value == -1 else "-1 (global attention); a window is attention_mode window"


def _no_sink(value, settings, per_block):
    if not (is_int(value) and value >= 0):
        return "an int >= 0 (frames kept at the start of a local attention window)"
    return None if value == 0 else "0 with global attention: a sink needs a local window (set model_kwargs.local_attn_size)"


class GlobalAttention(CachePolicy):
    name = "global"
    options = {"local_attn_size": Option(-1, _no_window), "sink_size": Option(0, _no_sink)}

    def cache_frames(self, num_frames):
        return num_frames

    def describe(self):
        return "global: every block attends to all earlier frames"

    def new_cache(self, layout):
        from wan.modules.kv_cache import KVCache

        return KVCache(layout.batch, layout.num_frames, layout.frame_seq_length, layout.num_heads, layout.head_dim, 0,
                       layout.dtype, layout.device)
