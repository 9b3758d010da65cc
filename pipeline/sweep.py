"""The folder of a sweep: one cache file per (prompt, seed) item, named by ``item_name``; ``sweep.json``,
the settings every item of the folder was made with; ``manifest.jsonl``, a line per finished item.

The one owner of the folder's layout and of the manifest's format, for the extraction (which writes
them and resumes from them) and for experiments/aggregate_figure4.py (which reads them). Standard
library and utils/output.py only (torch is imported by ``is_complete`` and ``write_manifest`` alone,
when called).

Nothing in the folder is trusted: ``open_sweep`` locks the folder for one run (one process group under
torchrun), checks every file of it against what it must be (``check_folder``) and removes the temporary
files of a killed writer before any item runs; the manifest's lines are checked against their files
when it is rewritten at the end (``write_manifest``).
"""
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path

from utils.output import OutputSpaceError, write_atomically

MANIFEST = "manifest.jsonl"
SWEEP_SETTINGS = "sweep.json"
LOCK = ".sweep.lock"  # held (fcntl.flock) by the run using the folder; removed when it ends
ITEM_GLOB = "p*_s*.pt"  # the item files of a folder
ITEM_RE = re.compile(r"p\d{4,}_s\d{4,}\.pt")
# the temporary files of write_atomically (".<name>.<random>.tmp") for the folder's own files
TEMP_RE = re.compile(r"\.(p\d{4,}_s\d{4,}\.pt|" + re.escape(SWEEP_SETTINGS) + "|" + re.escape(MANIFEST) + r")\..+\.tmp")
REQUIRED_LINE_KEYS = {"prompt_index": int, "seed": int, "file": str}


class InputError(ValueError):
    """The inputs of a reader (the plot, the aggregator) name nothing usable: a missing path, a glob
    matching nothing, a file given twice."""


class SweepFolderError(ValueError):
    """A sweep folder that cannot be used as it is: made with other settings, an unreadable or
    malformed settings file, manifest or item path, or in use by another run."""


def _mode(path):
    """The st_mode of ``path`` (symlinks followed); None where nothing is there (a dangling link included)."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise SweepFolderError(f"{path}: cannot be checked ({err.strerror})") from err


def _kind(mode):
    return next((name for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
                 if test(mode)), "not a regular file")


def _regular_or_absent(path, what):
    """Whether ``path`` holds a regular file (True) or nothing (False); SweepFolderError otherwise."""
    mode = _mode(path)
    if mode is None:
        if os.path.islink(path):
            raise SweepFolderError(f"{path}: the {what} is a dangling symlink (to {os.readlink(path)}); remove it")
        return False
    if not stat.S_ISREG(mode):
        raise SweepFolderError(f"{path}: the {what} is {_kind(mode)}, not a regular file; remove it or use another folder")
    return True


def _read_text(path, what):
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SweepFolderError(f"{path}: the {what} is not UTF-8 text (byte {err.start}); remove it or use another folder") from None
    except OSError as err:
        raise SweepFolderError(f"{path}: the {what} cannot be read ({err.strerror})") from err


def read_settings(folder):
    """The settings stored in the folder's sweep.json (a JSON object), None where there is none yet;
    SweepFolderError naming the file for anything else."""
    path = folder / SWEEP_SETTINGS
    if not _regular_or_absent(path, "settings file"):
        return None
    try:
        stored = json.loads(_read_text(path, "settings file"))
    except json.JSONDecodeError as err:
        raise SweepFolderError(f"{path}: the settings file is not valid JSON ({err}); remove it or use another folder") from None
    if not isinstance(stored, dict):
        raise SweepFolderError(f"{path}: the settings file holds {type(stored).__name__ if stored is not None else 'null'}, "
                               "not a JSON object of settings; remove it or use another folder")
    return stored


def read_manifest(folder):
    """The lines of the folder's manifest as dicts, in file order ([] where there is none); each must
    be a JSON object with an integer prompt_index and seed and a 'file' naming an item file of this
    folder. SweepFolderError naming the file and line otherwise."""
    path = folder / MANIFEST
    if not _regular_or_absent(path, "manifest"):
        return []
    lines = []
    for number, text in enumerate(_read_text(path, "manifest").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise SweepFolderError(f"{path}: line {number} is not valid JSON ({err}); remove the line or the file") from None
        if not isinstance(line, dict):
            raise SweepFolderError(f"{path}: line {number} is not a JSON object; remove the line or the file")
        for key, kind in REQUIRED_LINE_KEYS.items():
            if not isinstance(line.get(key), kind) or isinstance(line.get(key), bool):
                raise SweepFolderError(f"{path}: line {number} has no {kind.__name__} '{key}'; remove the line or the file")
        if not ITEM_RE.fullmatch(line["file"]):
            raise SweepFolderError(f"{path}: line {number}: 'file' {line['file']!r} is not an item file of the folder "
                                   "(p<prompt>_s<seed>.pt); remove the line or the file")
        lines.append(line)
    return lines


def check_folder(folder, item_paths):
    """Every file of the sweep folder checked against what it must be, before any item runs: sweep.json
    a JSON object, manifest.jsonl UTF-8 lines of manifest objects, each item path a regular file or
    nothing. Returns the stored settings (None for a new folder)."""
    stored = read_settings(folder)
    read_manifest(folder)
    for path in item_paths:
        _regular_or_absent(path, "item file")
    return stored


def remove_stale_temps(folder):
    """Remove the temporary files (".<name>.<random>.tmp") of the folder's items, settings and manifest
    left by a writer that was killed (SIGKILL) before it could clean up; only the holder of the lock
    calls it, so no live writer owns them. Returns the names removed."""
    removed = []
    for entry in os.scandir(folder):
        if TEMP_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def process_group_id(environ=os.environ):
    """What the processes of one torchrun launch share (its run id and rendezvous address); None
    outside torchrun."""
    if "MASTER_PORT" not in environ and "TORCHELASTIC_RUN_ID" not in environ:
        return None
    return f"{environ.get('TORCHELASTIC_RUN_ID')}@{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')}"


def _holder_text(info):
    if not isinstance(info, dict):
        return "another run (its lock file names no holder yet)"
    return (f"another run: pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f", torchrun group {info.get('group')}" if info.get("group") else ""))


def _read_holder(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def lock_folder(folder, environ=os.environ):
    """Hold the folder for this run: fcntl.flock on its .sweep.lock (created, and removed at the end),
    which names the holder (pid, host, start time, torchrun group). SweepFolderError naming the holder
    where another run holds it. The folder is created if needed; a dangling symlink is refused."""
    if os.path.islink(folder) and not folder.exists():
        raise SweepFolderError(f"--output_dir: {folder} is a dangling symlink (to {os.readlink(folder)}); "
                               "create its target or use another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepFolderError(f"--output_dir: {folder} cannot be created ({err.strerror or err})") from err
    path = folder / LOCK
    while True:
        mode = _mode(path)
        if mode is not None and not stat.S_ISREG(mode):
            raise SweepFolderError(f"{path}: the lock file is {_kind(mode)}, not a regular file; remove it")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise SweepFolderError(f"{path}: the lock file cannot be opened ({err.strerror})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SweepFolderError(f"--output_dir: {folder} is in use by {_holder_text(_read_holder(path))}; "
                                   f"wait for it to end or use another folder (lock file {path})") from None
        try:  # the file may have been removed by its last holder between our open and flock: retry on the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "pgid": os.getpgid(0), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "group": process_group_id(environ)}
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield info
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a run waiting on the old file retries on a new one
        os.close(fd)


def check_lock_holder(folder, environ=os.environ):
    """For a torchrun rank other than 0, once rank 0 has taken the lock: the holder must be of this
    process group; SweepFolderError naming the holder otherwise."""
    info = _read_holder(folder / LOCK)
    mine = process_group_id(environ)
    if not isinstance(info, dict) or mine is None or info.get("group") != mine:
        raise SweepFolderError(f"--output_dir: {folder} is held by {_holder_text(info)}, not by rank 0 of this run "
                               f"({mine})")


@contextlib.contextmanager
def open_sweep(folder, item_paths, rank, environ=os.environ):
    """A sweep folder ready for its items, for the whole run: on rank 0 (the only one of a single
    process) locked, every file checked (``check_folder``) and stale temporary files removed; other
    ranks do nothing here (``check_lock_holder`` once rank 0 is through). None: a nullcontext."""
    if folder is None or rank != 0:
        yield
        return
    with lock_folder(folder, environ):
        check_folder(folder, item_paths)
        remove_stale_temps(folder)
        yield


def item_name(prompt_index, seed):
    """The file of an item: p<prompt index>_s<seed>.pt, e.g. p0003_s0001.pt."""
    return f"p{prompt_index:04d}_s{seed:04d}.pt"


def check_sweep_settings(folder, settings, overwrite, rank):
    """A folder holds one setting: the first run writes it; a later run with other settings is refused
    unless ``overwrite`` (which makes every item be redone). Only rank 0 writes."""
    path = folder / SWEEP_SETTINGS
    stored = read_settings(folder)
    if stored is not None:
        if stored != settings and not overwrite:
            changed = sorted(k for k in settings.keys() | stored.keys() if stored.get(k) != settings.get(k))
            raise SweepFolderError(f"--output_dir: {folder} holds a sweep made with other settings ({', '.join(changed)} "
                                   "differ); use another folder, or --overwrite to redo every item with the new settings")
        if stored == settings:
            return
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(json.dumps(settings, indent=1, sort_keys=True).encode()))


def is_complete(path, settings, prompt, seed):
    """Whether ``path`` is a complete, valid cache of this item made with these settings (checked, not
    trusted by name)."""
    from utils.attention_cache import CacheFileError, describe

    if not path.is_file():
        return False
    try:
        meta = describe(path)["metadata"]
    except CacheFileError:
        return False
    return meta.get("settings") == settings and meta.get("prompt") == prompt and meta.get("seed") == seed


def manifest_line(prompt_index, prompt, seed, path, size, save_mode):
    """An item's manifest line: its prompt, seed, file and size, and for a summary file its sha256."""
    line = {"prompt_index": prompt_index, "prompt": prompt, "seed": seed, "file": path.name, "bytes": size}
    if save_mode == "summary":
        line["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return line


def append_manifest(folder, prompt_index, prompt, seed, path, size, report, save_mode, rank):
    """One line for a finished item, appended once its file is in place (a single write: lines of
    several processes do not interleave), with its timings and memory peaks (``report``)."""
    line = manifest_line(prompt_index, prompt, seed, path, size, save_mode)
    line.update(seconds=report["seconds"], peak_gib=report["peak_gib"], rank=rank)
    manifest = folder / MANIFEST
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
    fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):  # a short write: only a full disk does that to a regular file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            with contextlib.suppress(OSError):  # no half line left behind (lines of other ranks end before it)
                if os.fstat(fd).st_size > start:
                    os.ftruncate(fd, start)
            free = shutil.disk_usage(folder).free / 1e9
            raise OutputSpaceError(f"no space left on {folder} to append to {manifest} ({free:.2f} GB free); "
                                   f"{path.name} is complete: free some space and run again to resume") from err
    finally:
        os.close(fd)


def line_agrees(line, prompt_index, seed, file, meta_prompt, meta_seed, save_mode):
    """Whether a manifest line says what its item's file says: its name, prompt, seed, size and, where
    the line has one or the mode gives one, sha256."""
    if not isinstance(line, dict):
        return False
    if (line.get("prompt_index"), line.get("seed"), line.get("file")) != (prompt_index, seed, file.name):
        return False
    if line.get("prompt") != meta_prompt or meta_seed != seed or line.get("bytes") != file.stat().st_size:
        return False
    if "sha256" in line or save_mode == "summary":
        return line.get("sha256") == hashlib.sha256(file.read_bytes()).hexdigest()
    return True


def timings_line(by_key, by_file, key, name):
    """The old line whose timings a repaired line keeps: the one that names both this item and its file,
    else the one of its key or of its file name ({} for none)."""
    if by_key is not None and by_key["file"] == name:
        return by_key
    if by_file is not None and (by_file["prompt_index"], by_file["seed"]) == key:
        return by_file
    return by_key or by_file or {}


def write_manifest(folder, items, prompts, save_mode):
    """At the end: one line per item of ``items`` ({(prompt index, seed): file}) whose file is in
    place, in item order: the latest line of each where it agrees with the file (timings kept from the
    run that made the file), else a line made from the file (its own metadata is the truth: prompt and
    seed), keeping the old line's timings."""
    from utils.attention_cache import CacheFileError, describe

    latest, by_file = {}, {}
    for line in read_manifest(folder):
        latest[(line["prompt_index"], line["seed"])] = line
        by_file[line["file"]] = line
    lines = []
    for (prompt_index, seed), file in items.items():
        if not file.is_file():
            continue
        try:
            held = describe(file)
        except CacheFileError:
            continue  # not a cache (changed after the run checked it): no line, redone by the next run
        meta_prompt, meta_seed = held.get("prompt", prompts[prompt_index]), held["metadata"].get("seed")
        line = latest.get((prompt_index, seed))
        if not line_agrees(line, prompt_index, seed, file, meta_prompt, meta_seed, save_mode):
            old = timings_line(line, by_file.get(file.name), (prompt_index, seed), file.name)
            line = manifest_line(prompt_index, meta_prompt, seed, file, file.stat().st_size, save_mode)
            line.update({k: old[k] for k in ("seconds", "peak_gib", "rank") if k in old})
        lines.append(json.dumps(line, ensure_ascii=False))
    write_atomically(folder / MANIFEST, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def sweep_files(folder):
    """The cache files of a sweep folder: those its manifest lists, in its order, else its item files
    (sorted). SweepFolderError for a manifest line that names no file."""
    manifest = folder / MANIFEST
    lines = read_manifest(folder)
    if lines:
        files = [folder / line["file"] for line in lines]
        seen = set()
        for line in lines:
            if line["file"] in seen:
                raise SweepFolderError(f"{manifest}: {line['file']} is listed more than once; run the sweep again to "
                                       "repair the manifest")
            seen.add(line["file"])
        return files
    if manifest.exists():
        return []
    return sorted(folder.glob(ITEM_GLOB))


def item_of(path):
    """(prompt index, seed) of a sweep item's file name (p0003_s0001.pt -> (3, 1)); None for other names."""
    name = os.path.basename(path)
    if not ITEM_RE.fullmatch(name):
        return None
    prompt, seed = name[1:-3].split("_s")
    return int(prompt), int(seed)


def input_files(texts):
    """The files of a reader's inputs, in order: a sweep folder gives its manifest's files (else its item
    files, sorted), a glob pattern its matches (sorted; a matched folder as a folder), a file itself.
    Paths stay as given (relative to the current folder). InputError for a path that does not exist, an
    input that gives no file, or a file given twice (each item may count once)."""
    files = []
    for text in texts:
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            raise InputError(f"{text}: the pattern matches no file")
        found = []
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found += sweep_files(path)
            elif path.exists():
                found.append(path)
            else:
                raise InputError(f"{text}: no such file or folder")
        if not found:
            raise InputError(f"{text}: no cache file found (a folder gives its {MANIFEST}'s files or its {ITEM_GLOB})")
        files.extend(found)
    seen = set()
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            raise InputError(f"{path} is given more than once (each item may count once)")
        seen.add(real)
    return files
