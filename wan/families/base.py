"""What a model family is: one release of a causal video model on Wan2.1-T2V-1.3B, in one or more
variants, each described by the generator checkpoint it loads and its sampling schedule, and the
attention-cache policy its inference uses. Data only (no torch), so that a run is planned and
checked before anything heavy is imported; pipeline/wrappers.py loads what it says.
"""
from dataclasses import dataclass

from utils.passes import CACHE_PASS


@dataclass(frozen=True)
class Checkpoint:
    """A release's generator checkpoint: a ``torch.save`` dict whose entry ``ema_key`` (or ``key``
    without EMA; ``key`` None: the whole file) is the state dict of the wrapped transformer (keys
    ``model.<transformer key>``).
    ``default_path``: where the release's inference command reads it (None: no released file, the
    user names one); ``use_ema``: which of the two that command loads (``ema_key`` None: the file
    has no EMA); ``prefix_fallbacks``: (saved prefix, prefix) pairs the release's loader rewrites when
    the keys do not match as saved (an FSDP wrapper's name, for example); ``removed_substrings``: text
    the release's loader deletes from every key, wherever it occurs, before loading. Read with
    ``weights_only=True`` unless the user opts in."""

    default_path: str | None
    use_ema: bool = True
    ema_key: str | None = "generator_ema"
    key: str | None = "generator"
    prefix_fallbacks: tuple = ()
    removed_substrings: tuple = ()
    key_fallbacks: tuple = ()  # entries read, in order, when the file lacks ``key`` (not for EMA)

    def state_dict_keys(self, use_ema):
        """The entries of the file that may hold the state dict, in the order they are looked for (None:
        the whole file)."""
        return (self.ema_key,) if use_ema else (self.key, *self.key_fallbacks)


@dataclass(frozen=True)
class Lora:
    """A release's LoRA adapter on the generator, loaded after its checkpoint: a ``torch.save`` dict
    whose entry ``state_key`` (or the whole file) maps PEFT's key names (``saved_prefix`` +
    ``blocks.<i>.<target>.lora_A.weight`` / ``lora_B.weight``) to the low-rank factors, of rank
    ``rank`` and scale ``alpha / rank``, on the Linear layers ``targets`` of every transformer block."""

    default_path: str
    rank: int
    alpha: int
    targets: tuple
    state_key: str = "generator_lora"
    saved_prefix: str = "base_model.model."


@dataclass(frozen=True)
class Schedule:
    """The release's sampling schedule, as its config states it: the denoising steps (``warp``:
    mapped onto the shifted schedule by index, see utils/scheduler.py), the flow-matching
    ``timestep_shift``, the latent frames of a block, the timestep of the clean cache-update pass and,
    where the release has one, the steps of the first block (``first_block_steps``)."""

    denoising_steps: tuple
    warp: bool
    timestep_shift: float
    num_frame_per_block: int
    context_noise: float = 0
    first_block_steps: tuple = None

    def config_values(self):
        """The schedule as the config's keys (dotted) hold it."""
        values = {
            "denoising_step_list": list(self.denoising_steps),
            "warp_denoising_step": self.warp,
            "model_kwargs.timestep_shift": self.timestep_shift,
            "num_frame_per_block": self.num_frame_per_block,
            "context_noise": self.context_noise,
        }
        if self.first_block_steps is not None:
            values["denoising_step_list_first_chunk"] = list(self.first_block_steps)
        return values


@dataclass(frozen=True)
class Variant:
    """One released model of a family: its name (the config's ``variant``), checkpoint (None: the base
    weights alone), schedule (None: the config's, for a model without a release schedule),
    ``max_frames``, the latent frames its release can generate in one call (None: no limit; past it
    a run goes beyond the release), and the LoRA adapter loaded on top of the checkpoint (None: none)."""

    name: str
    checkpoint: Checkpoint | None
    schedule: Schedule | None
    max_frames: int | None = None
    lora: Lora | None = None


@dataclass(frozen=True)
class ModelFamily:
    """``name``: the config's ``family``; ``variants``: the released models, the first the default;
    ``default_policy``: the cache policy its inference uses (``wan.cache_policies``); ``pipeline``:
    the denoising loop that runs it (pipeline/pipelines.py: ``block_wise``, one block per call)."""

    name: str
    description: str
    variants: tuple
    default_policy: str = "global"
    pipeline: str = "block_wise"

    def call_frames(self, per_block, num_steps):
        """The most query frames one call of its loop holds (a block here)."""
        return per_block

    def pass_calls(self, num_blocks, num_steps):
        """{(block, pass): how many calls carry that label} for a video of ``num_blocks`` blocks and a
        schedule of ``num_steps`` steps: here every denoising pass and the cache pass of every block,
        once each."""
        return {(block, p): 1 for block in range(num_blocks) for p in (*range(num_steps), CACHE_PASS)}

    def variant(self, name=None):
        """The variant called ``name`` (None: the default); KeyError for another name."""
        if name is None:
            return self.variants[0]
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)

    @property
    def variant_names(self):
        return [variant.name for variant in self.variants]
