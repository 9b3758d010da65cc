"""experiments/report_figure4.py on the tiny configs (CPU): the page parses, every image is embedded,
every table is its CSV, the sink scores equal a direct numpy computation from the item files, and a
re-run with one more seed computes only the missing items; bad input is refused before any sweep."""
import base64
import contextlib
import csv
import io
import math
import os
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import experiments.report_figure4 as report_cli
from pipeline import plan as plan_module
from utils.attention_cache import open_cache

PROMPTS = ("a red fox in the snow", "a lighthouse at night")
T_975 = {1: 12.706205, 2: 4.302653, 5: 2.570582}  # two-sided 95% table values by degrees of freedom
SETTINGS = ("sf=configs/tiny.yaml --num_frames 6", "df=configs/tiny_deep_forcing.yaml --num_frames 12")


def report_argv(out, seeds):
    """The README's flags: no --device cpu, no --no_checkpoint (the tiny configs have random weights)."""
    return [*(w for p in PROMPTS for w in ("--prompt", p)), "--seeds", *seeds, "--setting", SETTINGS[0], "--setting",
            SETTINGS[1], "--out", str(out)]


def item_ids(out):
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("sweeps/*/p*_s*.pt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A report of 2 prompts x 2 seeds x 2 settings, then the same with a third seed: the folder, each
    run's printed lines and the item files (inode, mtime) after each."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    printed, ids = [], []
    for seeds in (["0-1"], ["0-2"]):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), pytest.MonkeyPatch.context() as patch:
            patch.setattr(plan_module, "has_nvidia_gpu", lambda: False)  # the CPU by default, as on a machine without
            assert report_cli.main(report_argv(out, seeds)) == 0
        printed.append(text.getvalue())
        ids.append(item_ids(out))
    return out, printed, ids


@pytest.fixture
def report(runs):
    return runs[0]


def test_report_then_one_more_seed(runs):
    out, (first, second), (before, after) = runs
    assert first.strip().splitlines()[-1] == f"Report: {out / 'report.html'} (open it in a web browser)"
    assert len(before) == 2 * 2 * 2 and len(after) == 2 * 2 * 3
    assert {k: after[k] for k in before} == before  # the items of seeds 0 and 1 were not computed again
    assert second.count("4 of this process's 6 already complete") == 2
    assert second.count("seed 2, inference") == 4 and "seed 0, inference" not in second
    assert second.strip().splitlines()[-1] == f"Report: {out / 'report.html'} (open it in a web browser)"
    assert "[1/4] sweep 'sf'" in second and "[4/4] figures and the page" in second


class Page(HTMLParser):
    """The tables (by their data-csv name: rows of cell strings) and the image sources of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self._table, self._row, self._cell = {}, [], [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs["data-csv"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("link", "script"):
            self.links.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_page_is_self_contained_and_its_tables_are_the_csvs(report):
    out = report
    page = Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    assert page.links == []  # no stylesheet or script fetched from anywhere
    assert len(page.images) == 5  # compare, 2 overlays, 2 head maps (one (block, pass) per setting)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    names = {"settings.csv", "files.csv", "sink_scores.csv", "head_classes.csv", "heads.csv"}
    assert set(page.tables) == names
    for name in names:
        assert page.tables[name] == read_csv(out / name), name
    heads = read_csv(out / "heads.csv")
    assert len(heads) == 1 + 2 * 2 * 4  # settings x layers (0 and 4) x heads
    assert {row[-1] for row in heads[1:]} <= {"sink", "local", "spread"}
    files = read_csv(out / "files.csv")[1:]
    assert sorted((r[0], r[1], r[2]) for r in files) == sorted(
        (s, str(p), str(seed)) for s in ("sf", "df") for p in range(2) for seed in range(3))
    assert (out / "stats" / "sf.pt").is_file() and (out / "stats" / "df.csv").is_file()


def test_sink_scores_equal_a_direct_computation(report):
    """The sink table's sink mass and sink logit gap of setting sf (global attention: the sink is video
    frame 0), from the item files with numpy: per item the mean over heads, then the mean and its CI."""
    out = report
    rows = [r for r in csv.DictReader(open(out / "sink_scores.csv", newline="", encoding="utf-8")) if r["setting"] == "sf"]
    assert [r["layer"] for r in rows] == ["0", "4"]
    caches = [open_cache(p) for p in sorted((out / "sweeps" / "sf").glob("p*_s*.pt"))]
    assert len(caches) == 6
    for row in rows:
        layer = int(row["layer"])
        masses, gaps = [], []
        for cache in caches:
            entry = cache.entries[[e.layer_idx for e in cache.entries].index(layer)]
            summary = {k: v.double().numpy()[0] for k, v in entry.tensors.items()}  # [N, Fq, Fk]
            mass = summary["frame_attention_mass"].mean(axis=1)  # [N, Fk]
            logit = summary["frame_mean_logits"].mean(axis=1)
            assert entry.query_frames == [3, 4, 5]
            masses.append(mass[:, 0].mean())
            gaps.append((logit[:, 0] - logit[:, 1:3].mean(axis=1)).mean())
        for name, values in (("sink_mass", masses), ("sink_logit_gap", gaps)):
            values = np.array(values)
            mean, half = values.mean(), T_975[5] * values.std(ddof=1) / math.sqrt(len(values))
            for field, want in (("mean", mean), ("ci_low", mean - half), ("ci_high", mean + half)):
                assert float(row[f"{name}_{field}"]) == pytest.approx(want, rel=2e-5, abs=1e-9), (name, field)


def test_reserved_and_bad_options_are_refused_before_any_sweep(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["--prompt", "a", "--device", "cpu", "--out", str(out)]
    code = report_cli.main([*base, "--setting", "sf=configs/tiny.yaml --output_dir x"])
    assert code == 2 and "--setting sf: --output_dir is set by the report" in capsys.readouterr().err
    code = report_cli.main([*base, "--setting", "sf=configs/tiny.yaml", "--setting", "bad=configs/nothing.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and "--setting bad: --config_path" in err and "configs/nothing.yaml" in err
    code = report_cli.main([*base, "--setting", "a=configs/tiny.yaml", "--setting", "a=configs/tiny_longlive.yaml"])
    assert code == 2 and "name 'a' given more than once" in capsys.readouterr().err
    code = report_cli.main([*base, "--setting", "sf=configs/tiny.yaml", "--panels", "9:0"])
    assert code == 2 and "--panels 9:0: setting sf captures layers [0, 4]" in capsys.readouterr().err
    assert not out.exists()


def test_a_compressing_setting_has_head_analysis_but_no_per_frame_statistics(tmp_path, capsys):
    out = tmp_path / "pc"
    argv = ["--prompt", "a red fox", "--seeds", "0-1", "--setting", "pc=configs/tiny_deep_forcing.yaml --num_frames 48",
            "--device", "cpu", "--out", str(out)]
    assert report_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: pc: its items hold other key frames" in printed and not (out / "stats").exists()
    first, second = (open_cache(p).entries[0].key_frame_indices for p in sorted((out / "sweeps" / "pc").glob("*.pt")))
    assert first != second  # top-C kept other frames in each item
    heads = read_csv(out / "heads.csv")[1:]
    assert len(heads) == 2 * 4 and {row[0] for row in heads} == {"pc"}
    sinks = [float(row[7]) for row in heads]  # the policy's 10 sink frames hold mass in every head
    assert all(0 < s < 1 for s in sinks)
    page = Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(page.images) == 1 and page.tables["heads.csv"] == read_csv(out / "heads.csv")


@pytest.mark.parametrize("option, value, message", [
    ("--sink_threshold", "1.5", "argument --sink_threshold: '1.5' is not a number in (0, 1]"),
    ("--sink_frames", "0", "argument --sink_frames: '0' is not an int >= 1"),
])
def test_bad_thresholds_exit_2(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        report_cli.main(["--setting", "configs/tiny.yaml", option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_readme_and_docs_report_commands_are_valid(tmp_path, monkeypatch):
    """The report commands of README.md and docs/report.md, as a newcomer runs them (from another folder,
    no PYTHONPATH, no --device or --no_checkpoint, on a machine without a GPU), parse and pass every
    check that runs before the sweeps (settings, configs, output folder): the CPU, no checkpoint."""
    from pipeline.report import check_report

    repo = Path(__file__).resolve().parents[1]
    commands = []
    for doc in ("README.md", "docs/report.md"):
        text = (repo / doc).read_text().replace("\\\n", " ")
        commands += [line for line in text.splitlines() if "experiments/report_figure4.py" in line
                     and line.startswith("python ")]
    assert len(commands) == 2
    readme = (repo / "README.md").read_text()
    section = readme.split("## A report comparing two settings", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    assert [line.split()[:2] for line in block.splitlines()] == [["pip", "install"], ["python", "experiments/report_figure4.py"]]
    assert readme.index("## Quick start") < readme.index("## A report comparing two settings") < readme.index("## Sweeps")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan_module, "has_nvidia_gpu", lambda: False)
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["python", "experiments/report_figure4.py"]
        assert "--device" not in words and "--no_checkpoint" not in words
        report = report_cli.report_options(words[2:])
        assert [s.name for s in report.settings] == ["sf", "ds"]
        plans = check_report(report)
        assert [(p.device, p.checkpoint_path) for p in plans] == [("cpu", None)] * 2
        assert not Path("reports").exists()


def test_the_report_runs_from_another_folder_without_pythonpath(tmp_path):
    """The script itself, from a folder outside the repository with no PYTHONPATH: --help, and a bad setting
    refused naming it (exit 2) before any sweep."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = [sys.executable, str(repo / "experiments/report_figure4.py")]
    proc = subprocess.run([*script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--setting" in proc.stdout, proc.stderr
    proc = subprocess.run([*script, "--setting", "x=configs/nothing.yaml", "--out", "r"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--setting x: --config_path" in proc.stderr and not (tmp_path / "r").exists()


def test_a_mistyped_option_is_suggested_among_the_report_and_the_extraction_options(capsys):
    for argv, suggestion in ((["--setting", "configs/tiny.yaml", "--sink_treshold", "0.3"], "--sink_threshold"),
                             (["--setting", "configs/tiny.yaml", "--num_frame", "6"], "--num_frames")):
        with pytest.raises(SystemExit) as exit_info:
            report_cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"did you mean {suggestion}" in err and len(err.splitlines()) == 2, err


def test_a_full_disk_while_writing_the_page_keeps_the_old_page_csvs_and_figures(runs, monkeypatch, capsys):
    """The page's tables are its CSVs: the page, the CSVs and the figures are replaced together or not at all."""
    import errno

    from utils import report_html

    out = runs[0]
    written = sorted(p for p in out.glob("*") if p.is_file()) + sorted(out.glob("figures/*.png"))
    before = {p: p.stat().st_ino for p in written}
    real = report_html.page

    class FullDisk(str):
        def encode(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_html, "page", lambda *args: FullDisk(real(*args)))
    monkeypatch.setattr(plan_module, "has_nvidia_gpu", lambda: False)
    assert report_cli.main(report_argv(out, ["0-2"])) == 1
    assert "no space left" in capsys.readouterr().err
    assert {p: p.stat().st_ino for p in written} == before
    assert not [p for p in out.rglob("*.tmp")]
