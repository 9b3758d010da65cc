"""The folder of a sweep: one cache file per (prompt, seed) item, named by ``item_name``; ``sweep.json``,
the settings every item of the folder was made with; ``manifest.jsonl``, a line per finished item.

The one owner of the folder's layout and of the manifest's format, for the extraction (which writes
them and resumes from them) and for experiments/aggregate_figure4.py (which reads them). Standard
library and utils/output.py only (torch is imported by ``is_complete`` alone, when called).
"""
import hashlib
import json
import os

from utils.output import write_atomically

MANIFEST = "manifest.jsonl"
SWEEP_SETTINGS = "sweep.json"
ITEM_GLOB = "p*_s*.pt"  # the item files of a folder


class SweepFolderError(ValueError):
    """A sweep folder that cannot be used as it is: made with other settings, or an unreadable
    settings file or manifest."""


def item_name(prompt_index, seed):
    """The file of an item: p<prompt index>_s<seed>.pt, e.g. p0003_s0001.pt."""
    return f"p{prompt_index:04d}_s{seed:04d}.pt"


def check_sweep_settings(folder, settings, overwrite, rank):
    """A folder holds one setting: the first run writes it; a later run with other settings is refused
    unless ``overwrite`` (which makes every item be redone). Only rank 0 writes."""
    path = folder / SWEEP_SETTINGS
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SweepFolderError(f"--output_dir: {path} is unreadable ({err}); remove it or use another folder") from err
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
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(line, ensure_ascii=False) + "\n").encode())
    finally:
        os.close(fd)


def write_manifest(folder, items, prompts, save_mode):
    """At the end: one line per item of ``items`` ({(prompt index, seed): file}) whose file is in
    place, in item order, the latest line of each (timings kept from the run that made the file)."""
    path = folder / MANIFEST
    latest = {}
    if path.is_file():
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                line = json.loads(text)
                latest[(line["prompt_index"], line["seed"])] = line
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    lines = []
    for (prompt_index, seed), file in items.items():
        if not file.is_file():
            continue
        line = latest.get((prompt_index, seed))
        if line is None or line.get("bytes") != file.stat().st_size:
            line = manifest_line(prompt_index, prompts[prompt_index], seed, file, file.stat().st_size, save_mode)
        lines.append(json.dumps(line, ensure_ascii=False))
    write_atomically(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def sweep_files(folder):
    """The cache files of a sweep folder: those its manifest lists, in its order, else its item files
    (sorted). SweepFolderError for a manifest line that names no file."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        files = []
        for number, text in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            try:
                files.append(folder / json.loads(text)["file"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SweepFolderError(f"{manifest}: line {number} is not a manifest line with a 'file'") from None
        return files
    return sorted(folder.glob(ITEM_GLOB))
