"""A head's class from its mean softmax masses, and the thresholds that decide it (no torch: the report's
arguments are checked against these before anything heavy is imported; utils/head_analysis.py computes
the masses)."""
from dataclasses import dataclass

HEAD_CLASSES = ("sink", "local", "spread")


@dataclass(frozen=True)
class HeadThresholds:
    """The classification's thresholds, on a head's mean mass (0 < each <= 1), and ``sink_frames``, the
    video frames taken as the sink where the cache policy labels none."""

    sink: float = 0.5
    local: float = 0.8
    sink_frames: int = 1

    def __post_init__(self):
        for name in ("sink", "local"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"{name} threshold {value!r}: expected a number in (0, 1]")
        if not (isinstance(self.sink_frames, int) and self.sink_frames >= 1):
            raise ValueError(f"sink_frames {self.sink_frames!r}: expected an int >= 1")

    def describe(self):
        return (f"sink head: mean mass on the sink frames >= {self.sink:g}; else local head: mean mass on the current "
                f"block >= {self.local:g}; else spread head. Sink frames: the cache policy's sink where it has one, "
                f"else the first {self.sink_frames} video frame(s) before the query block.")

    def classify(self, sink, current):
        """Classes (HEAD_CLASSES names) of heads with these mean masses ([N] each)."""
        return [HEAD_CLASSES[0] if s >= self.sink else HEAD_CLASSES[1] if c >= self.local else HEAD_CLASSES[2]
                for s, c in zip(sink.tolist(), current.tolist())]
