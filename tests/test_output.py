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
