"""Deep Forcing's Participative Compression (arXiv 2512.05081, as its code release does it): Deep Sink's
sink in a W = ``local_attn_size`` frame buffer; a block that does not fit triggers, on its first pass,
a per-layer compression to N = ``budget`` frames: the S = ``sink_size`` sink frames, the top-C tokens
by the logits of the last R = ``recent`` frames of queries, and the last R frames, with a token
selected ``topc_max_reuse`` times no longer a candidate. The cache:
``wan.modules.deep_forcing.ParticipativeCompressionCache`` (its docstring lists where the release and
the paper differ)."""
from wan.cache_policies.base import Option, positive_int
from wan.cache_policies.window import WINDOW_OPTIONS, Window


def _frames(value, settings, per_block):
    return None if positive_int(value) else "a positive int (frames)"


def _recent(value, settings, per_block):
    if positive_int(value) and value >= per_block:
        return None
    return (f"an int >= num_frame_per_block ({per_block}): the recent frames include the block being generated")


class ParticipativeCompression(Window):
    """The window's settings, and the compression's."""

    name = "participative_compression"
    options = {
        **WINDOW_OPTIONS,
        "budget": Option(None, _frames),
        "recent": Option(None, _recent),
        "topc_max_reuse": Option(7, lambda value, settings, per_block: None if positive_int(value) else "a positive int"),
    }

    @classmethod
    def check(cls, settings, per_block):
        s = settings
        if not s["sink_size"] + s["recent"] <= s["budget"] <= s["local_attn_size"]:
            return "budget", (f"sink_size + recent <= budget <= local_attn_size, here {s['sink_size']} + {s['recent']} "
                              f"<= budget <= {s['local_attn_size']}")
        return None

    def describe(self):
        s = self.settings
        return (f"participative_compression: a {s['local_attn_size']}-frame window compressed to {s['budget']} frames "
                f"(sink {s['sink_size']}, top-C, recent {s['recent']}; reuse cap {s['topc_max_reuse']})")

    def new_cache(self, layout):
        from wan.modules.deep_forcing import ParticipativeCompressionCache

        s = self.settings
        return ParticipativeCompressionCache(layout.batch, s["local_attn_size"], layout.frame_seq_length, layout.num_heads,
                                             layout.head_dim, s["sink_size"], layout.dtype, layout.device, layout.rope,
                                             s["budget"], s["recent"], s["topc_max_reuse"])
