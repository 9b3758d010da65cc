"""Tests of the safe output helpers in utils/output.py: write_atomically, check_output_path, exit_on_signals."""
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.output import (Interrupted, OutputPathError, OutputSpaceError, check_output_path, exit_on_signals,
                        write_atomically)

REPO = Path(__file__).resolve().parents[1]


def write_bytes(data):
    return lambda handle: handle.write(data)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_writes_and_replaces(tmp_path):
    out = tmp_path / "new" / "out.bin"  # missing folders are created
    write_atomically(out, write_bytes(b"first"))
    write_atomically(out, write_bytes(b"second"))
    assert out.read_bytes() == b"second"
    assert os.listdir(out.parent) == ["out.bin"]


def test_symlink_target_is_written_and_link_kept(tmp_path):
    target = tmp_path / "data" / "real.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert check_output_path(link) == target
    write_atomically(link, write_bytes(b"new"))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(target.parent)) == ["real.bin"]


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "later.bin")
    write_atomically(link, write_bytes(b"x"))
    assert (tmp_path / "later.bin").read_bytes() == b"x" and link.is_symlink()


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: p.mkdir(), "a folder"),
])
def test_non_regular_files_are_refused(tmp_path, make, kind):
    path = tmp_path / "out.bin"
    make(path)
    for call in (lambda: check_output_path(path), lambda: write_atomically(path, write_bytes(b"x"))):
        with pytest.raises(OutputPathError, match=f"{path} is {kind}, not a regular file"):
            call()
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_device_and_symlink_to_a_fifo_are_refused(tmp_path):
    # /dev/null is only checked, never written
    with pytest.raises(OutputPathError, match="/dev/null is a character device"):
        check_output_path("/dev/null")
    with pytest.raises(OutputPathError, match="a character device"):
        write_atomically("/dev/null", write_bytes(b"x"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    with pytest.raises(OutputPathError, match=f"link \\(a symlink to {fifo}\\) is a FIFO"):
        check_output_path(tmp_path / "link")


def test_unusable_folders_are_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputPathError, match="is not a folder, so .* cannot be created"):
        check_output_path(tmp_path / "file" / "sub" / "out.bin")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who may write anywhere")
    with pytest.raises(OutputPathError, match="is not writable"):
        check_output_path(locked / "out.bin")


def test_modes_follow_the_umask_and_existing_files_keep_theirs(tmp_path, umask_022):
    new = tmp_path / "new.bin"
    write_atomically(new, write_bytes(b"x"))
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    write_atomically(existing, write_bytes(b"new"))
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640 and existing.read_bytes() == b"new"


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: "
                 "No space left on device"),
])
def test_full_disk_is_reported_and_cleaned_up(tmp_path, failure):
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")

    def writer(handle):
        handle.write(b"half")
        raise failure

    with pytest.raises(OutputSpaceError, match=f"^no space left on {tmp_path}: needed ~7.36 GB") as err:
        write_atomically(out, writer, expected_bytes=7.36e9)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.bin"]


def test_other_errors_pass_through(tmp_path):
    def writer(handle):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomically(tmp_path / "out.bin", writer)
    assert os.listdir(tmp_path) == []


def test_a_signal_wins_over_the_writers_own_error(tmp_path):
    """What torch.save does: the zip writer's clean-up error replaces the interrupt."""

    def writer(handle):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises Interrupted here
        except Interrupted:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2432 vs 2326") from None

    with exit_on_signals():
        with pytest.raises(Interrupted) as err:
            write_atomically(tmp_path / "out.bin", writer)
    assert (err.value.signum, err.value.exit_code) == (signal.SIGTERM, 143)
    assert os.listdir(tmp_path) == []


def test_exit_on_signals_restores_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with exit_on_signals():
        assert signal.getsignal(signal.SIGHUP) != before[signal.SIGHUP]
        with pytest.raises(Interrupted, match="SIGHUP") as err:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        assert err.value.exit_code == 129
    assert {s: signal.getsignal(s) for s in before} == before


DRIVER = """
import io
import sys

import torch

from utils.attention_cache import CacheEntry, build_cache, save_cache
from utils.output import Interrupted, exit_on_signals

fsl, fk = 512, 128  # one 64 MB fp16 tensor
frames = torch.arange(fk, dtype=torch.int32).repeat_interleave(fsl)[None]
entry = CacheEntry(layer_idx=0, block=fk - 1, pass_=0, timestep=1000.0, query_frames=[fk - 1],
                   key_frame_indices=list(range(fk)), num_heads=1, nonfinite=0, logit_min=1.0, logit_max=1.0,
                   tensors={"attn_logits": torch.ones(1, 1, fsl, fk * fsl, dtype=torch.float16)},
                   key_video_frames=frames, key_rope_frames=frames.clone(),
                   key_roles=torch.zeros_like(frames, dtype=torch.int8))
data = build_cache(prompt="p", num_frames=fk, frame_seq_length=fsl, num_frame_per_block=1, layer_indices=[0],
                   save_mode="full", entries=[entry], metadata={})
torch.save({}, io.BytesIO())  # torch.save's imports done, so the signal lands in the data writes
try:
    with exit_on_signals():
        save_cache(sys.argv[1], data)
except Interrupted as err:
    print(f"interrupted; the writer raised {err.__cause__!r}", file=sys.stderr)
    sys.exit(err.exit_code)
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_during_torch_save_keeps_the_old_file(tmp_path, signum, code):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "cache.pt"
    out.write_bytes(b"previous cache")
    proc = subprocess.Popen([sys.executable, str(driver), str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 30
    while not any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, "the driver ended before writing"
        time.sleep(0.001)
    time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert out.read_bytes() == b"previous cache"
    assert sorted(os.listdir(tmp_path)) == ["cache.pt", "driver.py"]


# ---------------------------------------------------------------------------------------------
# sizes in messages, empty paths, several files together (issue 23, causes 9 and 10)


@pytest.mark.parametrize("size, text", [(0, "0 bytes"), (512, "512 bytes"), (1500, "1.5 kB"), (2_500_000, "2.5 MB"),
                                        (3_200_000_000, "3.2 GB")])
def test_sizes_are_shown_in_a_sensible_unit(size, text):
    from utils.output import format_bytes
    assert format_bytes(size) == text
    assert format_bytes(999_999) == "1.0 MB" and format_bytes(7_361_000_000, 2) == "7.36 GB"


def test_a_full_disk_names_small_sizes_in_bytes_or_kilobytes(tmp_path, monkeypatch):
    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil_usage(free=700))
    with pytest.raises(OutputSpaceError) as err:
        write_atomically(tmp_path / "out.bin", full, expected_bytes=1234)
    assert "needed ~1.23 kB" in str(err.value) and "(700 bytes free)" in str(err.value) and "0.00 GB" not in str(err.value)


def shutil_usage(free):
    import collections
    return collections.namedtuple("usage", "total used free")(10**12, 10**12 - free, free)


def test_preflight_disk_message_uses_a_sensible_unit(tmp_path, monkeypatch):
    import types

    import utils.preflight as preflight
    monkeypatch.setattr(preflight, "disk_free_bytes", lambda folder: 300)
    need = types.SimpleNamespace(device_total=0, host_peak=0, output_file=45_000)
    with pytest.raises(preflight.PreflightError, match=r"about 45\.0 kB but 300 bytes are free"):
        preflight.check_fits(need, device_free_bytes=None, host_available_bytes=None, output_dir=tmp_path)


def test_an_empty_output_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match="empty"):
        check_output_path("")
    with pytest.raises(OutputPathError, match="empty"):
        write_atomically("", write_bytes(b"x"))
    assert os.listdir(tmp_path) == []


def make_pair(tmp_path):
    pt, csv = tmp_path / "stats.pt", tmp_path / "stats.csv"
    pt.write_bytes(b"old pt")
    csv.write_bytes(b"old csv")
    return pt, csv


def test_several_files_are_replaced_together(tmp_path):
    from utils.output import write_files_atomically
    pt, csv = make_pair(tmp_path)
    write_files_atomically([(pt, write_bytes(b"new pt")), (csv, write_bytes(b"new csv"))])
    assert (pt.read_bytes(), csv.read_bytes()) == (b"new pt", b"new csv")
    assert sorted(os.listdir(tmp_path)) == ["stats.csv", "stats.pt"]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_full_disk_on_any_file_keeps_every_old_file(tmp_path, failing):
    from utils.output import write_files_atomically
    pt, csv = make_pair(tmp_path)

    def full(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    writers = [write_bytes(b"new pt"), write_bytes(b"new csv")]
    writers[failing] = full
    with pytest.raises(OutputSpaceError):
        write_files_atomically([(pt, writers[0]), (csv, writers[1])])
    assert (pt.read_bytes(), csv.read_bytes()) == (b"old pt", b"old csv")
    assert sorted(os.listdir(tmp_path)) == ["stats.csv", "stats.pt"]


@pytest.mark.parametrize("old", [True, False])
def test_a_failed_rename_puts_the_first_file_back(tmp_path, monkeypatch, old):
    from utils.output import write_files_atomically
    pt, csv = make_pair(tmp_path) if old else (tmp_path / "stats.pt", tmp_path / "stats.csv")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(csv):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        write_files_atomically([(pt, write_bytes(b"new pt")), (csv, write_bytes(b"new csv"))])
    monkeypatch.undo()
    if old:
        assert (pt.read_bytes(), csv.read_bytes()) == (b"old pt", b"old csv")
        assert sorted(os.listdir(tmp_path)) == ["stats.csv", "stats.pt"]
    else:
        assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# signals outside the work: during the start-up imports and after the output is complete (cause 8)

SITECUSTOMIZE = """
import atexit, os, signal, sys, time

_signum = int(os.environ["TEST_SIGNUM"])
if os.environ["TEST_WHEN"] == "import":  # the signal arrives while the script imports MODULE
    class _SignalOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == os.environ["TEST_MODULE"]:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), _signum)
                time.sleep(2)
            return None

    sys.meta_path.insert(0, _SignalOnImport())
else:  # registered first, so called last: the signal arrives at the very end of the interpreter's exit
    def _signal_at_exit():
        os.kill(os.getpid(), _signum)
        time.sleep(2)

    atexit.register(_signal_at_exit)
"""

SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
SCRIPTS = {  # script, a module it imports after its first line
    "cli": ("experiments/run_extraction_figure4.py", "pipeline.plan"),
    "plot": ("experiments/plot_figure4.py", "pipeline.sweep"),
    "aggregate": ("experiments/aggregate_figure4.py", "pipeline.sweep"),
}


def run_signalled(tmp_path, script, when, signum, *args):
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path, module = SCRIPTS[script]
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "TEST_SIGNUM": str(int(signum)), "TEST_WHEN": when,
           "TEST_MODULE": module}
    return subprocess.run([sys.executable, path, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("signum, code", SIGNALS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_during_the_start_up_imports_exits_with_one_line(tmp_path, script, signum, code):
    out = tmp_path / ("out.png" if script == "plot" else "out.pt")
    args = {"cli": ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--output_path", out],
            "plot": ["--cache", tmp_path / "none.pt", "--out", out],
            "aggregate": [tmp_path / "none.pt", "--out", out]}[script]
    proc = run_signalled(tmp_path, script, "import", signum, *args)
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "nothing was written" in lines[0], proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    import experiments.run_extraction_figure4 as cli
    out = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    assert cli.main(["--config_path", str(REPO / "configs/tiny.yaml"), "--no_checkpoint", "--device", "cpu", "--quiet",
                     "--num_frames", "6", "--save_mode", "summary", "--output_path", str(out)]) == 0
    return out


@pytest.mark.parametrize("signum, code", SIGNALS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_after_the_output_is_complete_exits_with_one_line(tmp_path, tiny_cache, script, signum, code):
    out = tmp_path / ("out.png" if script == "plot" else "out.pt")
    args = {"cli": ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames",
                    "6", "--save_mode", "summary", "--output_path", out],
            "plot": ["--cache", tiny_cache, "--panels", "0:0", "--out", out],
            "aggregate": [tiny_cache, "--out", out]}[script]
    proc = run_signalled(tmp_path, script, "exit", signum, *args)
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert lines and signal.Signals(signum).name in lines[-1] and "the output is complete" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert out.stat().st_size > 0
    if script == "aggregate":
        assert out.with_suffix(".csv").stat().st_size > 0


def test_replacing_a_hard_linked_output_says_the_other_names_keep_the_old_file(tmp_path, capsys):
    target, other = tmp_path / "out.bin", tmp_path / "other_name.bin"
    target.write_bytes(b"old")
    os.link(target, other)
    write_atomically(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new" and other.read_bytes() == b"old"
    assert f"note: {target} has 1 other hard link(s), which keep the old contents" in capsys.readouterr().err
