"""Model families (wan/families): the config's family and variant, each variant's schedule against the
formulas (warp onto the shift-5 schedule, Causal Forcing++'s first block), the noise draws it makes,
its checkpoint layout (which state dict, the FSDP prefix the release renames, strict), the default
checkpoint the CLI reads, and configs that state only what differs (``base``)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import experiments.run_extraction_figure4 as cli
import utils.config
from pipeline import plan as plan_module
from pipeline.plan import UsageError
from pipeline.causal_inference import CausalInferencePipeline
from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint
from utils.attention_cache import open_cache
from utils.config import ConfigError
from utils.loading import WeightFileError
from wan.families import FAMILIES, check_model, family_and_variant, schedule_differences
from wan.families.causal_forcing import CAUSAL_FORCING

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml") if p.name != "default_config.yaml")


def load_config(path, **kwargs):
    return utils.config.load_config(path, str(REPO / "configs/default_config.yaml"), check_model=check_model, **kwargs)


def shifted_timesteps(shift=5.0):
    """The 1000 training timesteps of the shifted flow-matching schedule, from the formula:
    sigma = shift * s / (1 + (shift - 1) * s) for s = 1000 points from 1 down to (not including) 0."""
    return [1000 * shift * (1 - i / 1000) / (1 + (shift - 1) * (1 - i / 1000)) for i in range(1000)]


def warped(steps, shift=5.0):
    """Step t indexes 1000 - t into the timesteps (utils/scheduler.py's warp, written out)."""
    table = shifted_timesteps(shift) + [0.0]
    return [table[1000 - t] for t in steps]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_state_their_release_schedule(path):
    config = load_config(REPO / path)
    family, variant = family_and_variant(config)
    assert schedule_differences(OmegaConf.to_container(config, resolve=True), variant) == []


@pytest.mark.parametrize("variant, first, rest", [
    ("chunkwise", [1000, 937.5, 833.33, 625], [1000, 937.5, 833.33, 625]),
    ("framewise", [1000, 937.5, 833.33, 625], [1000, 937.5, 833.33, 625]),
    ("framewise_2step", [1000, 937.5, 833.33, 625], [1000, 833.33]),
    ("framewise_1step", [1000, 937.5, 833.33, 625], [1000]),
])
def test_causal_forcing_schedules(variant, first, rest):
    config = load_config(REPO / f"configs/tiny_causal_forcing_{variant}.yaml")
    pipeline = CausalInferencePipeline(config, "cpu")
    schedule = CAUSAL_FORCING.variant(variant).schedule
    assert pipeline.steps_of(0) == pytest.approx(warped(schedule.first_block_steps or schedule.denoising_steps), abs=1e-3)
    assert pipeline.steps_of(1) == pytest.approx(warped(schedule.denoising_steps), abs=1e-3)
    assert pipeline.steps_of(0) == pytest.approx(first, abs=0.01) and pipeline.steps_of(5) == pytest.approx(rest, abs=0.01)
    assert pipeline.num_frame_per_block == schedule.num_frame_per_block == (3 if variant == "chunkwise" else 1)


class StepRecorder:
    """An observer that records the (block, pass, timestep) of every labelled forward."""

    enabled = True

    def __init__(self):
        self.passes = []

    def begin_forward(self, num_layers):
        pass

    def observe(self, layer_idx, q, k, kv_cache):
        pass

    def wants(self, block, num_blocks, step):
        return True

    def annotate(self, **labels):
        if labels:
            self.passes.append((labels["block"], labels["step"], round(float(labels["timestep"]), 2)))


def test_first_block_steps_and_noise_draws(monkeypatch):
    """Causal Forcing++ 1-step: block 0 (one frame) runs 4 steps and draws 3 noises, later blocks one
    step and none; every block then rewrites its cache at t = 0."""
    config = load_config(REPO / "configs/tiny_causal_forcing_framewise_1step.yaml")
    pipeline = CausalInferencePipeline(config, "cpu")
    recorder = StepRecorder()
    pipeline.generator.model.set_observer(recorder)
    draws = []
    real = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x: draws.append(recorder.passes[-1][0]) or real(x))
    noise = torch.randn(1, 3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipeline.inference(noise, prompt_embeds=torch.zeros(1, 128, 32), return_latents=True)
    assert recorder.passes == [(0, 0, 1000.0), (0, 1, 937.5), (0, 2, 833.33), (0, 3, 625.0), (0, "cache", 0.0),
                               (1, 0, 1000.0), (1, "cache", 0.0), (2, 0, 1000.0), (2, "cache", 0.0)]
    assert draws == [0, 0, 0]


def fsdp_checkpoint(path, generator, prefix, keys=("generator", "generator_ema")):
    state = {name.replace("model.", prefix, 1): value.clone() for name, value in generator.state_dict().items()}
    torch.save({key: state for key in keys}, path)


@pytest.fixture(scope="module")
def tiny_generator():
    return WanDiffusionWrapper.from_config(load_config(REPO / "configs/tiny_causal_forcing_chunkwise.yaml"))


def test_fsdp_prefix_is_renamed_and_loaded_strictly(tmp_path, tiny_generator):
    path = tmp_path / "causal_forcing.pt"
    fsdp_checkpoint(path, tiny_generator, "model._fsdp_wrapped_module.")
    spec = CAUSAL_FORCING.variant("chunkwise").checkpoint
    target = WanDiffusionWrapper.from_config(load_config(REPO / "configs/tiny_causal_forcing_chunkwise.yaml"))
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    assert load_generator_checkpoint(target, path, use_ema=spec.use_ema, spec=spec) == "generator"
    for (name, value), (_, loaded) in zip(tiny_generator.state_dict().items(), target.state_dict().items()):
        assert torch.equal(value, loaded), name


def test_other_prefix_or_missing_key_is_refused(tmp_path, tiny_generator):
    spec = CAUSAL_FORCING.variant("framewise").checkpoint
    path = tmp_path / "other.pt"
    fsdp_checkpoint(path, tiny_generator, "module.")
    with pytest.raises(WeightFileError, match=re.escape(f"{path} ['generator_ema']") + ".*missing.*model.patch_embedding"):
        load_generator_checkpoint(tiny_generator, path, use_ema=True, spec=spec)
    partial = tmp_path / "partial.pt"
    state = {n.replace("model.", "model._fsdp_wrapped_module.", 1): v for n, v in tiny_generator.state_dict().items()
             if n != "model.head.head.bias"}
    torch.save({"generator_ema": state}, partial)
    with pytest.raises(WeightFileError, match="model.head.head.bias"):
        load_generator_checkpoint(tiny_generator, partial, use_ema=True, spec=spec)


def test_family_and_variant_are_checked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: " + str(REPO / "configs/tiny.yaml") + "\nfamily: causal_forcing\nvariant: stepwise\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: variant = 'stepwise'; expected one of family "
                                                    "causal_forcing's variants ['chunkwise', 'framewise'")):
        load_config(path)
    path.write_text("base: " + str(REPO / "configs/tiny.yaml") + "\nfamily: no_such_forcing\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: family = 'no_such_forcing'; expected one of {list(FAMILIES)}")):
        load_config(path)


def test_base_configs(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"base": "other.yaml"}))
    path = tmp_path / "run.yaml"
    path.write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match="base.yaml: base = 'other.yaml'; a base config .* cannot have a base"):
        load_config(path)
    path.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(path)
    path.write_text("base: " + str(REPO / "configs/tiny.yaml") + "\nnum_frame_per_block: 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: num_frame_per_block = 0")):
        load_config(path)
    path.write_text("base: " + str(REPO / "configs/tiny.yaml") + "\n")
    config = load_config(path)
    assert "base" not in config and config.model_config.dim == 64


def test_cli_reads_the_family_and_its_default_checkpoint(tmp_path, capsys):
    out = tmp_path / "cf.pt"
    base = ["--config_path", "configs/tiny_causal_forcing_framewise_2step.yaml", "--device", "cpu", "--quiet",
            "--num_frames", "3", "--output_path", str(out)]
    # a config of random weights loads no checkpoint; real weights default to the family's
    assert cli.main([*base, "--capture_step", "all"]) == 0
    cache = open_cache(out)
    assert cache.metadata["checkpoint_path"] is None
    with pytest.raises(UsageError, match=re.escape("--checkpoint_path: checkpoints/causal-forcing++/framewise-2step.pt "
                                                   "not found")):
        release_checkpoint("causal_forcing", "framewise_2step")
    assert cache.metadata["family"] == "causal_forcing" and cache.metadata["variant"] == "framewise_2step"
    assert cache.metadata["use_ema"] is True and cache.labels == [(2, 0), (2, 1), (2, "cache")]
    config = tmp_path / "changed.yaml"
    changed = yaml.safe_load((REPO / "configs/tiny_causal_forcing_framewise_2step.yaml").read_text())
    changed.update(base=str(REPO / "configs/tiny.yaml"), denoising_step_list=[1000, 750])
    config.write_text(yaml.safe_dump(changed))
    assert cli.main([*base, "--config_path", str(config), "--no_checkpoint"]) == 0
    err = capsys.readouterr().err
    assert f"warning: beyond the release of causal_forcing framewise_2step ({config}): denoising_step_list = " in err
    assert "[1000, 750] (release: [1000, 500])" in err


def release_checkpoint(family, variant):
    """The plan's checkpoint of a real-weights run of a family's variant: its default, checked."""
    options = plan_module.options_from_args(cli.parse_args([]))
    return plan_module._checkpoint(options, FAMILIES[family], FAMILIES[family].variant(variant))


def shifted_sigma(timestep, shift):
    """The sigma of the shifted grid point nearest to ``timestep`` (grid: ``shifted_timesteps``)."""
    grid = shifted_timesteps(shift)
    nearest = min(range(1000), key=lambda i: abs(grid[i] - timestep))
    return grid[nearest] / 1000


@pytest.mark.parametrize("variant, timesteps", [
    ("dmd_3step", [1000, 757, 522]),  # not warped
    ("warp_4step", [1000, 960, 888.89, 727.27]),  # warped on the shift-8 grid (shift 5 gives 937.5, 833.3, 625)
])
def test_causvid_schedules(variant, timesteps):
    config = load_config(REPO / f"configs/tiny_causvid_{variant}.yaml")
    pipeline = CausalInferencePipeline(config, "cpu")
    assert pipeline.steps_of(0) == pipeline.steps_of(3) == pytest.approx(timesteps, abs=0.01)
    assert pipeline.scheduler.sigma(torch.tensor(pipeline.steps_of(0))).tolist() == pytest.approx(
        [shifted_sigma(t, 8.0) for t in pipeline.steps_of(0)], abs=1e-6)
    if variant == "dmd_3step":  # the facts' values
        assert pipeline.scheduler.sigma(torch.tensor([757.0, 522.0])).tolist() == pytest.approx([0.75676, 0.52174], abs=1e-5)


def test_causvid_checkpoint_and_length(tmp_path, capsys, tiny_generator):
    out = tmp_path / "cv.pt"
    base = ["--config_path", "configs/tiny_causvid_dmd_3step.yaml", "--device", "cpu", "--quiet", "--output_path", str(out)]
    assert cli.main([*base, "--use_ema", "--no_checkpoint"]) == 2
    assert "--use_ema: the checkpoint of causvid dmd_3step holds no EMA state dict (only 'generator')" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--checkpoint_path: causvid warp_4step has no released checkpoint"):
        release_checkpoint("causvid", "warp_4step")
    checkpoint = tmp_path / "model.pt"
    torch.save({"generator": tiny_generator.state_dict(), "critic": {}}, checkpoint)
    assert cli.main([*base, "--checkpoint_path", str(checkpoint), "--num_frames", "24"]) == 0
    err = capsys.readouterr().err
    assert "--num_frames 24: the release generates at most 21 latent frames in one call" in err
    meta = open_cache(out).metadata
    assert (meta["family"], meta["variant"], meta["checkpoint_key"], meta["use_ema"]) == ("causvid", "dmd_3step", "generator", False)


def test_families_side_by_side_never_averaged(tmp_path, capsys):
    """One figure with Self-Forcing, Causal Forcing, CausVid and LongLive side by side (--by_model);
    without it, caches of several families are refused, not averaged."""
    import experiments.plot_figure4 as plot

    paths = []
    for config in ("tiny", "tiny_causal_forcing_framewise_2step", "tiny_causvid_dmd_3step", "tiny_longlive"):
        paths.append(str(tmp_path / f"{config}.pt"))
        assert cli.main(["--config_path", f"configs/{config}.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                         "--num_frames", "6", "--save_mode", "summary", "--output_path", paths[-1]]) == 0
    figure = tmp_path / "models.png"
    assert plot.main(["--cache", *paths, "--by_model", "--panels", "0:0", "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0
    out = capsys.readouterr().out
    assert out.count("cache file") == 1 and all(path in out for path in paths)
    assert plot.main(["--cache", paths[0], paths[2], "--panels", "0:0", "--out", str(tmp_path / "mixed.png")]) == 2
    assert "model family differs (('self_forcing', 'dmd', None) vs ('causvid', 'dmd_3step', None))" in capsys.readouterr().err
    assert not (tmp_path / "mixed.png").exists()


def test_by_model_columns_name_their_model(tmp_path):
    from utils.figure4_plot import make_figure
    from utils.figure4_sources import cache_sources

    paths = []
    for config in ("tiny", "tiny_longlive"):
        paths.append(str(tmp_path / f"{config}.pt"))
        assert cli.main(["--config_path", f"configs/{config}.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                         "--num_frames", "6", "--save_mode", "summary", "--output_path", paths[-1]]) == 0
    sources, panels = cache_sources(paths, None, None, [(0, 0)], 0, "frames", "curve", False, by_model=True)
    figure = make_figure(sources, panels, "curve", False, 0, "frames")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["self_forcing, dmd, global: block 1 (frames 3-5), pass 0\nlayer 0 head 0 (L1H1)",
                      "longlive, 1.3b, longlive: block 1 (frames 3-5), pass 0\nlayer 0 head 0 (L1H1)"]
    assert figure.axes[0].get_shared_y_axes().joined(figure.axes[0], figure.axes[1])


@pytest.mark.parametrize("configs, num_frames", [(("tiny_causal_forcing_framewise_2step", "tiny_longlive"), 6),
                                                  (("tiny_reward_forcing", "tiny_infinite_forcing"), 15)])
def test_two_families_in_one_process_equal_one_process_each(tmp_path, configs, num_frames):
    """Two families one after the other in this process, and each alone in a fresh one: the same tensors
    and labels (15 frames: past Reward Forcing's first eviction into its EMA sink)."""

    def argv(config, out):
        return ["--config_path", f"configs/{config}.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                "--num_frames", str(num_frames), "--capture_step", "all", "--save_mode", "summary", "--output_path", str(out)]

    for config in configs:
        assert cli.main(argv(config, tmp_path / f"together_{config}.pt")) == 0
    for config in configs:
        subprocess.run([sys.executable, "experiments/run_extraction_figure4.py", *argv(config, tmp_path / f"alone_{config}.pt")],
                       cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    for config in configs:
        together = torch.load(tmp_path / f"together_{config}.pt", weights_only=True)["attention_weights"]
        alone = torch.load(tmp_path / f"alone_{config}.pt", weights_only=True)["attention_weights"]
        assert len(together) == len(alone) > 0
        for a, b in zip(together, alone):
            for key, value in a.items():
                assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], (config, key)
