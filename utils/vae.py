"""Wan2.1's video VAE, run by diffusers' ``AutoencoderKLWan``, as the pipeline's latent-to-pixel decoder.

``WanVAEWrapper.decode_to_pixel`` undoes the 16-channel latent normalisation (z * std + mean) and
decodes, as Self-Forcing's wrapper does. ``from_model_dir`` loads the official ``Wan2.1_VAE.pth``
(Wan's own key names) into a model built on the meta device; ``random`` builds a tiny randomly
initialised VAE, for tests.
"""

import re
from pathlib import Path
from typing import Mapping

import torch
from diffusers import AutoencoderKLWan
from omegaconf import OmegaConf
from torch import nn

from utils.loading import WeightFileError, load_into, read_state_dict
from utils.misc import seeded
from utils.wan21 import VAE_FILE


# AutoencoderKLWan arguments of Wan's _video_vae(z_dim=16).
WAN21_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

# Residual block: Wan ``residual.{0,2,3,6}`` / ``shortcut`` -> diffusers names.
_RESNET_KEYS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RESAMPLE_KEYS = {"resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"}
_ATTENTION_KEYS = {"norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"}
_HEAD_KEYS = {
    "head.0.gamma": "norm_out.gamma",
    "head.2.weight": "conv_out.weight",
    "head.2.bias": "conv_out.bias",
}


def _diffusers_name(key, num_res_blocks):
    """AutoencoderKLWan name of one Wan VAE key; None if Wan's VAE has no such key."""
    match = re.fullmatch(r"(conv1|conv2)\.(weight|bias)", key)
    if match:
        return f"{'quant_conv' if match[1] == 'conv1' else 'post_quant_conv'}.{match[2]}"
    match = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if match is None:
        return None
    side, rest = match[1], match[2]
    if rest in ("conv1.weight", "conv1.bias"):
        return f"{side}.conv_in.{rest.removeprefix('conv1.')}"
    if rest in _HEAD_KEYS:
        return f"{side}.{_HEAD_KEYS[rest]}"
    match = re.fullmatch(r"middle\.(\d+)\.(.+)", rest)
    if match:
        index, sub = int(match[1]), match[2]
        if index == 1 and sub in _ATTENTION_KEYS:
            return f"{side}.mid_block.attentions.0.{sub}"
        if index in (0, 2) and sub in _RESNET_KEYS:
            return f"{side}.mid_block.resnets.{index // 2}.{_RESNET_KEYS[sub]}"
        return None
    blocks = "downsamples" if side == "encoder" else "upsamples"
    match = re.fullmatch(rf"{blocks}\.(\d+)\.(.+)", rest)
    if match is None:
        return None
    index, sub = int(match[1]), match[2]
    if side == "encoder":  # one flat list of resnets and downsamplers on both sides
        prefix = f"encoder.down_blocks.{index}"
    else:  # each up block: num_res_blocks + 1 resnets, then an upsampler (none after the last block)
        block, position = divmod(index, num_res_blocks + 2)
        if position == num_res_blocks + 1:
            return f"decoder.up_blocks.{block}.upsamplers.0.{sub}" if sub in _RESAMPLE_KEYS else None
        prefix = f"decoder.up_blocks.{block}.resnets.{position}"
    if sub in _RESNET_KEYS:
        return f"{prefix}.{_RESNET_KEYS[sub]}"
    if sub in _RESAMPLE_KEYS and side == "encoder":
        return f"{prefix}.{sub}"
    return None


def vae_key_map(wan_state_dict: Mapping[str, torch.Tensor], source, num_res_blocks: int = 2) -> dict:
    """Rename Wan ``WanVAE_`` keys to ``AutoencoderKLWan`` keys (same tensors, no copies).

    ``num_res_blocks`` is the VAE's (2 for Wan2.1); it fixes how Wan's flat decoder list splits into
    up blocks. Raises ``WeightFileError`` naming ``source`` and the key for a key Wan's VAE does not have.
    """
    mapped = {}
    for key, tensor in wan_state_dict.items():
        name = _diffusers_name(key, num_res_blocks)
        if name is None:
            raise WeightFileError(f"{source}: unexpected key {key!r}: not a key of Wan's VAE")
        mapped[name] = tensor
    return mapped


def _plain(config: Mapping) -> dict:
    """A plain dict of built-in values (OmegaConf lists become lists), copied."""
    return OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)


class WanVAEWrapper(nn.Module):
    """``AutoencoderKLWan`` plus the latent mean/std, non-persistent buffers that ``.to`` moves. Frozen."""

    def __init__(self, model: AutoencoderKLWan):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        mean = torch.tensor(model.config.latents_mean)
        std = torch.tensor(model.config.latents_std)
        if not len(mean) == len(std) == model.config.z_dim:
            raise ValueError(f"latents_mean/std: {len(mean)}/{len(std)} channels, z_dim {model.config.z_dim}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1, 1), persistent=False)  # [1, C, 1, 1, 1]
        self.register_buffer("std", std.view(1, -1, 1, 1, 1), persistent=False)  # [1, C, 1, 1, 1]

    def decode_to_pixel(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, F, C, H, W] -> fp32 video [B, 1 + 4(F-1), 3, 8H, 8W] in [-1, 1]."""
        z = latents.permute(0, 2, 1, 3, 4).to(self.std.dtype)  # [B, C, F, H, W]
        video = self.model.decode(z * self.std + self.mean).sample  # [B, 3, T, 8H, 8W]
        return video.float().clamp(-1, 1).permute(0, 2, 1, 3, 4)  # [B, T, 3, 8H, 8W]

    @classmethod
    def from_model_dir(cls, model_dir, config: Mapping = WAN21_VAE, device="cpu", dtype=None):
        """Load ``Wan2.1_VAE.pth`` from ``model_dir`` onto ``device`` (cast to ``dtype`` if given);
        ``config`` gives the AutoencoderKLWan arguments."""

        path = Path(model_dir) / VAE_FILE
        with torch.device("meta"):
            model = AutoencoderKLWan(**_plain(config))
        state_dict = vae_key_map(read_state_dict(path, device=device), path, model.config.num_res_blocks)
        load_into(model, state_dict, f"{path} (keys renamed to AutoencoderKLWan names)", dtype=dtype)
        return cls(model)

    @classmethod
    def random(cls, config: Mapping):
        """A randomly initialised VAE: ``config`` holds AutoencoderKLWan arguments and optionally
        ``init_seed`` (default 0). The same config gives the same weights, whatever the global RNG state,
        which is left untouched."""

        arguments = _plain(config)
        seed = arguments.pop("init_seed", 0)
        return cls(seeded(lambda: AutoencoderKLWan(**arguments), seed))

    @classmethod
    def from_config(cls, cfg: Mapping, device="cpu", dtype=None):
        """``random(cfg.vae_config)`` if ``cfg.random_init``, else ``from_model_dir(cfg.model_dir)``, on
        ``device`` and in ``dtype`` (if given).

        The random weights' seed is the sub-config's ``init_seed``, else ``cfg.init_seed``, else 0.
        """
        if cfg.get("random_init"):
            return cls.random({"init_seed": cfg.get("init_seed", 0), **cfg["vae_config"]}).to(device=device, dtype=dtype)
        return cls.from_model_dir(cfg["model_dir"], device=device, dtype=dtype)
