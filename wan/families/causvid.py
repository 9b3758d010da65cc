"""CausVid (tianweiy/CausVid): the causal Wan2.1-T2V-1.3B generator that Self-Forcing descends from,
with the same model and cache, other weights and another schedule.

- Checkpoint: ``<checkpoint folder>/model.pt``, its ``generator`` state dict (the file has no EMA;
  it also holds the critic), loaded strictly.
- The 3-step schedule (configs/wan_causal_dmd.yaml): t = 1000, 757, 522, not warped, on a flow-matching
  schedule of shift 8 that the release hard-codes in its wrapper (its config's shift is not read);
  sigma is the nearest point of the shift-8 grid (757 -> 0.75676, 522 -> 0.52174). 3-frame blocks,
  the cache rewritten at t = 0.
- The warped 4-step config (configs/wan_causal_dmd_warp_4step_cfg2.yaml): [1000, 750, 500, 250] warped
  on the shift-8 schedule: t = 1000, 960, 888.9, 727.3. The release names no checkpoint for it.
- Its cache holds 21 frames: the release generates 21 latent frames in one call and cannot go
  further. Attending to every earlier frame is well defined past that, and runs here with a warning
  that it goes beyond the release.
- The release draws one noise tensor, without a seed, before its prompt loop and reuses it for every
  prompt; here each item's noise comes from its seed, as for every family.
"""
from wan.families.base import Checkpoint, ModelFamily, Schedule, Variant

CHECKPOINT = Checkpoint(default_path="checkpoints/causvid/autoregressive_checkpoint/model.pt", use_ema=False, ema_key=None)
RELEASE_FRAMES = 21

CAUSVID = ModelFamily(
    name="causvid",
    description="CausVid generator",
    variants=(
        Variant("dmd_3step", CHECKPOINT,
                Schedule(denoising_steps=(1000, 757, 522), warp=False, timestep_shift=8.0, num_frame_per_block=3),
                max_frames=RELEASE_FRAMES),
        Variant("warp_4step", Checkpoint(default_path=None, use_ema=False, ema_key=None),
                Schedule(denoising_steps=(1000, 750, 500, 250), warp=True, timestep_shift=8.0, num_frame_per_block=3),
                max_frames=RELEASE_FRAMES),
    ),
)
