"""The three models of the pipeline, behind upstream Self-Forcing's call interfaces.

- ``WanDiffusionWrapper``: the causal transformer (``.model``, with the config's cache policy) plus the
  flow-matching schedule; returns (flow_pred, x0_pred). Its state dict has Self-Forcing's
  ``model.``-prefixed keys, so a family's checkpoint (``generator`` / ``generator_ema``) loads strictly.
- ``WanTextEncoder`` (utils/text_encoder.py), re-exported here; the VAE is in utils/vae.py (imported
  only where something decodes: diffusers takes seconds to import).

Each has ``from_config(cfg)``: real weights from ``cfg.model_dir`` or, with ``cfg.random_init``,
random weights of the sizes in the config, the same for every run (seeded by ``init_seed``).
"""
from torch import nn

from utils.loading import WeightFileError, load_into, read_state_dict
from utils.misc import seeded
from utils.scheduler import FlowMatchScheduler
from utils.text_encoder import WanTextEncoder
from wan import families
from wan.modules.causal_model import CausalWanModel

__all__ = ["WanDiffusionWrapper", "WanTextEncoder", "load_generator_checkpoint"]


class WanDiffusionWrapper(nn.Module):
    def __init__(self, model: CausalWanModel, timestep_shift=families.DEFAULT_FAMILY.variant().schedule.timestep_shift):
        super().__init__()
        self.model = model
        self.scheduler = FlowMatchScheduler(shift=timestep_shift, sigma_min=0.0, extra_one_step=True)

    @classmethod
    def from_config(cls, cfg, device="cpu", dtype=None, load_weights=True):
        """Random weights (``cfg.random_init``) or ``cfg.model_dir``'s, on ``device`` in ``dtype``.
        ``load_weights=False`` leaves a non-random model on the meta device, for
        ``load_generator_checkpoint`` to fill (the base weights are then never read)."""
        kwargs = dict(cfg.get("model_kwargs") or {})
        policy = families.cache_policy(kwargs, int(cfg.get("num_frame_per_block", 1)))
        if cfg.get("random_init"):
            sizes = dict(cfg["model_config"], cache_policy=policy)
            model = seeded(lambda: CausalWanModel(**sizes), cfg.get("init_seed", 0)).to(device=device, dtype=dtype)
        else:
            model = CausalWanModel.from_pretrained(cfg["model_dir"], device, dtype, load_weights, cache_policy=policy)
        return cls(model.eval(), timestep_shift=families.timestep_shift(kwargs))

    def get_scheduler(self):
        return self.scheduler

    def forward(self, noisy_image_or_video, conditional_dict, timestep, kv_cache=None, crossattn_cache=None, current_start=0):
        """noisy [B, F, C, H, W], timestep [B, F] -> (flow_pred, x0_pred), both [B, F, C, H, W]."""
        flow = self.model(
            noisy_image_or_video.permute(0, 2, 1, 3, 4),
            t=timestep,
            context=conditional_dict["prompt_embeds"],
            kv_cache=kv_cache,
            crossattn_cache=crossattn_cache,
            current_start=current_start,
        ).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
        x0 = self.scheduler.flow_to_x0(flow.flatten(0, 1), noisy_image_or_video.flatten(0, 1), timestep.flatten())
        return flow, x0.unflatten(0, flow.shape[:2])


def load_generator_checkpoint(
    generator: WanDiffusionWrapper, path, use_ema=True, allow_pickle=False, device=None, dtype=None, pickle_flag="--allow_pickle",
    spec=None,
):
    """Load a generator checkpoint laid out as ``spec`` (a ``wan.families`` Checkpoint; None:
    Self-Forcing's) says: its EMA state dict (``generator_ema``) or, without ``use_ema``, its plain one
    (``generator``, or the spec's fallback entries, or the whole file for a spec without entry), with
    the key edits of the release's loader (``spec.removed_substrings`` deleted from every key; the
    keys of a saved prefix renamed, ``spec.prefix_fallbacks``, only when the keys do not match as
    saved), strictly, by assignment, onto ``device`` in ``dtype`` (default: those of the generator's
    parameters; give both for a generator on the meta device). The file is memory-mapped: the other state dicts it holds are
    never read. ``allow_pickle`` fully unpickles a checkpoint that holds objects beyond tensors;
    ``pickle_flag`` is the option that sets it, suggested when such a file is refused. Returns the key
    used (None: the whole file); every problem with the file raises ``WeightFileError``."""
    spec = spec or families.DEFAULT_FAMILY.variant().checkpoint
    checkpoint = read_state_dict(path, allow_pickle=allow_pickle, pickle_flag=pickle_flag)
    keys = spec.state_dict_keys(use_ema)
    if keys == (None,):  # the whole file is the state dict
        key, state, source = None, checkpoint, str(path)
    else:
        key = next((key for key in keys if key in checkpoint), None)
        if key is None:
            hint = f" (use --no-use_ema for {spec.key!r})" if use_ema and spec.key in checkpoint else ""
            wanted = " or ".join(f"'{key}'" for key in keys)
            raise WeightFileError(f"{path}: no {wanted} state dict{hint}; top-level entries: {sorted(checkpoint)[:10]}")
        state, source = checkpoint[key], f"{path} ['{key}']"
        if not isinstance(state, dict):
            raise WeightFileError(f"{path}: '{key}' holds a {type(state).__name__}, not a state dict of tensors")
    for text in spec.removed_substrings:
        state = {name.replace(text, "") if isinstance(name, str) else name: value for name, value in state.items()}
    expected = set(generator.state_dict())
    for saved, ours in spec.prefix_fallbacks:
        if set(state) != expected:
            state = {ours + name[len(saved):] if isinstance(name, str) and name.startswith(saved) else name: value
                     for name, value in state.items()}
    parameter = next(generator.parameters())
    load_into(generator, state, source, device or parameter.device, dtype or parameter.dtype)
    return key
