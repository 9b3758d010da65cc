"""Causal Forcing and Causal Forcing++ (thu-ml/Causal-Forcing): the Self-Forcing model and inference
with other weights and schedules. Four released generators: chunk-wise (3-frame blocks) and
frame-wise (1-frame blocks) at the Self-Forcing steps, and Causal Forcing++'s frame-wise 2-step and
1-step models, whose first block (one frame) takes the 4 steps [1000, 750, 500, 250]. All warp their
steps onto the shift-5 schedule and attend to every earlier frame.

Loading as the release's inference script does: the chunk-wise command loads the checkpoint's
``generator``, the frame-wise ones ``generator_ema``; keys saved under an FSDP wrapper
(``model._fsdp_wrapped_module.``) are renamed to ``model.``. The release then falls back to a
non-strict load; here the load stays strict (a missing or unexpected key is an error naming it).
"""
from wan.families.base import Checkpoint, ModelFamily, Schedule, Variant

FSDP_PREFIX = (("model._fsdp_wrapped_module.", "model."),)
FOUR_STEPS = (1000, 750, 500, 250)


def _variant(name, path, use_ema, steps, per_block, first_block_steps=None):
    return Variant(name, Checkpoint(default_path=path, use_ema=use_ema, prefix_fallbacks=FSDP_PREFIX),
                   Schedule(denoising_steps=steps, warp=True, timestep_shift=5.0, num_frame_per_block=per_block,
                            first_block_steps=first_block_steps))


CAUSAL_FORCING = ModelFamily(
    name="causal_forcing",
    description="Causal Forcing generator",
    variants=(
        _variant("chunkwise", "checkpoints/chunkwise/causal_forcing.pt", False, FOUR_STEPS, 3),
        _variant("framewise", "checkpoints/framewise/causal_forcing.pt", True, FOUR_STEPS, 1),
        _variant("framewise_2step", "checkpoints/causal-forcing++/framewise-2step.pt", True, (1000, 500), 1, FOUR_STEPS),
        _variant("framewise_1step", "checkpoints/causal-forcing++/framewise-1step.pt", True, (1000,), 1, FOUR_STEPS),
    ),
)
