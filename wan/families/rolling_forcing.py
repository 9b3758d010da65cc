"""Rolling Forcing (TencentARC/RollingForcing @ a1477d0): Self-Forcing's model with other weights, a
5-step schedule and its own denoising loop and cache.

- Weights: ``checkpoints/rolling_forcing_dmd.pt``; its inference command passes ``--use_ema``, so
  ``generator_ema`` is read, with every ``_fsdp_wrapped_module.`` removed from its keys; without EMA
  the release reads ``generator`` as saved, here with the same removal (a kept difference, README).
  Loaded strictly.
- Schedule: the warped steps [1000, 800, 600, 400, 200] of a shift-5 schedule (t = 1000, 952.38,
  882.35, 769.23, 555.56), 3-frame blocks, the cache pass at t = 0.
- The loop (pipeline/rolling_inference.py): window w = 0 .. nb + L - 2 (L = 5 steps, nb blocks)
  covers blocks s = max(0, w - L + 1) .. e = min(nb - 1, w) in one bidirectional call. The window's
  timesteps are the schedule reversed, [T4, T3, T2, T1, T0] from its oldest block to its newest,
  cut to the window's length from the end in start windows (s = 0) and from the front in end
  windows. A block enters as noise at level 0 and leaves after level L - 1. After each call the
  window's blocks not at their last level are re-noised to the next level, one ``randn_like`` of
  the whole window per block, oldest first; then one cache call writes the first block's x0 (t = 0).
- With fewer than L blocks the release still selects the start windows' timesteps by the window's
  length: its blocks repeat levels and skip others (``rolling_windows`` gives them as it does).
- Cache: wan/cache_policies/rolling_forcing.py.
"""
from dataclasses import dataclass

from utils.passes import CACHE_PASS
from wan.families.base import Checkpoint, ModelFamily, Schedule, Variant


@dataclass(frozen=True)
class Window:
    """One call of the rolling loop: window ``index`` over blocks ``start`` .. ``end`` (inclusive),
    ``levels[i]`` the schedule step (0 = the noisiest) that block ``start + i`` is given."""

    index: int
    start: int
    end: int
    levels: tuple

    @property
    def blocks(self):
        return range(self.start, self.end + 1)


def rolling_windows(num_blocks, num_levels):
    """The release's windows for a video of ``num_blocks`` blocks and a schedule of ``num_levels``
    steps, in order. A full window gives its blocks levels L-1 .. 0 (oldest first); a start window
    (first block 0, shorter than L) the last entries of that list; an end window the first."""
    full = tuple(range(num_levels - 1, -1, -1))  # oldest block at the last level
    windows = []
    for index in range(num_blocks + num_levels - 1):
        start, end = max(0, index - num_levels + 1), min(num_blocks - 1, index)
        width = end - start + 1
        if width == num_levels:
            levels = full
        elif start == 0:
            levels = full[num_levels - width:]
        else:
            levels = full[:width]
        windows.append(Window(index, start, end, levels))
    return windows


@dataclass(frozen=True)
class RollingFamily(ModelFamily):
    """A family run by the rolling-window loop: each call holds a window of up to L blocks (L = the
    schedule's steps), and the pass label (block b, pass k) names the call where block b is at level k
    (pass ``"cache"``: the last cache call that writes block b)."""

    pipeline: str = "rolling"

    def call_frames(self, per_block, num_steps):
        return per_block * num_steps

    def pass_calls(self, num_blocks, num_steps):
        calls = {}
        for window in rolling_windows(num_blocks, num_steps):
            for block, level in zip(window.blocks, window.levels):
                calls[block, level] = calls.get((block, level), 0) + 1
            calls[window.start, CACHE_PASS] = calls.get((window.start, CACHE_PASS), 0) + 1
        return calls


ROLLING_FORCING = RollingFamily(
    name="rolling_forcing",
    description="Rolling Forcing DMD generator (rolling window of 5 blocks)",
    variants=(
        Variant("dmd",
                Checkpoint(default_path="checkpoints/rolling_forcing_dmd.pt", use_ema=True,
                           removed_substrings=("_fsdp_wrapped_module.",)),
                Schedule(denoising_steps=(1000, 800, 600, 400, 200), warp=True, timestep_shift=5.0, num_frame_per_block=3)),
    ),
    default_policy="rolling_forcing",
)
