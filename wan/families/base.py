"""What a model family is: one release of a causal video model on Wan2.1-T2V-1.3B, described by the
files it loads, its sampling schedule and its attention-cache policy. Data only (no torch), so that a
run is planned and checked before anything heavy is imported; pipeline/wrappers.py loads what it says.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Checkpoint:
    """A release's generator checkpoint: a ``torch.save`` dict whose entry ``ema_key`` (or ``key``
    without EMA) is the state dict of the wrapped transformer (keys ``model.<transformer key>``).
    ``default_path``: where the release's inference script reads it. Read with ``weights_only=True``
    unless the user opts in."""

    default_path: str
    ema_key: str = "generator_ema"
    key: str = "generator"

    def state_dict_key(self, use_ema):
        return self.ema_key if use_ema else self.key


@dataclass(frozen=True)
class Schedule:
    """The release's sampling schedule: the denoising steps (``warp``: mapped onto the shifted
    schedule by index, see utils/scheduler.py), the flow-matching ``timestep_shift``, the latent
    frames of a block and the timestep of the clean cache-update pass."""

    denoising_steps: tuple
    warp: bool
    timestep_shift: float
    num_frame_per_block: int
    context_noise: float


@dataclass(frozen=True)
class ModelFamily:
    """``name``: the registry key; ``checkpoint``: the generator checkpoint on top of the base Wan2.1
    weights, or None; ``schedule``: the release's (its configs/ files state it); ``default_policy``: the
    cache policy its inference uses (``wan.cache_policies``)."""

    name: str
    description: str
    checkpoint: Checkpoint | None
    schedule: Schedule | None
    default_policy: str
