"""Self-Forcing (Huang et al. 2025): Wan2.1-T2V-1.3B distilled into a 4-step causal generator. Its
checkpoint holds ``generator`` and its EMA ``generator_ema``, which its inference script loads by
default; 3-frame blocks at the warped steps [1000, 750, 500, 250] of a shift-5 schedule, the cache
rewritten by a clean pass at t = 0, every earlier frame attended (configs/self_forcing_dmd.yaml)."""
from wan.families.base import Checkpoint, ModelFamily, Schedule, Variant

SELF_FORCING = ModelFamily(
    name="self_forcing",
    description="Self-Forcing DMD generator",
    variants=(
        Variant("dmd", Checkpoint(default_path="checkpoints/self_forcing_dmd.pt", use_ema=True),
                Schedule(denoising_steps=(1000, 750, 500, 250), warp=True, timestep_shift=5.0, num_frame_per_block=3)),
    ),
)
