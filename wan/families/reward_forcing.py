"""Reward Forcing (JaydenLyh/Reward-Forcing @ 4317f5a): Self-Forcing's model and schedule with other
weights and its own cache, an EMA sink.

- Weights: ``checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt`` (Hugging Face
  JaydenLu666/Reward-Forcing-T2V-1.3B). The release's inference script loads the whole file as the
  wrapped generator's state dict (keys ``model.<transformer key>``), strictly, without entry choice or
  key edits; its ``--use_ema`` sets nothing. Here the file is read as such, with ``weights_only=True``.
- Schedule (configs/reward_forcing.yaml): Self-Forcing's, 4 warped steps [1000, 750, 500, 250] of a
  shift-5 schedule, 3-frame blocks, the cache rewritten by a clean pass at t = 0.
- Cache (wan/cache_policies/reward_forcing.py): 9 frames whose first 3 are an EMA sink; keys stored
  without RoPE and rotated at every read at positions 0..8.
"""
from wan.families.base import Checkpoint, ModelFamily, Schedule, Variant

REWARD_FORCING = ModelFamily(
    name="reward_forcing",
    description="Reward Forcing generator",
    variants=(
        Variant("1.3b", Checkpoint(default_path="checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt", use_ema=False,
                                   ema_key=None, key=None),
                Schedule(denoising_steps=(1000, 750, 500, 250), warp=True, timestep_shift=5.0, num_frame_per_block=3)),
    ),
    default_policy="reward_forcing",
)
