"""Tests for utils/vae.py: the Wan -> AutoencoderKLWan key map, loading a Wan-format file, decoding.

Wan's VAE key names and shapes are enumerated here from the reference layout and checked against the
official manifest; decoding is compared with diffusers' own ``AutoencoderKLWan.decode``.
"""

import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from omegaconf import OmegaConf

from utils.loading import WeightFileError
from utils.vae import WAN21_VAE, WanVAEWrapper, vae_key_map
from utils.wan21 import VAE_FILE as VAE_CHECKPOINT


TINY = dict(base_dim=8, num_res_blocks=1)  # dim_mult [1, 2, 4, 4]: 8 to 32 channels

# Wan2.1 latent normalisation, from the reference (key-maps.md, section 2).
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

# Wan key -> AutoencoderKLWan key at full size, from the reference tables.
FULL_SIZE_NAMES = {
    "conv1.weight": "quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
    "encoder.conv1.weight": "encoder.conv_in.weight",
    "decoder.conv1.bias": "decoder.conv_in.bias",
    "encoder.downsamples.0.residual.0.gamma": "encoder.down_blocks.0.norm1.gamma",
    "encoder.downsamples.3.shortcut.weight": "encoder.down_blocks.3.conv_shortcut.weight",
    "encoder.downsamples.5.time_conv.weight": "encoder.down_blocks.5.time_conv.weight",
    "encoder.downsamples.8.resample.1.bias": "encoder.down_blocks.8.resample.1.bias",
    "encoder.downsamples.10.residual.6.weight": "encoder.down_blocks.10.conv2.weight",
    "encoder.middle.0.residual.2.weight": "encoder.mid_block.resnets.0.conv1.weight",
    "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
    "decoder.middle.1.norm.gamma": "decoder.mid_block.attentions.0.norm.gamma",
    "decoder.middle.2.residual.3.gamma": "decoder.mid_block.resnets.1.norm2.gamma",
    "decoder.upsamples.2.residual.6.bias": "decoder.up_blocks.0.resnets.2.conv2.bias",
    "decoder.upsamples.3.time_conv.weight": "decoder.up_blocks.0.upsamplers.0.time_conv.weight",
    "decoder.upsamples.4.shortcut.bias": "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
    "decoder.upsamples.7.resample.1.weight": "decoder.up_blocks.1.upsamplers.0.resample.1.weight",
    "decoder.upsamples.11.resample.1.weight": "decoder.up_blocks.2.upsamplers.0.resample.1.weight",
    "decoder.upsamples.14.residual.2.weight": "decoder.up_blocks.3.resnets.2.conv1.weight",
    "encoder.head.0.gamma": "encoder.norm_out.gamma",
    "decoder.head.2.weight": "decoder.conv_out.weight",
}
# The same for TINY (num_res_blocks 1: up blocks of 2 resnets + 1 upsampler).
TINY_NAMES = {
    "decoder.upsamples.1.residual.0.gamma": "decoder.up_blocks.0.resnets.1.norm1.gamma",
    "decoder.upsamples.2.time_conv.bias": "decoder.up_blocks.0.upsamplers.0.time_conv.bias",
    "decoder.upsamples.3.residual.2.weight": "decoder.up_blocks.1.resnets.0.conv1.weight",
    "decoder.upsamples.8.resample.1.weight": "decoder.up_blocks.2.upsamplers.0.resample.1.weight",
    "decoder.upsamples.10.residual.6.weight": "decoder.up_blocks.3.resnets.1.conv2.weight",
    "encoder.downsamples.1.resample.1.weight": "encoder.down_blocks.1.resample.1.weight",
}


def wan_vae_shapes(
    base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True)
):
    """Key -> shape of Wan's WanVAE_ state dict (no attention outside the middle blocks)."""
    shapes = {}

    def conv(name, out_dim, in_dim, kernel):
        shapes[f"{name}.weight"] = (out_dim, in_dim, *kernel)
        shapes[f"{name}.bias"] = (out_dim,)

    def resnet(name, in_dim, out_dim):
        shapes[f"{name}.residual.0.gamma"] = (in_dim, 1, 1, 1)
        conv(f"{name}.residual.2", out_dim, in_dim, (3, 3, 3))
        shapes[f"{name}.residual.3.gamma"] = (out_dim, 1, 1, 1)
        conv(f"{name}.residual.6", out_dim, out_dim, (3, 3, 3))
        if in_dim != out_dim:
            conv(f"{name}.shortcut", out_dim, in_dim, (1, 1, 1))

    def middle(side, dim):
        resnet(f"{side}.middle.0", dim, dim)
        shapes[f"{side}.middle.1.norm.gamma"] = (dim, 1, 1)
        conv(f"{side}.middle.1.to_qkv", 3 * dim, dim, (1, 1))
        conv(f"{side}.middle.1.proj", dim, dim, (1, 1))
        resnet(f"{side}.middle.2", dim, dim)

    last = len(dim_mult) - 1
    dims = [base_dim * m for m in [1, *dim_mult]]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    n = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            resnet(f"encoder.downsamples.{n}", in_dim, out_dim)
            in_dim, n = out_dim, n + 1
        if i != last:
            conv(f"encoder.downsamples.{n}.resample.1", out_dim, out_dim, (3, 3))
            if temperal_downsample[i]:
                conv(f"encoder.downsamples.{n}.time_conv", out_dim, out_dim, (3, 1, 1))
            n += 1
    middle("encoder", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z_dim, dims[-1], (3, 3, 3))
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))

    dims = [base_dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
    temperal_upsample = temperal_downsample[::-1]
    conv("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    middle("decoder", dims[0])
    n = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            in_dim //= 2  # the previous upsampler halved the channels
        for _ in range(num_res_blocks + 1):
            resnet(f"decoder.upsamples.{n}", in_dim, out_dim)
            in_dim, n = out_dim, n + 1
        if i != last:
            conv(f"decoder.upsamples.{n}.resample.1", out_dim // 2, out_dim, (3, 3))
            if temperal_upsample[i]:
                conv(f"decoder.upsamples.{n}.time_conv", 2 * out_dim, out_dim, (3, 1, 1))
            n += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return shapes


@pytest.fixture
def model_dir(tmp_path):
    """A model folder with a tiny Wan-format fp32 VAE file."""
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=generator) for k, s in wan_vae_shapes(**TINY).items()}
    torch.save(weights, tmp_path / VAE_CHECKPOINT)
    return tmp_path


def test_key_map_covers_the_official_file(official_manifest):
    manifest = official_manifest("wan2.1_vae.json")
    config = manifest["config"]
    assert (WAN21_VAE["base_dim"], WAN21_VAE["z_dim"], WAN21_VAE["num_res_blocks"]) == (
        config["dim"],
        config["z_dim"],
        config["num_res_blocks"],
    )
    assert WAN21_VAE["dim_mult"] == config["dim_mult"] and WAN21_VAE["attn_scales"] == config["attn_scales"]
    assert WAN21_VAE["temperal_downsample"] == config["temperal_downsample"]

    wan = {
        k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        for k, (shape, dtype) in manifest["keys"].items()
    }
    assert {k: v.shape for k, v in wan.items()} == {k: torch.Size(s) for k, s in wan_vae_shapes().items()}
    mapped = vae_key_map(wan, "manifest")
    with torch.device("meta"):
        model = AutoencoderKLWan(**WAN21_VAE)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert len(mapped) == len(wan) == 194
    for key, name in FULL_SIZE_NAMES.items():
        assert mapped[name] is wan[key], (key, name)


@pytest.mark.parametrize(
    "key",
    [
        "decoder.upsamples.0.residual.9.weight",
        "decoder.upsamples.3.residual.0.gamma",
        "encoder.middle.1.residual.0.gamma",
        "head.0.gamma",
    ],
)
def test_key_map_rejects_unknown_key(key):
    with pytest.raises(WeightFileError, match=re.escape(f"some.pth: unexpected key {key!r}")):
        vae_key_map({key: torch.zeros(1)}, "some.pth")


def test_from_model_dir_loads_every_weight_bit_exactly(model_dir):
    vae = WanVAEWrapper.from_model_dir(model_dir, config=TINY)
    weights = torch.load(model_dir / VAE_CHECKPOINT)
    loaded = vae.model.state_dict()
    names = vae_key_map(weights, "test", num_res_blocks=1)
    assert sorted(names) == sorted(loaded) and len(names) == len(weights)
    for name, tensor in names.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor), name
    for key, name in TINY_NAMES.items():
        assert torch.equal(loaded[name], weights[key]), (key, name)
    assert not any(t.is_meta for t in [*vae.parameters(), *vae.buffers()])
    assert not vae.model.training


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda w: w.update({"decoder.middle.1.qkv.weight": torch.zeros(3)}), "decoder.middle.1.qkv.weight"),
        (lambda w: w.update({"conv2.weight": torch.zeros(16, 16, 1, 1)}), "post_quant_conv.weight"),
        (lambda w: w.pop("decoder.head.2.bias"), "decoder.conv_out.bias"),
    ],
    ids=["unknown key", "wrong shape", "missing key"],
)
def test_from_model_dir_errors_name_file_and_key(model_dir, change, key):
    path = model_dir / VAE_CHECKPOINT
    weights = torch.load(path)
    change(weights)
    torch.save(weights, path)
    with pytest.raises(WeightFileError) as error:
        WanVAEWrapper.from_model_dir(model_dir, config=TINY)
    assert str(path) in str(error.value) and key in str(error.value)


class Step:
    """An object that the weights_only unpickler refuses."""


def test_from_model_dir_refuses_a_file_with_an_object_without_the_allow_pickle_hint(model_dir):
    path = model_dir / VAE_CHECKPOINT
    torch.save({**torch.load(path), "step": Step()}, path)
    with pytest.raises(WeightFileError) as error:
        WanVAEWrapper.from_model_dir(model_dir, config=TINY)
    message = str(error.value)
    assert message.startswith(f"{path}: holds objects beyond tensors") and "Step" in message
    assert "allow_pickle" not in message and "opt in" not in message


def test_from_model_dir_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match=re.escape(f"{tmp_path / VAE_CHECKPOINT}: file not found")):
        WanVAEWrapper.from_model_dir(tmp_path, config=TINY)


def test_latent_statistics_are_moving_buffers():
    vae = WanVAEWrapper.random(TINY)
    assert vae.mean.flatten().tolist() == pytest.approx(LATENT_MEAN)
    assert vae.std.flatten().tolist() == pytest.approx(LATENT_STD)
    assert "mean" not in vae.state_dict() and "std" not in vae.state_dict()
    vae.to(torch.float64)
    assert vae.mean.dtype == vae.std.dtype == next(vae.model.parameters()).dtype == torch.float64


def test_decode_to_pixel_matches_diffusers_decode():
    vae = WanVAEWrapper.random(TINY)
    latents = torch.randn(2, 2, 16, 2, 3, generator=torch.Generator().manual_seed(1))  # [B, F, C, H, W]
    with torch.no_grad():
        video = vae.decode_to_pixel(latents)
        mean = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
        std = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
        z = latents.permute(0, 2, 1, 3, 4) * std + mean  # [B, C, F, H, W]
        expected = vae.model.decode(z).sample.clamp(-1, 1).permute(0, 2, 1, 3, 4)  # [B, T, 3, 8H, 8W]
    assert video.shape == (2, 5, 3, 16, 24) and video.dtype == torch.float32
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-6)
    assert video.abs().max() <= 1 and video.std() > 0.01


def test_random_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first = WanVAEWrapper.random(TINY).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)
    second = WanVAEWrapper.random(TINY).state_dict()
    other = WanVAEWrapper.random(TINY | {"init_seed": 1}).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.decoder.conv_in.weight"], other["model.decoder.conv_in.weight"])


def test_random_rejects_a_latent_size_other_than_16():
    with pytest.raises(ValueError, match="z_dim 8"):
        WanVAEWrapper.random(TINY | {"z_dim": 8})


def test_from_config(tmp_path):
    sizes = {**TINY, "dim_mult": [1, 2, 2, 2]}
    cfg = OmegaConf.create({"random_init": True, "init_seed": 1, "vae_config": sizes, "model_dir": str(tmp_path)})
    vae = WanVAEWrapper.from_config(cfg)
    assert vae.model.config.base_dim == 8 and list(vae.model.config.dim_mult) == [1, 2, 2, 2]
    expected = WanVAEWrapper.random(sizes | {"init_seed": 1}).state_dict()
    assert all(torch.equal(tensor, expected[k]) for k, tensor in vae.state_dict().items())
    cfg.random_init = False
    with pytest.raises(WeightFileError, match=re.escape(str(tmp_path / VAE_CHECKPOINT))):
        WanVAEWrapper.from_config(cfg)
