"""Issue 21's frictions of a new user, each as it was met: the aggregator's output in the way of a glob,
repeated items and n = 1, a folder given to the plot, the flags the tiny model needed, the scripts away
from the repository's root, the README's order, the every-pass figure, wrong flags and --help, the panel
numbering, the note on small models and slow errors. On a tiny sweep run here (random weights, CPU)."""
import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

import experiments.aggregate_figure4 as aggregate
import experiments.plot_figure4 as plot
import experiments.report_figure4 as report
import experiments.run_extraction_figure4 as cli
from pipeline import plan as plan_module
from pipeline.plan import options_from_args, plan_run
from utils.sweep_stats import load_statistics

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"run_extraction_figure4.py": cli.parse_args, "plot_figure4.py": lambda argv: plot.build_parser().parse_args(argv),
           "aggregate_figure4.py": lambda argv: aggregate.build_parser().parse_args(argv),
           "report_figure4.py": lambda argv: report.build_parser().parse_args(argv)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny sweep as the README's: 2 prompts x 2 seeds, every pass, summary files; no --no_checkpoint."""
    folder = tmp_path_factory.mktemp("frictions") / "sweep_tiny"
    assert cli.main(["--config_path", "configs/tiny.yaml", "--device", "cpu", "--quiet", "--num_frames", "6",
                     "--prompt", "a red fox in the snow", "--prompt", "a lighthouse at night", "--seeds", "0-1",
                     "--capture_step", "all", "--save_mode", "summary", "--output_dir", str(folder)]) == 0
    return folder


def run(main, capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# 1. the aggregator's output breaks the obvious glob


def test_statistics_never_land_where_the_folder_is_globbed(sweep, tmp_path, capsys):
    code, out, err = run(aggregate.main, capsys, sweep)
    assert code == 0, err
    assert (sweep / "stats" / "statistics.pt").is_file() and not list(sweep.glob("statistics.*"))
    assert f"{sweep / 'stats' / 'statistics.pt'}" in out and out.splitlines()[-1].startswith("Next: ")
    code, _, err = run(aggregate.main, capsys, f"{sweep}/*.pt", "--out", tmp_path / "glob.pt")
    assert code == 0, err
    code, _, err = run(plot.main, capsys, "--cache", f"{sweep}/*.pt", "--pass", "0", "--out", tmp_path / "glob.png")
    assert code == 0, err


def test_a_statistics_file_among_globbed_caches_is_skipped_with_a_note(sweep, tmp_path, capsys):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    assert run(aggregate.main, capsys, folder, "--out", folder / "statistics.pt")[0] == 0  # put where the glob looks
    for main, extra in ((aggregate.main, ["--out", tmp_path / "again.pt"]),
                        (plot.main, ["--pass", "0", "--out", tmp_path / "again.png"])):
        code, _, err = run(main, capsys, f"{folder}/*.pt", *extra)
        assert code == 0, err
        assert f"note: {folder / 'statistics.pt'} is a statistics file" in err and "skipped" in err
    assert load_statistics(tmp_path / "again.pt")["n_items"] == 4
    code, _, err = run(aggregate.main, capsys, folder / "statistics.pt", "--out", tmp_path / "x.pt")
    assert code == 2 and "is a statistics file, not a cache; draw it with" in err and "plot_figure4.py" in err
    code, out, err = run(plot.main, capsys, "--cache", folder / "statistics.pt", "--pass", "0", "--out", tmp_path / "s.png")
    assert code == 0 and "statistics over 4 items" in out, err  # a statistics file is drawn as one, whatever the flag


# 2. statistics traps: repeated items, n = 1, outputs in the repository's root


def test_byte_identical_copies_in_a_second_folder_count_once(sweep, tmp_path, capsys):
    second = tmp_path / "sweep_2"
    second.mkdir()
    for name in ("p0000_s0000.pt", "p0001_s0001.pt"):  # the same items again
        shutil.copy(sweep / name, second / name)
    out = tmp_path / "both.pt"
    code, stdout, err = run(aggregate.main, capsys, sweep, second, "--out", out)
    assert code == 0, err
    assert load_statistics(out)["n_items"] == 4 and "4 items" in stdout
    assert err.count("repeats the item of") == 2 and "counted once" in err
    code, stdout, err = run(plot.main, capsys, sweep, second, "--pass", "0", "--out", tmp_path / "both.png")
    assert code == 0 and "using 4 cache file(s)" in stdout and err.count("repeats the item of") == 2, err


def test_one_item_warns_writes_no_interval_and_stays_out_of_the_current_folder(sweep, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    shutil.copy(sweep / "p0000_s0000.pt", work / "cache" / "one.pt")
    monkeypatch.chdir(work)
    code, out, err = run(aggregate.main, capsys, "cache/one.pt")
    assert code == 0, err
    assert "warning: one item" in err and "no confidence interval" in err
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # nothing in the current folder
    written = work / "cache" / "stats" / "statistics.pt"
    assert "cache/stats/statistics.pt" in out and written.is_file()
    with open(written.with_suffix(".csv"), newline="") as handle:
        pooled = [row for row in csv.DictReader(handle) if row["scope"] == "pooled"]
    assert pooled and all(row["n"] == "1" and row["std"] == row["ci_low"] == row["ci_high"] == "" for row in pooled)
    code, out, err = run(plot.main, capsys, written, "--pass", "0", "--out", "one.png")
    assert code == 0, err
    from utils.figure4_plot import make_figure
    from utils.figure4_sources import StatsFile, select_columns
    fig = make_figure(select_columns(StatsFile(written), passes=[0]), [(0, 0)], "curve", False, 0)
    assert "no confidence interval (n = 1)" in fig._suptitle.get_text()
    assert not any(label == "95% CI" for ax in fig.axes for label in ax.get_legend_handles_labels()[1])
    plt.close(fig)


# 3. the plot refuses a folder


def test_the_plot_takes_a_sweep_folder_like_the_aggregator(sweep, tmp_path, capsys):
    code, out, err = run(plot.main, capsys, sweep, "--pass", "0", "--out", tmp_path / "folder.png")
    assert code == 0, err
    assert "using 4 cache file(s)" in out and (tmp_path / "folder.png").is_file()


# 4. the tiny model needed --device cpu, --no_checkpoint and the config, one error at a time


def test_the_tiny_model_needs_no_device_and_no_checkpoint_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "has_nvidia_gpu", lambda: False)
    args = cli.parse_args(["--config_path", "configs/tiny.yaml", "--output_path", str(tmp_path / "t.pt")])
    plan = plan_run(options_from_args(args), environ={})
    assert plan.device == "cpu" and plan.checkpoint_path is None
    assert plan.notes == ("no CUDA GPU found: running on the CPU (--device chooses)",)
    args = cli.parse_args(["--config_path", "configs/tiny.yaml", "--checkpoint_path", str(tmp_path / "none.pt")])
    with pytest.raises(plan_module.UsageError, match="none.pt not found"):  # one given is still loaded, or refused
        plan_run(options_from_args(args), environ={})


# 5. only from the repository's root with PYTHONPATH=.; 6. the run's last line


def test_the_scripts_run_from_another_folder_without_pythonpath(tmp_path):
    """The README's quick start and the statistics, run in a folder outside the repository with no
    PYTHONPATH: configs/tiny.yaml is the repository's, the paths given are the current folder's, and each
    run's last line is the next command, which runs as printed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    def script(*argv):
        proc = subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()[-1]

    last = script(REPO / "experiments/run_extraction_figure4.py", "--config_path", "configs/tiny.yaml", "--num_frames",
                  "6", "--quiet", "--save_mode", "summary", "--output_path", "tiny.pt")
    assert (tmp_path / "tiny.pt").is_file() and last.startswith("Next: draw the figure: python ")
    words = shlex.split(last.split(": ", 2)[2])
    assert words[1] == str(REPO / "experiments/plot_figure4.py") and words[2:] == ["tiny.pt"]
    script(*words[1:])
    assert (tmp_path / "figure4.png").read_bytes()[:4] == b"\x89PNG"
    last = script(REPO / "experiments/aggregate_figure4.py", "tiny.pt")
    assert (tmp_path / "stats" / "statistics.pt").is_file() and "plot_figure4.py stats/statistics.pt" in last


def test_repository_files_are_found_from_any_folder_user_files_from_the_current_one(tmp_path, monkeypatch):
    from utils.cli import repo_file
    monkeypatch.chdir(tmp_path)
    assert repo_file("configs/tiny.yaml") == str(REPO / "configs/tiny.yaml")
    Path("configs").mkdir()
    Path("configs/tiny.yaml").write_text("base: x\n")  # the user's own file of that name wins
    assert repo_file("configs/tiny.yaml") == "configs/tiny.yaml"
    assert repo_file("configs/none.yaml") == "configs/none.yaml"  # reported as given when found nowhere


def test_readme_quick_start_is_three_commands_to_a_figure(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1]
    assert readme.index("## Quick start") < readme.index("## Real weights") < readme.index("## The cache file")
    commands = [shlex.split(line) for line in quick.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()]
    assert len(commands) <= 3 and commands[0][:2] == ["pip", "install"]
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    mains = {"experiments/run_extraction_figure4.py": cli.main, "experiments/plot_figure4.py": plot.main}
    for command in commands[1:]:
        assert command[0] == "python" and mains[command[1]](command[2:]) == 0, command
        last = capsys.readouterr().out.splitlines()[-1]
    assert Path("figure4.png").read_bytes()[:4] == b"\x89PNG" and last == "wrote figure4.png"


# 7. the every-pass statistics figure


def test_every_pass_statistics_figure_fits_a_page_with_one_legend_and_the_banner(sweep, tmp_path, capsys):
    stats = tmp_path / "stats.pt"
    assert run(aggregate.main, capsys, sweep, "--out", stats)[0] == 0
    from utils.figure4_plot import make_figure
    from utils.figure4_sources import StatsFile, select_columns
    fig = make_figure(select_columns(StatsFile(stats), passes=["all"]), [(0, 0), (4, 3)], "curve", False, 0)
    width, height = fig.get_size_inches()
    assert len(fig.axes) == 10 and width <= 16 and height <= 6  # was 27.5 x 5.6 inches
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    assert "RANDOM WEIGHTS" in fig._suptitle.get_text()
    plt.close(fig)


# 8. wrong flags, two argument styles, --help


@pytest.mark.parametrize("script, argv, suggestion", [
    ("run_extraction_figure4.py", ["--layers", "0", "4"], "--layer_indices"),
    ("run_extraction_figure4.py", ["--output", "x.pt"], "--output_path"),  # no silent abbreviation
    ("plot_figure4.py", ["x.pt", "--pannels", "0:0"], "--panels"),
    ("aggregate_figure4.py", ["x", "--output=y.pt"], "--out"),
])
def test_a_mistyped_option_gets_two_lines_and_a_suggestion(capsys, script, argv, suggestion):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 2, err
    assert f"did you mean {suggestion}" in err and "--help" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_each_default_once_and_explains_every_option(capsys, script):
    with pytest.raises(SystemExit):
        SCRIPTS[script](["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    options = text.split("options:", 1)[1]
    for entry in options.split("\n  -")[1:]:
        assert entry.count("(default") <= 1, entry
        assert len(entry.split("\n", 1)[0].split()) > 1 or "\n" in entry.strip(), f"no help: {entry}"
    if script == "run_extraction_figure4.py":
        assert "--gpu_id GPU_ID" in text and "the GPU of the default device" in text


# 9. panel numbering, the note on small models, slow errors


def test_panel_titles_use_the_numbering_of_panels_and_small_models_get_no_note(sweep, tmp_path, capsys):
    code, out, err = run(plot.main, capsys, sweep / "p0000_s0000.pt", "--pass", "0", "--out", tmp_path / "p.png")
    assert code == 0 and "note" not in out + err and "lacks" not in out + err, out + err
    from utils.attention_cache import open_cache
    from utils.figure4_plot import make_figure
    from utils.figure4_sources import select_columns
    fig = make_figure(select_columns(open_cache(sweep / "p0000_s0000.pt"), passes=[0]), [(4, 3)], "curve", False, 0)
    assert fig.axes[0].get_title().startswith("layer 4 head 3")  # what --panels 4:3 names
    plt.close(fig)


def test_bad_inputs_of_the_plot_and_the_aggregator_are_refused_before_torch_is_imported(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import experiments.plot_figure4 as plot, experiments.aggregate_figure4 as aggregate
assert plot.main([{str(tmp_path / 'none.pt')!r}]) == 2
assert aggregate.main([{str(tmp_path / 'none')!r}]) == 2
assert plot.main([{str(tmp_path / 'none.pt')!r}, "--out", "x.jpg"]) == 2
assert "torch" not in sys.modules and "matplotlib" not in sys.modules, sorted(sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("no such file or folder") == 3
