"""pipeline/plan.py: torch-free, the options taken from the command line once and never changed, the
loaded config left as it was, resolved values in the Plan."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import experiments.run_extraction_figure4 as cli
import pipeline.plan as plan_module
from pipeline.plan import DEFAULT_OUTPUT, UsageError, options_from_args, parse_layers, parse_seeds, plan_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--num_frames", "6"]


def test_importing_the_plan_imports_no_torch():
    code = ("import sys, pipeline.plan; assert 'torch' not in sys.modules, 'pipeline.plan'; "
            "import pipeline.sweep, pipeline.run, experiments.run_extraction_figure4; "
            "assert 'torch' not in sys.modules, 'the script'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_options_hold_every_option_frozen():
    args = cli.parse_args([*TINY, "--layer_indices", "4", "0", "--prompt", "a", "--prompt", "b"])
    options = options_from_args(args)
    assert {f.name for f in dataclasses.fields(options)} == set(vars(args))
    assert options.layer_indices == ("4", "0") and options.prompt == ("a", "b") and options.output_path is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.output_path = "x.pt"


def test_plan_resolves_without_changing_options_or_the_loaded_config(monkeypatch):
    real_load_config, loaded = plan_module.load_config, []

    def load_config(*args, **kwargs):
        loaded.append(real_load_config(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(plan_module, "load_config", load_config)
    options = options_from_args(cli.parse_args([*TINY, "--precision", "fast"]))
    before = dataclasses.replace(options)
    plan = plan_run(options, environ={})
    assert options == before and options.output_path is None and options.precision == "fast"
    assert plan.output_path == DEFAULT_OUTPUT and plan.output_dir is None and plan.dtype == "float32"
    assert plan.config.precision == "fast" and plan.precision == "fast"
    assert loaded[0].precision == "exact"  # the loaded config is not the plan's and was left as it was
    assert plan.items == ((0, 42),) and not plan.sweep and plan.passes == [0] and plan.blocks == [1]


def test_plan_of_a_sweep_and_the_share_of_each_rank(tmp_path):
    options = options_from_args(cli.parse_args([*TINY, "--seeds", "0-2", "--prompt", "a", "--prompt", "b",
                                                "--output_dir", str(tmp_path / "sweep")]))
    plans = [plan_run(options, environ={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    assert plans[0].sweep and plans[0].output_dir == tmp_path / "sweep" and plans[0].output_path is None
    assert [len(p.my_items()) for p in plans] == [3, 3]
    assert sorted(plans[0].my_items() + plans[1].my_items()) == sorted(plans[0].items)


@pytest.mark.parametrize("extra, message", [
    (["--capture_step", "4"], "--capture_step: '4'; expected 0..3, 'cache' or 'all'"),
    (["--capture_blocks", "2"], "--capture_blocks: '2'; expected a block index 0..1 (num_frames / num_frame_per_block "
                                "blocks) or 'last'"),
    (["--capture_blocks", "1", "last"], "--capture_blocks: block 1 given more than once"),
    (["--seeds", "0", "--output_dir", ""], "--output_dir: an empty name; give the sweep's folder"),
])
def test_plan_refusals_keep_their_messages(extra, message):
    with pytest.raises(UsageError) as err:
        plan_run(options_from_args(cli.parse_args([*TINY, *extra])), environ={})
    assert str(err.value) == message


def test_seeds_and_layers():
    assert parse_seeds(["5", "0-2"]) == [5, 0, 1, 2]
    assert parse_layers(("all",), 3) == [0, 1, 2] and parse_layers(("2", "0"), 3) == [2, 0]
    for words, text in [(["2-1"], "runs backwards"), (["1", "0-1"], "[1] given more than once"), (["x"], "'x' is not a seed")]:
        with pytest.raises(UsageError, match=text.replace("[", r"\[").replace("]", r"\]")):
            parse_seeds(words)
