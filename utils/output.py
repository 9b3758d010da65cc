"""Safe output files and clean exits on signals. Standard library only: the CLIs check their output
paths before importing torch.

- ``check_output_path`` / ``write_atomically``: a file is replaced whole or not at all; symlinks are
  followed (the link stays, its target is replaced); folders, FIFOs, sockets and devices are refused;
  new files get the mode ``open()`` would give, replaced files keep theirs; a full disk is one clear
  ``OutputSpaceError``.
- ``exit_on_signals``: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (exit code 128 + signal), so
  that clean-up runs and no temporary file is left.
"""
import contextlib
import errno
import os
import shutil
import signal
import stat
import sys
import tempfile
from pathlib import Path

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_received_signals = []  # signal numbers caught by exit_on_signals, in arrival order
_holding = []  # non-empty while a few system calls must not be cut in half: a signal waits for the end


class OutputPathError(ValueError):
    """An output path that cannot be (re)placed by a regular file."""


class OutputSpaceError(OSError):
    """The output's file system filled up while writing; the old file, if any, is intact."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP under ``exit_on_signals``; ``exit_code`` is the shell's 128 + signal
    number (SIGHUP 129, SIGINT 130, SIGTERM 143)."""

    def __init__(self, signum):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def exit_on_signals():
    """Within the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (in the main thread), so that
    clean-up runs; the previous handlers are restored on leaving. Main thread only."""

    def on_signal(signum, frame):
        _received_signals.append(signum)
        if not _holding:
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in EXIT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _exit_signals_held():
    """Hold back the ``Interrupted`` of a signal caught by ``exit_on_signals`` during a few calls that
    must not be cut in half (creating or removing the temporary file); it is raised on leaving.
    (Blocking the signals instead would not do: any other thread, e.g. torch's, receives them.)"""
    received = len(_received_signals)
    _holding.append(True)
    try:
        yield
    finally:
        _holding.pop()
    if len(_received_signals) > received and not _holding:
        raise Interrupted(_received_signals[-1])


def _kind(mode):
    return next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")


def check_output_path(path):
    """The file that writing ``path`` would replace, checked: it is a regular file or does not exist
    yet, and its folder exists as a writable folder or can be created. A symlink is followed: its
    target (at the end of any chain of links) is checked and written, the link itself stays.
    Raises OutputPathError naming the path; returns the target as an absolute Path."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    shown = f"{path}" if target == path.absolute() else f"{path} (a symlink to {target})"
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # the folder checks below say why
        mode = None
    except OSError as err:
        raise OutputPathError(f"{shown}: cannot be checked: {err.strerror}") from err
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputPathError(f"{shown} is {_kind(mode)}, not a regular file; refusing to write over it")
    existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not existing.is_dir():
        raise OutputPathError(f"{shown}: {existing} is not a folder, so {target.parent} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{shown}: folder {existing} is not writable")
    return target


def _new_file_mode(target):
    """The mode ``open()`` would give: an existing file keeps its own, a new one gets 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _is_out_of_space(err):
    """Whether ``err`` or an error it was raised from or during is a full disk (torch's zip writer
    reports a failed write as a RuntimeError)."""
    seen = []
    while err is not None and err not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, RuntimeError) and "No space left on device" in str(err):
            return True
        seen.append(err)
        err = err.__cause__ or err.__context__
    return False


def write_atomically(path, write, expected_bytes=None):
    """Call ``write(binary_file)`` on a temporary file beside the target, then rename it over the target.

    The target is ``path``, or the file a symlink ``path`` points to (the link is kept). It must be a
    regular file or not exist: a folder, FIFO, socket or device raises OutputPathError before anything is
    written. Missing parent folders are created. A new file gets the mode ``open()`` would give (0o666
    less the umask); a replaced file keeps its mode. The target is always either the old file or the
    complete new one: on any error or ``Interrupted`` the temporary file is removed and the old file is
    left as it was. A signal caught by ``exit_on_signals`` during the write is re-raised as that
    ``Interrupted`` even when the writer turned it into another error (torch.save reports
    "unexpected pos"). A full disk raises OutputSpaceError, naming ``expected_bytes`` when given."""
    target = check_output_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(target)
    signals_before = len(_received_signals)
    tmp = None
    try:
        with _exit_signals_held():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            handle = os.fdopen(fd, "wb")
        with handle:
            os.fchmod(handle.fileno(), mode)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with _exit_signals_held():
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        if len(_received_signals) > signals_before and not isinstance(err, Interrupted):
            raise Interrupted(_received_signals[-1]) from err
        if _is_out_of_space(err):
            needed = "" if expected_bytes is None else f": needed ~{expected_bytes / 1e9:.2f} GB"
            free = shutil.disk_usage(target.parent).free / 1e9
            raise OutputSpaceError(f"no space left on {target.parent}{needed} ({free:.2f} GB free)") from err
        raise


def exit_status(work, bad_input, prefix="error"):
    """Run ``work()`` under ``exit_on_signals`` and turn its outcome into the scripts' exit status:
    its own return value (0 if None); 2 for an exception of the ``bad_input`` classes; 1 for a full
    disk; 128 + the signal number for ``Interrupted``. Each failure is one line on stderr."""
    try:
        with exit_on_signals():
            result = work()
    except bad_input as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 2
    except OutputSpaceError as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"{prefix}: {err}; the file being written was left as it was", file=sys.stderr)
        return err.exit_code
    return 0 if result is None else result
