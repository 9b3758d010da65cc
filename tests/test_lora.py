"""LongLive: its LoRA adapter through peft (the adapted layers compute W x + b + (alpha/r) B A x, merged
equals unmerged, every malformed file refused naming the file and the key), its checkpoint's
fallback entry, its cache's key sets at 21, 33 and 120 frames (the facts' sets) and a whole CLI run on
files in the release's layout."""
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import experiments.run_extraction_figure4 as cli
import utils.config
from pipeline.lora import load_lora
from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint
from utils.attention_cache import open_cache
from utils.loading import WeightFileError
from wan.families import check_model
from wan.families.longlive import LONGLIVE
from wan.modules.causal_model import CausalWanModel

REPO = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=(1, 2, 2), text_len=8, in_dim=4, dim=32, ffn_dim=64, freq_dim=16, text_dim=16, out_dim=4,
            num_heads=2, num_layers=2)
RANK = 4
SPEC = replace(LONGLIVE.variant().lora, rank=RANK, alpha=8)  # scale 2, so a wrong scale shows


def adapter(model, spec=SPEC, seed=0):
    """Random factors for every target of ``model``, under PEFT's saved names: {name: tensor}."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(len(model.blocks)):
        for target in spec.targets:
            layer = model.get_submodule(f"blocks.{i}.{target}")
            prefix = f"{spec.saved_prefix}blocks.{i}.{target}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(spec.rank, layer.in_features, generator=gen)
            state[f"{prefix}.lora_B.weight"] = torch.randn(layer.out_features, spec.rank, generator=gen)
    return state


def tiny_model(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalWanModel(**TINY).eval()


def test_adapted_layers_compute_w_x_plus_scaled_b_a_x(tmp_path):
    model = tiny_model()
    base = {name: model.get_submodule(name).weight.detach().clone() for name in ("blocks.1.cross_attn.v", "blocks.0.ffn.0")}
    factors = adapter(model)
    torch.save({"generator_lora": factors, "critic_lora": {}, "step": 3}, tmp_path / "lora.pt")
    assert load_lora(model, tmp_path / "lora.pt", SPEC, merge=False) == 2 * 10
    x = torch.randn(5, 32)
    for name, weight in base.items():
        layer = model.get_submodule(name)
        a, b = factors[f"base_model.model.{name}.lora_A.weight"], factors[f"base_model.model.{name}.lora_B.weight"]
        want = x @ weight.T + layer.base_layer.bias + (SPEC.alpha / SPEC.rank) * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged(tmp_path):
    torch.save({"generator_lora": adapter(tiny_model())}, tmp_path / "lora.pt")
    unmerged, merged = tiny_model(seed=1), tiny_model(seed=1)
    load_lora(unmerged, tmp_path / "lora.pt", SPEC, merge=False)
    load_lora(merged, tmp_path / "lora.pt", SPEC, merge=True)
    gen = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 4, 3, 4, 4, generator=gen), torch.randn(1, 8, 16, generator=gen)
    t = torch.full((1, 3), 500.0)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, context), unmerged(x, t, context), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(x, t, context), tiny_model(seed=1)(x, t, context), atol=1e-3)  # it adapts


def malformed(factors):
    """id -> (the file's contents, words of the one-line error)."""
    some_a = next(key for key in factors if key.endswith("lora_A.weight"))
    some_b = some_a.replace("lora_A", "lora_B")
    return {
        "missing-key": ({"generator_lora": {k: v for k, v in factors.items() if k != some_b}},
                        f"missing key {some_b!r}"),
        "wrong-rank": ({"generator_lora": {**factors, some_a: torch.zeros(RANK + 1, factors[some_a].shape[1])}},
                       f"{some_a!r} has shape [{RANK + 1}, {factors[some_a].shape[1]}]; expected rank {RANK}"),
        "no-prefix": ({"generator_lora": {k.removeprefix("base_model.model."): v for k, v in factors.items()}},
                      "lacks PEFT's prefix 'base_model.model.'"),
        "unexpected-layer": ({"generator_lora": {**factors, "base_model.model.blocks.0.norm3.lora_A.weight":
                                                 torch.zeros(RANK, 32)}},
                             "unexpected key 'base_model.model.blocks.0.norm3.lora_A.weight'"),
        "not-a-factor": ({"generator_lora": {**factors, "base_model.model.blocks.0.ffn.0.weight": torch.zeros(2, 2)}},
                         "is not a LoRA factor"),
    }


@pytest.mark.parametrize("case", ["missing-key", "wrong-rank", "no-prefix", "unexpected-layer", "not-a-factor"])
def test_malformed_adapters_are_refused(tmp_path, case):
    contents, words = malformed(adapter(tiny_model()))[case]
    path = tmp_path / "lora.pt"
    torch.save(contents, path)
    with pytest.raises(WeightFileError) as err:
        load_lora(tiny_model(), path, SPEC, merge=False)
    message = str(err.value)
    assert message.startswith(f"{path} ['generator_lora']: ") and words in message and "\n" not in message


class Code:
    """An object a weights-only load refuses: unpickling it would run code."""


def test_adapter_holding_code_is_refused(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": adapter(tiny_model()), "trainer": Code()}, path)
    with pytest.raises(WeightFileError, match=re.escape(f"{path}: holds objects beyond tensors")):
        load_lora(tiny_model(), path, SPEC, merge=False)


def load_config(path):
    return utils.config.load_config(path, str(REPO / "configs/default_config.yaml"), check_model=check_model)


def test_base_checkpoint_falls_back_to_model_entry(tmp_path):
    generator = WanDiffusionWrapper.from_config(load_config(REPO / "configs/tiny_longlive.yaml"))
    torch.save({"model": generator.state_dict()}, tmp_path / "base.pt")
    spec = LONGLIVE.variant().checkpoint
    assert load_generator_checkpoint(generator, tmp_path / "base.pt", use_ema=False, spec=spec) == "model"
    with pytest.raises(WeightFileError, match="no 'generator_ema' state dict"):
        load_generator_checkpoint(generator, tmp_path / "base.pt", use_ema=True, spec=spec)


@pytest.mark.parametrize("frames, keys", [
    (21, [0, 1, 2, *range(12, 21)]), (33, [0, 1, 2, *range(24, 33)]), (120, [0, 1, 2, *range(111, 120)]),
])
def test_key_sets_of_the_last_block(tmp_path, frames, keys):
    out = tmp_path / "ll.pt"
    assert cli.main(["--config_path", "configs/tiny_longlive.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                     "--num_frames", str(frames), "--capture_step", "all", "--save_mode", "summary",
                     "--output_path", str(out)]) == 0
    for entry in open_cache(out).entries:
        assert entry.key_frame_indices == keys
        assert entry.key_roles[0].tolist() == [1] * 3 * 16 + [0] * 9 * 16  # the 3-frame sink, then the window


@pytest.mark.parametrize("precision, merged", [("exact", False), ("fast", True)])
def test_cli_on_files_in_the_release_layout(tmp_path, capsys, precision, merged):
    config = load_config(REPO / "configs/tiny_longlive.yaml")
    generator = WanDiffusionWrapper.from_config(config)
    torch.save({"generator": generator.state_dict()}, tmp_path / "longlive_base.pt")
    torch.save({"generator_lora": adapter(generator.model, replace(SPEC, rank=256, alpha=256))}, tmp_path / "lora.pt")
    out = tmp_path / "ll.pt"
    base = ["--config_path", "configs/tiny_longlive.yaml", "--device", "cpu", "--num_frames", "6",
            "--precision", precision, "--checkpoint_path", str(tmp_path / "longlive_base.pt"), "--output_path", str(out)]
    assert cli.main([*base, "--lora_path", str(tmp_path / "lora.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"Loaded the LoRA adapter {tmp_path / 'lora.pt'} on 60 layers" in printed
    meta = open_cache(out).metadata
    assert meta["family"] == "longlive" and meta["checkpoint_key"] == "generator" and meta["use_ema"] is False
    assert meta["lora_path"] == str((tmp_path / "lora.pt").resolve()) and meta["lora_merged"] is merged
    assert cli.main(base) == 2
    assert "--lora_path: longlive_models/models/lora.pt not found" in capsys.readouterr().err
