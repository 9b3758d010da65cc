"""The sweep folder is never trusted (issue 23, causes 4-6): every file of it checked before any item
runs (exit 2 naming the file), a full disk while appending to the manifest reported as one line (exit
1), manifest lines that disagree with their files repaired, stale temporary files removed, and the
folder locked for one run (one torchrun process group)."""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments.aggregate_figure4 as aggregate
import experiments.run_extraction_figure4 as cli
from pipeline.sweep import SweepFolderError, check_lock_holder, lock_folder
from utils.attention_cache import describe

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "a lighthouse at night"]
ARGS = ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames", "3",
        "--layer_indices", "0", "--save_mode", "summary", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "0", "1"]
NAMES = ["p0000_s0000.pt", "p0000_s0001.pt", "p0001_s0000.pt", "p0001_s0001.pt"]
BAD_JSON_FILES = {  # what a sweep-folder JSON file may wrongly hold
    "list": b"[1, 2]\n", "null": b"null\n", "number": b"42\n", "string": b'"settings"\n', "true": b"true\n",
    "invalid utf-8": b'{"a": "caf\xe9"}\n', "truncated json": b'{"capture_step": "0", "num_fr', "empty": b"",
}


def sweep(folder, *extra):
    return cli.main([*ARGS, "--output_dir", str(folder), *extra])


def items(folder):
    return sorted(p.name for p in folder.glob("p*_s*.pt"))


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    return err


def manifest(folder):
    return [json.loads(t) for t in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_manifest_agrees(folder, untimed=()):
    """Every line says what its file says, each item once, in item order; with the timings of the run
    that made the file (except for the files of ``untimed``, whose line was never written)."""
    lines = manifest(folder)
    assert [x["file"] for x in lines] == NAMES
    for line in lines:
        data = (folder / line["file"]).read_bytes()
        held = describe(folder / line["file"])
        assert line["prompt"] == held["prompt"] == PROMPTS[line["prompt_index"]]
        assert line["seed"] == held["metadata"]["seed"] and line["file"] == f"p{line['prompt_index']:04d}_s{line['seed']:04d}.pt"
        assert line["bytes"] == len(data) and line["sha256"] == hashlib.sha256(data).hexdigest()
        if line["file"] not in untimed:
            assert "seconds" in line and "peak_gib" in line


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    folder = tmp_path_factory.mktemp("done") / "sweep"
    assert sweep(folder) == 0
    return folder


@pytest.fixture
def copy(done, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(done, folder)
    return folder


def replace(path, kind):
    """Put a wrong thing of ``kind`` where ``path`` is: a folder, a FIFO, or the bytes of BAD_JSON_FILES."""
    if path.is_file():
        path.unlink()
    if kind == "folder":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(BAD_JSON_FILES[kind])


# Cause 4: every sweep-folder file checked against what it must be, before any item runs.

@pytest.mark.parametrize("kind", [*BAD_JSON_FILES, "folder", "fifo"])
def test_bad_settings_file_exits_2_before_any_item(tmp_path, capsys, kind):
    folder = tmp_path / "sweep"
    folder.mkdir()
    replace(folder / "sweep.json", kind)
    assert sweep(folder) == 2
    one_line_error(capsys, str(folder / "sweep.json"))
    assert items(folder) == [] and not (folder / "manifest.jsonl").exists()


@pytest.mark.parametrize("kind", [*BAD_JSON_FILES, "folder", "fifo"])
def test_bad_settings_file_of_a_finished_sweep_exits_2(copy, capsys, kind):
    before = {n: (copy / n).stat().st_mtime_ns for n in NAMES}
    replace(copy / "sweep.json", kind)
    assert sweep(copy) == 2
    one_line_error(capsys, str(copy / "sweep.json"))
    assert {n: (copy / n).stat().st_mtime_ns for n in NAMES} == before


MANIFEST_CASES = {
    "folder": None, "fifo": None, "invalid utf-8": None, "list": None, "null": None, "number": None, "string": None,
    "truncated json": None,
    "truncated line": lambda good: good[: len(good) - 40],
    "line without file": lambda good: good.replace(b'"file": ', b'"fyle": ', 1),
    "file outside the folder": lambda good: good.replace(b'"file": "p0000_s0000.pt"', b'"file": "../../etc/passwd"', 1),
    "seed not an integer": lambda good: good.replace(b'"seed": 0', b'"seed": "0"', 1),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_bad_manifest_exits_2_before_any_item(copy, capsys, case):
    """A bad manifest is reported before the items run (it was a traceback after every item had run)."""
    path = copy / "manifest.jsonl"
    (copy / "p0001_s0001.pt").unlink()  # one item to redo: it must not be done before the manifest is refused
    if MANIFEST_CASES[case] is None:
        replace(path, "empty" if case == "empty" else case)
    else:
        path.write_bytes(MANIFEST_CASES[case](path.read_bytes()))
    kept = path.read_bytes() if path.is_file() else None
    assert sweep(copy) == 2
    one_line_error(capsys, str(path))
    assert items(copy) == NAMES[:3]
    assert (path.read_bytes() if path.is_file() else None) == kept


@pytest.mark.parametrize("case", ["folder", "invalid utf-8", "list", "truncated json", "listed twice"])
def test_aggregator_refuses_a_bad_manifest_in_one_line(copy, capsys, case):
    path = copy / "manifest.jsonl"
    if case == "listed twice":
        good = path.read_bytes()
        path.write_bytes(good.replace(b'"file": "p0000_s0001.pt"', b'"file": "p0000_s0000.pt"'))
    else:
        replace(path, case)
    assert aggregate.main([str(copy), "--out", str(copy.parent / "stats.pt")]) == 2
    one_line_error(capsys, str(path))
    assert not (copy.parent / "stats.pt").exists()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_item_path_that_is_not_a_file_exits_2_before_any_item(tmp_path, capsys, kind):
    folder = tmp_path / "sweep"
    folder.mkdir()
    replace(folder / NAMES[2], kind)
    assert sweep(folder) == 2
    one_line_error(capsys, str(folder / NAMES[2]))
    assert items(folder) == [NAMES[2]] and not (folder / "manifest.jsonl").exists()


def test_lock_file_that_is_a_folder_exits_2(tmp_path, capsys):
    folder = tmp_path / "sweep"
    (folder / ".sweep.lock").mkdir(parents=True)
    assert sweep(folder) == 2
    one_line_error(capsys, ".sweep.lock")
    assert items(folder) == []


def test_output_dir_a_dangling_symlink_exits_2(tmp_path, capsys):
    link = tmp_path / "sweep"
    link.symlink_to(tmp_path / "gone")
    assert sweep(link) == 2
    one_line_error(capsys, str(link), "dangling")
    assert not (tmp_path / "gone").exists() and link.is_symlink()


def test_output_dir_a_symlink_to_a_folder_works(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "sweep").symlink_to(tmp_path / "real")
    assert sweep(tmp_path / "sweep") == 0
    assert items(tmp_path / "real") == NAMES


@pytest.mark.parametrize("how", ["nothing written", "half a line written"])
def test_no_space_when_appending_to_the_manifest_exits_1_in_one_line(tmp_path, monkeypatch, capsys, how):
    folder = tmp_path / "sweep"
    real_write = os.write

    def full_disk(fd, data):
        if data.startswith(b'{"prompt_index": 0, "prompt": "a red fox in the snow", "seed": 1'):
            if how == "half a line written":
                return real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    assert sweep(folder) == 1
    one_line_error(capsys, "no space left", str(folder / "manifest.jsonl"))
    lines = manifest(folder)  # every line whole: no half line left behind
    assert [x["file"] for x in lines] == NAMES[:1]
    monkeypatch.setattr(os, "write", real_write)
    assert sweep(folder) == 0  # the item whose line was lost is complete: kept, its line made from the file
    assert_manifest_agrees(folder, untimed=NAMES[1:2])


# Cause 5: manifest lines checked against their files; stale temporary files removed.

@pytest.mark.parametrize("edit", [
    ("file", b'"file": "p0000_s0001.pt"', b'"file": "p0000_s0000.pt"'),
    ("sha256", b'"sha256": "', b'"sha256": "0'),
    ("prompt", b'"prompt": "a red fox in the snow", "seed": 1', b'"prompt": "a red cat in the snow", "seed": 1'),
    ("seed", b'"seed": 1, "file": "p0000_s0001.pt"', b'"seed": 0, "file": "p0000_s0001.pt"'),
    ("prompt_index", b'"prompt_index": 1, "prompt": "a lighthouse at night", "seed": 0',
     b'"prompt_index": 0, "prompt": "a lighthouse at night", "seed": 0'),
])
def test_edited_manifest_line_of_the_same_size_is_repaired_on_resume(copy, edit):
    key, old, new = edit
    path = copy / "manifest.jsonl"
    good = path.read_bytes()
    if key == "sha256":  # one hex digit changed, the length kept
        start = good.index(old) + len(old)
        digit = good[start:start + 1]
        edited = good[:start] + (b"0" if digit != b"0" else b"1") + good[start + 1:]
    else:
        assert good.count(old) == 1
        edited = good.replace(old, new)
    assert len(edited) == len(good) and edited != good
    path.write_bytes(edited)
    stamps = {n: (copy / n).stat().st_mtime_ns for n in NAMES}
    assert sweep(copy) == 0
    assert {n: (copy / n).stat().st_mtime_ns for n in NAMES} == stamps  # repaired from the files, nothing redone
    assert_manifest_agrees(copy)
    assert aggregate.main([str(copy), "--out", str(copy.parent / "stats.pt")]) == 0


STALE = [".p0000_s0001.pt.k2j3h4.tmp", ".p0001_s0000.pt.zzz.tmp", ".sweep.json.a1b2c3.tmp", ".manifest.jsonl.q9.tmp"]


def test_stale_temporary_files_are_removed_on_resume(copy):
    for name in STALE:
        (copy / name).write_bytes(b"half a file")
    (copy / ".notes.tmp").write_text("not ours")  # not the temporary file of a folder file: kept
    (copy / "p0001_s0001.pt").unlink()
    assert sweep(copy) == 0
    assert sorted(p.name for p in copy.iterdir()) == [".notes.tmp", "manifest.jsonl", *NAMES, "sweep.json"]
    assert_manifest_agrees(copy)


KILLED_RUN = """
import os, signal, sys
import experiments.run_extraction_figure4 as cli
import utils.attention_cache as attention_cache
real_save, saves = attention_cache.torch.save, []
def save_then_die(obj, handle):
    saves.append(1)
    if len(saves) == 2:
        handle.write(b"half a file"); handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, handle)
attention_cache.torch.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_run_killed_with_sigkill_leaves_a_temp_file_that_the_resume_removes(tmp_path):
    folder = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, *ARGS, "--output_dir", str(folder)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (tmp,) = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert tmp.startswith(".p0000_s0001.pt.")
    assert sweep(folder) == 0  # the killed run's lock went with it
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.jsonl", *NAMES, "sweep.json"]
    assert_manifest_agrees(folder)


# Cause 6: one run at a time in a folder.

def test_two_sweeps_started_at_once_one_is_refused(tmp_path):
    folder = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def start(step):
        return subprocess.Popen([sys.executable, "experiments/run_extraction_figure4.py", *ARGS, "--seeds",
                                 *map(str, range(6)), "--output_dir", str(folder), "--capture_step", step], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [start("0")]
    deadline = time.monotonic() + 60  # the second starts once the first holds the folder (it then still imports torch)
    while not (folder / ".sweep.lock").exists() and runs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    runs.append(start("1"))
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (refused,) = [err for code, err in results if code == 2]
    assert refused.count("\n") == 1 and "in use by another run" in refused and "pid " in refused, refused
    assert socket.gethostname() in refused and "started" in refused
    step = json.loads((folder / "sweep.json").read_text())["capture_step"]
    names = sorted(p.name for p in folder.glob("p*_s*.pt"))
    assert len(names) == 12
    for name in names:
        assert describe(folder / name)["metadata"]["capture_step"] == step
    assert not (folder / ".sweep.lock").exists()


def test_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    folder = tmp_path / "sweep"
    with lock_folder(folder, environ={}) as holder:
        assert sweep(folder) == 2
        one_line_error(capsys, f"pid {holder['pid']}", holder["host"], holder["started"])
        assert sorted(p.name for p in folder.iterdir()) == [".sweep.lock"]
    assert not (folder / ".sweep.lock").exists()
    assert sweep(folder) == 0


def test_flock_held_by_another_process_is_refused(tmp_path, capsys):
    """The lock is the kernel's: a process that holds the file's flock (here this test, by hand) keeps
    the run out even where the file names no holder."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    with open(folder / ".sweep.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep(folder) == 2
        one_line_error(capsys, "in use by another run")
    assert items(folder) == []


def test_torchrun_ranks_share_the_lock_of_their_rank_0(tmp_path):
    folder = tmp_path / "sweep"
    group = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with lock_folder(folder, environ=group) as holder:
        check_lock_holder(folder, environ=dict(group, RANK="1"))  # the same launch: accepted
        with pytest.raises(SweepFolderError, match=f"pid {holder['pid']}"):
            check_lock_holder(folder, environ=dict(group, MASTER_PORT="29501"))  # another launch
        with pytest.raises(SweepFolderError):
            check_lock_holder(folder, environ={})
