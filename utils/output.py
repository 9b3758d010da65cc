"""Safe output files and clean exits on signals. Standard library only: the CLIs check their output
paths before importing torch.

- ``check_output_path`` / ``write_atomically``: a file is replaced whole or not at all; symlinks are
  followed (the link stays, its target is replaced); folders, FIFOs, sockets and devices are refused;
  new files get the mode ``open()`` would give, replaced files keep theirs; a full disk is one clear
  ``OutputSpaceError``.
- ``write_files_atomically``: several files (a statistics .pt and its .csv) replaced together or not
  at all; ``csv_bytes``: the one way the project writes a CSV file's contents.
- ``exit_on_signals``: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (exit code 128 + signal), so
  that clean-up runs and no temporary file is left.
- ``exit_on_signals_from_start`` (the first line of a script) and ``exit_status`` (its work): a signal
  anywhere from the script's first line to its last ends it with 128 + the signal number and one line
  on stderr: while starting (nothing written), during the work (the file being written left as it was)
  or after it (the output complete).
"""
import contextlib
import csv
import errno
import io
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
_script = {"prog": None, "phase": "starting"}  # set by exit_on_signals_from_start and exit_status
_AFTER = {"starting": "while starting; nothing was written",
          "done": "after the work was done; the output is complete",
          "failed": "while exiting after the failure above",
          "interrupted": "while exiting"}



def one_line(err):
    """The first sentence of an exception's message, on one line, for a one-line error (after torch's
    weights-only preamble, without its advice to turn the check off)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__

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


def format_bytes(n, decimals=1):
    """A size for messages, in the unit that suits it (powers of 1000): '512 bytes', '1.5 kB', '2.5 MB',
    '3.2 GB' (``decimals`` digits after the point)."""
    if n < 1000:
        return f"{int(n)} bytes" if n != 1 else "1 byte"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if round(n / scale, decimals) < 1000:
            return f"{n / scale:.{decimals}f} {unit}"
    return f"{n / 1e12:.{decimals}f} TB"


def output_path_arg(text):
    """argparse ``type`` of an output file option: an empty name is refused (exit 2) rather than taken for the
    default or the current folder."""
    if not text:
        import argparse
        raise argparse.ArgumentTypeError("an empty path; give a file name")
    return text


def check_output_file(out, formats):
    """The format of the output ``out`` (a Path) from its extension, one of ``formats``; its folder must exist
    and it must be a regular file or new. OutputPathError naming --out otherwise."""
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in formats:
        raise OutputPathError(f"--out {out}: extension {out.suffix!r} not supported, expected one of "
                              f"{', '.join('.' + f for f in formats)}")
    if not out.parent.is_dir():
        raise OutputPathError(f"--out {out}: folder {out.parent} does not exist")
    try:
        check_output_path(out)
    except OutputPathError as err:
        raise OutputPathError(f"--out {err}") from None
    return fmt


def csv_bytes(columns, rows):
    """The UTF-8 bytes of a CSV file: the header ``columns``, then ``rows`` (cells as ``csv.writer`` writes
    them), one line each ending in a bare newline."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name the same file once symlinks are followed (existing or not)."""
    return os.path.realpath(a) == os.path.realpath(b)


def _script_handler(signum, frame):
    """The handler of ``exit_on_signals_from_start``: end the process at once, with one line saying what
    state it leaves (no traceback, no atexit callbacks, which a second interrupt could cut)."""
    prog = f"{_script['prog']}: " if _script["prog"] else ""
    line = f"{prog}interrupted by {signal.Signals(signum).name} {_AFTER[_script['phase']]}\n"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # e.g. a reentrant flush: the signal cut a write on this stream
            pass
    try:
        os.write(2, line.encode())
    finally:
        os._exit(128 + signum)


def exit_on_signals_from_start(prog=None):
    """Call at the top of a script, before its heavy imports (this module imports the standard library
    only): from here to the script's end, SIGINT, SIGTERM and SIGHUP exit with 128 + the signal number
    and one line on stderr instead of a KeyboardInterrupt traceback or a silent death. Until
    ``exit_status`` runs the work the line says nothing was written; during the work ``exit_status``
    handles them; after it, the line says whether the output is complete."""
    _script["prog"] = prog
    _script["phase"] = "starting"
    for signum in EXIT_SIGNALS:
        signal.signal(signum, _script_handler)


def _kind(mode):
    return next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")


def check_output_path(path):
    """The file that writing ``path`` would replace, checked: it is a regular file or does not exist
    yet, and its folder exists as a writable folder or can be created. A symlink is followed: its
    target (at the end of any chain of links) is checked and written, the link itself stays.
    Raises OutputPathError naming the path; returns the target as an absolute Path."""
    if isinstance(path, str) and not path:
        raise OutputPathError("an empty path; give a file name")
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
    write_files_atomically([(path, write)], expected_bytes)


def write_files_atomically(outputs, expected_bytes=None):
    """``write_atomically`` for several files that belong together, ``outputs`` a list of (path, write):
    every file is written to its temporary file first, and only when all are complete are they renamed
    over their targets, all together (a signal waits until the renames are done). On any error or
    ``Interrupted`` before that, every temporary file is removed and every old file kept; should a rename
    fail, the files already renamed are put back from hard links of the old ones (when the file system
    has hard links), so the targets stay the old set or the new one."""
    targets = [check_output_path(path) for path, _ in outputs]
    if len(set(targets)) != len(targets):
        raise OutputPathError(f"{', '.join(str(p) for p, _ in outputs)}: two outputs are one file")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        links = target.stat().st_nlink - 1 if target.exists() else 0
        if links:  # a rename replaces this name only: the other names keep the old contents
            print(f"note: {target} has {links} other hard link(s), which keep the old contents", file=sys.stderr)
    modes = [_new_file_mode(target) for target in targets]
    signals_before = len(_received_signals)
    temps, backups = [], {}
    try:
        for target, mode, (_, write) in zip(targets, modes, outputs):
            with _exit_signals_held():
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
                temps.append(tmp)
                handle = os.fdopen(fd, "wb")
            with handle:
                os.fchmod(handle.fileno(), mode)
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        with _exit_signals_held():
            if len(targets) > 1:
                backups = _hard_link_backups(targets)
            _replace_all(temps, targets, backups)
            temps = []
    except BaseException as err:
        with _exit_signals_held():
            for tmp in temps:
                Path(tmp).unlink(missing_ok=True)
            for backup in backups.values():
                if backup is not None:
                    Path(backup).unlink(missing_ok=True)
        if len(_received_signals) > signals_before and not isinstance(err, Interrupted):
            raise Interrupted(_received_signals[-1]) from err
        if _is_out_of_space(err):
            needed = "" if expected_bytes is None else f": needed ~{format_bytes(expected_bytes, 2)}"
            folder = targets[0].parent
            free = format_bytes(shutil.disk_usage(folder).free, 2)
            raise OutputSpaceError(f"no space left on {folder}{needed} ({free} free)") from err
        raise
    with _exit_signals_held():
        for backup in backups.values():
            if backup is not None:
                Path(backup).unlink(missing_ok=True)


def _hard_link_backups(targets):
    """target -> a hard link of the existing target beside it, or None when there is no old file; a
    target left out could not be linked (a file system without hard links)."""
    backups = {}
    for target in targets:
        if not target.exists():
            backups[target] = None
            continue
        backup = target.parent / f".{target.name}.{os.getpid()}.old.tmp"
        try:
            backup.unlink(missing_ok=True)
            os.link(target, backup)
            backups[target] = backup
        except OSError:
            pass
    return backups


def _replace_all(temps, targets, backups):
    """Rename each temporary file over its target; on a failure, undo the renames already done."""
    done = []
    try:
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
            done.append(target)
    except BaseException:
        for target in done:
            if target not in backups:  # no hard link of the old file could be made: the new one stays
                continue
            backup = backups.pop(target)
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:  # there was no old file: the new one goes
                    target.unlink()
        raise


def exit_status(work, bad_input, prefix="error"):
    """Run ``work()`` under ``exit_on_signals`` and turn its outcome into the scripts' exit status:
    its own return value (0 if None); 2 for an exception of the ``bad_input`` classes; 1 for a full
    disk; 128 + the signal number for ``Interrupted``. Each failure is one line on stderr. In a script
    that called ``exit_on_signals_from_start``, a signal after the work ends the process at once with
    128 + the signal number and a line saying whether the output is complete."""
    outcome = "failed"
    try:
        with exit_on_signals():
            try:
                result = work()
                outcome = "done" if not result else "failed"
            except Interrupted:
                outcome = "interrupted"
                raise
            finally:
                _script["phase"] = outcome  # what a signal says once exit_on_signals has given the handlers back
    except bad_input as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 2
    except OutputSpaceError as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        if outcome == "done":  # the work had returned: its output is complete
            print(f"{prefix}: {err} after the work was done; the output is complete", file=sys.stderr)
        else:
            print(f"{prefix}: {err}; the file being written was left as it was", file=sys.stderr)
        return err.exit_code
    return 0 if result is None else result
