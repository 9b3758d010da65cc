"""Sweeps of experiments/run_extraction_figure4.py on the tiny config (CPU): items equal single runs,
resume, settings changes, every pass and every layer, torchrun sharding, prompt files and bad input."""
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import experiments.run_extraction_figure4 as cli
import utils.attention_cache as attention_cache
from utils.attention_cache import describe
from utils.output import Interrupted

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "a lighthouse at night"]
TINY = ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames", "6"]
ITEM_NAMES = ["p0000_s0000.pt", "p0000_s0001.pt", "p0001_s0000.pt", "p0001_s0001.pt"]  # prompt-major item order


def run_sweep(folder, *extra, prompts=PROMPTS, seeds=("0", "1")):
    argv = [*TINY, "--save_mode", "summary", *(w for p in prompts for w in ("--prompt", p)), "--seeds", *seeds,
            "--output_dir", str(folder), *extra]
    return cli.main(argv)


def run_single(path, prompt, seed, *extra):
    return cli.main([*TINY, "--save_mode", "summary", "--prompt", prompt, "--seed", str(seed), "--output_path", str(path),
                     *extra])


def load(path):
    return torch.load(path, weights_only=True)


def assert_entries_equal(a, b):
    """Same keys, bit-identical tensors, equal labels."""
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def file_ids(folder):
    """Per item file: (inode, mtime in ns), to tell an untouched file from a rewritten one."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("p*_s*.pt")}


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_manifest_complete(folder, names=ITEM_NAMES, prompts=PROMPTS, seeds=(0, 1)):
    lines = manifest(folder)
    expected = [(p, prompt, s) for p, prompt in enumerate(prompts) for s in seeds]
    assert [(x["prompt_index"], x["prompt"], x["seed"]) for x in lines] == expected
    assert [x["file"] for x in lines] == names
    for line in lines:
        data = (folder / line["file"]).read_bytes()
        assert line["bytes"] == len(data)
        assert line["sha256"] == hashlib.sha256(data).hexdigest()
        seconds = line["seconds"]  # of the run that made the file
        assert seconds["item"] >= seconds["inference"] + seconds["save"] and seconds["inference"] > 0
        assert line["peak_gib"]["host"] > 0.05 and line["peak_gib"]["gpu"] is None  # on the CPU
    return lines


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    """A finished 2-prompt x 2-seed sweep with every pass; tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("sweep") / "sweep"
    assert run_sweep(folder, "--capture_step", "all") == 0
    return folder


@pytest.fixture
def sweep_copy(sweep_folder, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep_folder, folder)
    return folder


def test_each_item_is_bit_identical_to_the_single_run(sweep_folder, tmp_path):
    assert sorted(p.name for p in sweep_folder.glob("*.pt")) == ITEM_NAMES
    items = {}
    for name in ITEM_NAMES:
        prompt_index, seed = int(name[1:5]), int(name[7:11])
        single = tmp_path / f"single_{name}"
        assert run_single(single, PROMPTS[prompt_index], seed, "--capture_step", "all") == 0
        swept, alone = load(sweep_folder / name), load(single)
        assert swept["prompt"] == PROMPTS[prompt_index] and swept["metadata"]["seed"] == seed
        assert len(swept["attention_weights"]) == 2 * 5  # layers 0 and 4, passes 0..3 and cache
        for a, b in zip(swept["attention_weights"], alone["attention_weights"], strict=True):
            assert_entries_equal(a, b)
        assert swept["metadata"] == alone["metadata"]
        items[name] = swept["attention_weights"][0]["query_mean_logits"]
    # Items differ: another seed or another prompt gives other logits (the equality above is not vacuous).
    assert not torch.equal(items["p0000_s0000.pt"], items["p0000_s0001.pt"])
    assert not torch.equal(items["p0000_s0000.pt"], items["p0001_s0000.pt"])


def test_settings_are_recorded(sweep_folder):
    stored = json.loads((sweep_folder / "sweep.json").read_text())
    assert stored["capture_step"] == "all" and stored["layer_indices"] == [0, 4] and stored["num_frames"] == 6
    for name in ITEM_NAMES:
        assert describe(sweep_folder / name)["metadata"]["settings"] == stored


def test_resume_redoes_only_the_deleted_item(sweep_copy):
    before = file_ids(sweep_copy)
    old = (sweep_copy / "p0001_s0000.pt").read_bytes()
    (sweep_copy / "p0001_s0000.pt").unlink()
    assert run_sweep(sweep_copy, "--capture_step", "all") == 0
    after = file_ids(sweep_copy)
    assert set(after) == set(ITEM_NAMES)
    for name in ITEM_NAMES:
        assert (after[name] == before[name]) == (name != "p0001_s0000.pt"), name
    assert (sweep_copy / "p0001_s0000.pt").read_bytes() == old  # redone: the same bytes again
    assert_manifest_complete(sweep_copy)


def test_interrupted_sweep_leaves_no_file_and_resumes(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "sweep"
    real_save, saves = torch.save, []

    def save_then_interrupt(obj, handle):
        saves.append([p.name for p in folder.iterdir() if p.name.endswith(".tmp")])
        if len(saves) == 3:
            handle.write(b"half a file")
            raise Interrupted(signal.SIGINT)
        real_save(obj, handle)

    monkeypatch.setattr(attention_cache.torch, "save", save_then_interrupt)
    assert run_sweep(folder) == 130
    assert "interrupted by SIGINT" in capsys.readouterr().err
    (tmp,) = saves[2]
    assert tmp.startswith(".p0001_s0000.pt.")  # the third item was being written to a temporary file
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.jsonl", "p0000_s0000.pt", "p0000_s0001.pt", "sweep.json"]
    assert [x["file"] for x in manifest(folder)] == ITEM_NAMES[:2]
    before = file_ids(folder)

    monkeypatch.setattr(attention_cache.torch, "save", real_save)
    assert run_sweep(folder) == 0
    after = file_ids(folder)
    assert {n: after[n] for n in before} == before
    assert set(after) == set(ITEM_NAMES)
    assert_manifest_complete(folder)


def test_truncated_item_is_redone(sweep_copy):
    before = file_ids(sweep_copy)
    victim = sweep_copy / "p0000_s0001.pt"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # same name, not a valid cache any more
    assert run_sweep(sweep_copy, "--capture_step", "all") == 0
    assert victim.read_bytes() == good
    after = file_ids(sweep_copy)
    assert [n for n in ITEM_NAMES if after[n] != before[n]] == ["p0000_s0001.pt"]
    assert_manifest_complete(sweep_copy)


@pytest.mark.parametrize("option, value, setting", [
    ("--layer_indices", ["1"], "layer_indices"),
    ("--num_frames", ["3"], "num_frames"),
    ("--capture_step", ["2"], "capture_step"),
])
def test_changed_settings_are_refused_unless_overwrite(sweep_copy, capsys, option, value, setting):
    before = file_ids(sweep_copy)
    settings_before = (sweep_copy / "sweep.json").read_bytes()
    argv = ["--capture_step", "all", option, *value] if option != "--capture_step" else [option, *value]
    assert run_sweep(sweep_copy, *argv) == 2
    err = capsys.readouterr().err
    assert setting in err and "--overwrite" in err and str(sweep_copy) in err
    assert file_ids(sweep_copy) == before and (sweep_copy / "sweep.json").read_bytes() == settings_before

    assert run_sweep(sweep_copy, *argv, "--overwrite") == 0
    stored = json.loads((sweep_copy / "sweep.json").read_text())
    after = file_ids(sweep_copy)
    for name in ITEM_NAMES:
        assert after[name] != before[name]
        meta = describe(sweep_copy / name)["metadata"]
        assert meta["settings"] == stored
    changed = {"layer_indices": [1], "num_frames": 3, "capture_step": "2"}[setting]
    assert stored[setting] == changed
    held = describe(sweep_copy / ITEM_NAMES[0])
    assert {"layer_indices": held["layer_indices"], "num_frames": held["num_frames"],
            "capture_step": held["metadata"]["capture_step"]}[setting] == changed
    assert_manifest_complete(sweep_copy)


def test_capture_step_all_equals_the_five_single_pass_runs(sweep_folder, tmp_path):
    every = load(sweep_folder / "p0001_s0001.pt")["attention_weights"]
    assert [(e["layer_idx"], e["pass"]) for e in every] == [(l, p) for l in (0, 4) for p in (0, 1, 2, 3, "cache")]
    for step in ("0", "1", "2", "3", "cache"):
        path = tmp_path / f"step_{step}.pt"
        assert run_single(path, PROMPTS[1], 1, "--capture_step", step) == 0
        single = load(path)["attention_weights"]
        assert len(single) == 2
        for entry in single:
            (match,) = [e for e in every if e["layer_idx"] == entry["layer_idx"] and str(e["pass"]) == step]
            assert_entries_equal(match, entry)


def test_layer_indices_all_captures_every_layer_in_order(tmp_path):
    every, alone = tmp_path / "all.pt", tmp_path / "three.pt"
    assert run_single(every, PROMPTS[0], 3, "--layer_indices", "all") == 0
    assert run_single(alone, PROMPTS[0], 3, "--layer_indices", "3") == 0
    data = load(every)
    assert data["layer_indices"] == list(range(6))  # the tiny model's 6 layers
    assert [e["layer_idx"] for e in data["attention_weights"]] == list(range(6))
    assert_entries_equal(data["attention_weights"][3], load(alone)["attention_weights"][0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_shares_give_the_same_files(tmp_path):
    seeds = ["5", "6", "7"]  # 3 items on 2 processes: shares of 2 and 1
    one = tmp_path / "one"
    assert run_sweep(one, prompts=PROMPTS[:1], seeds=seeds) == 0
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "experiments/run_extraction_figure4.py", *TINY, "--save_mode", "summary",
               "--prompt", PROMPTS[0], "--seeds", *seeds, "--output_dir", str(two)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and ("init_process_group" in done.stderr or "DistNetworkError" in done.stderr):
        pytest.skip(f"torch.distributed cannot start a process group here: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    names = ["p0000_s0005.pt", "p0000_s0006.pt", "p0000_s0007.pt"]
    assert sorted(p.name for p in two.glob("*.pt")) == sorted(p.name for p in one.glob("*.pt")) == names
    for name in names:
        a, b = load(one / name), load(two / name)
        for x, y in zip(a["attention_weights"], b["attention_weights"], strict=True):
            assert_entries_equal(x, y)
    lines = assert_manifest_complete(two, names=names, prompts=PROMPTS[:1], seeds=(5, 6, 7))
    assert [x["rank"] for x in lines] == [0, 1, 0]  # items[rank::2]
    assert not [p for p in two.iterdir() if p.name.endswith(".tmp")]


def test_prompts_file_skips_blank_and_comment_lines(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# first a comment\n{PROMPTS[0]}\n\n   \n  # indented comment\n  {PROMPTS[1]}  \n", encoding="utf-8")
    folder = tmp_path / "sweep"
    argv = [*TINY, "--save_mode", "summary", "--layer_indices", "0", "--prompts_file", str(prompts), "--seeds", "0",
            "--output_dir", str(folder)]
    assert cli.main(argv) == 0
    assert_manifest_complete(folder, names=["p0000_s0000.pt", "p0001_s0000.pt"], seeds=(0,))


@pytest.mark.parametrize("case", ["invalid utf-8", "seed and seeds", "several items, no folder"])
def test_bad_sweep_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "invalid utf-8":
        prompts = tmp_path / "prompts.txt"
        prompts.write_bytes(b"a fine prompt\n# comment\ncaf\xe9 latin-1\n")
        argv = ["--prompts_file", str(prompts), "--output_dir", str(out)]
        words = ["--prompts_file", "UTF-8", "line 3"]
    elif case == "seed and seeds":
        argv = ["--seed", "1", "--seeds", "2", "3", "--output_dir", str(out)]
        words = ["--seed", "--seeds"]
    else:
        argv = ["--prompt", "a", "--seeds", "0", "1"]
        words = ["--output_dir", "2 items"]
    assert cli.main([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["prompts.txt"] if case == "invalid utf-8" else [])


def readme_block(title):
    """The commands of the first bash block after README heading ``title``, continuation lines joined."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(f"## {title}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#")[0]) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_sweep_commands_run_as_written_and_resume(tmp_path, monkeypatch):
    """The README's sweep, aggregate and plot commands, run as written (in a folder holding the
    project's configs), then the sweep again: every item is complete, so nothing is redone."""
    import experiments.aggregate_figure4 as aggregate
    import experiments.plot_figure4 as plot

    mains = {"experiments/run_extraction_figure4.py": cli.main, "experiments/aggregate_figure4.py": aggregate.main,
             "experiments/plot_figure4.py": plot.main}
    commands = readme_block("Sweeps")
    assert [c[1] for c in commands] == list(mains)
    (tmp_path / "configs").symlink_to(Path("configs").resolve())
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert command[0] == "python" and mains[command[1]](command[2:]) == 0, command
    files = sorted(Path("cache/sweep_tiny").glob("p*_s*.pt"))
    assert [f.name for f in files] == [f"p{p:04d}_s{s:04d}.pt" for p in range(2) for s in range(3)]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert cli.main(commands[0][2:]) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert Path("sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
