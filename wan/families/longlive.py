"""LongLive 1.0 (NVlabs/LongLive, the Wan2.1-T2V-1.3B model): Self-Forcing's model and schedule with
other weights, a LoRA adapter and a short window with a sink.

- Weights: ``longlive_models/models/longlive_base.pt``, its ``generator`` (the release's config sets
  ``use_ema: false``; a file without it is read from ``model``), loaded strictly; then the LoRA
  ``longlive_models/models/lora.pt`` (its ``generator_lora``, PEFT's key names): rank 256, alpha 256
  (scale 1), on every Linear of every transformer block (self- and cross-attention q, k, v, o and both
  FFN layers: 300 layers). The release ignores the result of loading the LoRA, so a mismatched file
  silently runs the base model; here every key is checked. The release runs the adapter unmerged;
  here exact mode does too, and fast mode merges it into the weights (W + B·A, in the run's dtype).
- Schedule: Self-Forcing's (4 warped steps of a shift-5 schedule, 3-frame blocks, cache pass at t = 0).
- Cache (wan/cache_policies/longlive.py): 12 frames, of which the first 3 frames of the video are a
  sink: a block attends to frames 0-2 and the last 9 (21 frames: 0-2, 12-20; 120 frames: 0-2,
  111-119), as Self-Forcing's window with ``local_attn_size`` 12 and ``sink_size`` 3; and the
  interactive mode's prompt switches with their KV recache (``global_sink``).
- Not here: the infinite-attention variant.
"""
from wan.families.base import Checkpoint, Lora, ModelFamily, Schedule, Variant

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

LONGLIVE = ModelFamily(
    name="longlive",
    description="LongLive 1.0 generator with its LoRA",
    variants=(
        Variant("1.3b",
                Checkpoint(default_path="longlive_models/models/longlive_base.pt", use_ema=False,
                           prefix_fallbacks=(("model._fsdp_wrapped_module.", "model."),), key_fallbacks=("model",)),
                Schedule(denoising_steps=(1000, 750, 500, 250), warp=True, timestep_shift=5.0, num_frame_per_block=3),
                lora=Lora(default_path="longlive_models/models/lora.pt", rank=256, alpha=256, targets=BLOCK_LINEARS)),
    ),
    default_policy="longlive",
)
