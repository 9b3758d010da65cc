"""Infinite-Forcing (SOTAMak1r/Infinite-Forcing @ b8feaf5): Self-Forcing's model and schedule with
other weights and its own cache, the V-sink.

- Weights: the release's README downloads its Hugging Face repository (SOTAMak1r/Infinite-Forcing)
  into ``checkpoints/`` and names no file; ``checkpoints/ema_model.pt`` is the name a mirror of that
  repository lists (not verified). Its inference script loads ``generator_ema`` with ``--use_ema``
  (as its README command does), else ``generator``, and deletes ``._fsdp_wrapped_module`` from every
  key (the training EMA's FSDP names) before a strict load. Here the same, except that a file without
  ``generator_ema`` is refused (the release silently falls back to ``generator``).
- Schedule (configs/self_forcing_dmd_vsink1.yaml): Self-Forcing's, 4 warped steps [1000, 750, 500, 250]
  of a shift-5 schedule, 3-frame blocks, the cache rewritten by a clean pass at t = 0.
- Cache (wan/cache_policies/infinite_forcing.py): 6 frames whose first is the V-sink; keys stored
  without RoPE and rotated at every read at positions 0..5.
"""
from wan.families.base import Checkpoint, ModelFamily, Schedule, Variant

INFINITE_FORCING = ModelFamily(
    name="infinite_forcing",
    description="Infinite-Forcing V-sink generator",
    variants=(
        Variant("vsink1", Checkpoint(default_path="checkpoints/ema_model.pt", use_ema=True,
                                     removed_substrings=("._fsdp_wrapped_module",)),
                Schedule(denoising_steps=(1000, 750, 500, 250), warp=True, timestep_shift=5.0, num_frame_per_block=3)),
    ),
    default_policy="infinite_forcing",
)
