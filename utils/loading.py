"""Reading weight files from local folders, checked key by key.

Every loader in the project goes through these three functions, so that every problem with a weight
file (missing, empty, truncated, corrupt, not a weight file, holding objects, a missing or unexpected
key, a wrong shape or dtype, a compressed zip record, a tensor that is not plain) gives the same kind
of error: a one-line ``WeightFileError`` that names the file and, where there is one, the key. Torch
files are read with ``weights_only=True`` unless the caller opts in explicitly. Weights are read only
in forms whose bytes are the tensors: zip records stored as written by torch.save, and plain tensors
(dense, strided, with data on a real device).
"""
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from utils.output import one_line

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
# torch.save's legacy (non-zip) format starts with this pickled number, after the pickle header.
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, or does not fit the model it is loaded into."""


def _refused_object(err):
    """What the weights_only unpickler refused (a class or function name, or a type), or None when
    the error is not about an object (a corrupt or truncated stream)."""
    match = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(err)) or re.search(
        r"but got (.+?)\s*$", str(err), re.MULTILINE
    )
    return match[1] if match else None


def _torch_file_format(path):
    """'zip' or 'legacy' for a file written by torch.save; ``WeightFileError`` for anything else."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
    except OSError as err:
        raise WeightFileError(f"{path}: cannot be read ({err.strerror or err})") from err
    if not head:
        raise WeightFileError(f"{path}: empty file (0 bytes); expected a torch or safetensors weight file")
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if LEGACY_MAGIC in head:
        return "legacy"
    if head[0] == pickle.PROTO[0]:
        raise WeightFileError(f"{path}: a plain pickle, not a file written by torch.save; expected a torch or safetensors weight file")
    raise WeightFileError(f"{path}: not a torch file (neither torch.save's zip nor its legacy format); expected a torch or safetensors weight file")


def _check_zip_records(path):
    """Refuse a zip file with a compressed or encrypted record: torch memory-maps each tensor's record
    as the bytes stored, so such a record would be read as garbage. Returns the error of Python's
    zipfile when it cannot read the central directory (torch.load then reports the damage), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return err
    bad = [info for info in records if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1]
    if bad:
        info = bad[0]
        method = getattr(zipfile, "compressor_names", {}).get(info.compress_type, f"method-{info.compress_type}")
        how = "encrypted" if info.flag_bits & 0x1 else f"{method}-compressed"
        more = f" (as are {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WeightFileError(f"{path}: zip record {info.filename!r} is {how}{more}; torch reads records as stored bytes, so only files as torch.save writes them (records stored uncompressed) are read")
    return None


def _load_torch_file(path, allow_pickle, device, pickle_flag):
    kind = _torch_file_format(path)
    zip_error = _check_zip_records(path) if kind == "zip" else None
    if allow_pickle:
        print(f"warning: {path}: fully unpickling the file ({pickle_flag or 'allow_pickle'}); this can run code from it", file=sys.stderr)
    try:
        # Zip files are memory-mapped, tensor by tensor; legacy files cannot be, and are read whole.
        contents = torch.load(path, map_location=device, weights_only=not allow_pickle, mmap=kind == "zip")
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        if allow_pickle:
            raise WeightFileError(f"{path}: cannot be unpickled as a {kind}-format torch file ({type(err).__name__}: {one_line(err)})") from err
        refused = _refused_object(err)
        if refused is None:
            raise WeightFileError(f"{path}: truncated or corrupt {kind}-format torch file ({one_line(err)})") from err
        hint = f"; if you trust the file, opt in with {pickle_flag} (full unpickling can run code from it)" if pickle_flag else ""
        raise WeightFileError(f"{path}: holds objects beyond tensors ({refused}), which weights_only=True refuses{hint}") from err
    if zip_error is not None:  # torch read a zip whose records could not be checked
        raise WeightFileError(f"{path}: zip records cannot be checked ({one_line(zip_error)}); expected a file as torch.save writes it")
    return contents


def _not_plain(tensor):
    """Why ``tensor`` is not a plain tensor whose data are its values (sparse, meta, quantized, nested,
    a subclass), or None for a plain one (``nn.Parameter`` included)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        return f"a {type(tensor).__name__}, a tensor subclass"
    if tensor.layout != torch.strided:
        return f"layout {tensor.layout}, not torch.strided"
    if tensor.is_meta:
        return "on the meta device, without data"
    if tensor.is_quantized:
        return "quantized"
    if tensor.is_nested:
        return "nested"
    return None


def _check_plain_tensors(value, source, within=""):
    """Raise ``WeightFileError`` naming ``source`` and the key for the first tensor that is not plain
    in ``value`` (dicts, lists and tuples are searched; ``within`` names the containers above it)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if isinstance(item, torch.Tensor) and _not_plain(item):
            where = f"{key!r} in {within}" if within else repr(key)
            raise WeightFileError(f"{source}: {where} is not a plain tensor ({_not_plain(item)}); weights must be dense, strided tensors with data")
        if isinstance(item, (dict, list, tuple)):
            _check_plain_tensors(item, source, f"{within}[{key!r}]")


def _check_string_keys(mapping, source):
    bad = [key for key in mapping if not isinstance(key, str)]
    if bad:
        shown = ", ".join(f"{key!r} ({type(key).__name__})" for key in bad[:5])
        raise WeightFileError(f"{source}: keys must be strings, found {shown}" + (f", ... ({len(bad)} in all)" if len(bad) > 5 else ""))


def read_state_dict(path, allow_pickle=False, device="cpu", pickle_flag=None):
    """Return the dict held by a ``.safetensors`` file or a torch ``.pth``/``.pt`` file, on ``device``.

    Safetensors and torch zip files are read through memory maps, tensor by tensor, so loading onto
    a GPU costs little host memory; torch's legacy (non-zip) files are read whole. Torch files go
    through the safe unpickler (``weights_only=True``): tensors, numbers, strings and containers only.
    ``allow_pickle=True`` unpickles arbitrary objects (it can run code from the file; a warning goes
    to stderr); only for files you trust. ``pickle_flag`` names the option that sets ``allow_pickle``
    for this file (e.g. ``"--allow_pickle"``) and is suggested when a file is refused for holding
    objects; None where no such option applies. Zip files with compressed records and tensors that
    are not plain (sparse, meta, quantized, nested, subclasses), at any depth, are refused. Every
    problem raises ``WeightFileError``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            contents = load_file(path, device=str(device))
        except Exception as err:
            raise WeightFileError(f"{path}: not a readable safetensors file ({one_line(err)})") from err
        _check_plain_tensors(contents, str(path))
        return contents
    contents = _load_torch_file(path, allow_pickle, device, pickle_flag)
    if not isinstance(contents, dict):
        raise WeightFileError(f"{path}: holds a {type(contents).__name__}; expected a dict of tensors keyed by name")
    _check_string_keys(contents, path)
    _check_plain_tensors(contents, str(path))
    return contents


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping, source):
    """Raise ``WeightFileError`` naming ``source`` and the keys unless ``found`` maps exactly the
    (string) keys of ``expected`` to plain tensors of the same shapes, floating point where
    ``expected``'s are. ``expected``: the model's state dict (meta tensors are fine)."""
    _check_string_keys(found, source)
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in found.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightFileError(f"{source}: values that are not tensors: {', '.join(not_tensors[:5])}")
    _check_plain_tensors(found, str(source))
    common = [k for k in expected if k in found]
    problems = {
        "missing keys": [k for k in expected if k not in found],
        "unexpected keys": [k for k in found if k not in expected],
        "wrong shapes": [
            f"{k} (file {tuple(found[k].shape)}, model {tuple(expected[k].shape)})"
            for k in common
            if found[k].shape != expected[k].shape
        ],
        "wrong dtypes": [
            f"{k} (file {found[k].dtype}, model floating point)"
            for k in common
            if expected[k].is_floating_point() and not found[k].is_floating_point()
        ],
    }
    shown = [
        f"{label}: " + ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
        for label, keys in problems.items()
        if keys
    ]
    if shown:
        raise WeightFileError(f"{source}: does not fit the model: " + "; ".join(shown))


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source, device=None, dtype=None):
    """Check ``state_dict`` against ``module`` and load it by assignment (no init needed: ``module``
    may live on the meta device). Tensors are moved to ``device`` and floating ones cast to ``dtype``
    (where given) one at a time; tensors shared between keys stay shared. Returns ``module``."""
    check_state_dict(module.state_dict(), state_dict, source)
    moved = {}
    for value in state_dict.values():
        if id(value) not in moved:
            moved[id(value)] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    state_dict = {key: moved[id(value)] for key, value in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if left:  # non-persistent buffers are in no file: a model built on meta must not have any
        raise RuntimeError(f"{source}: buffers the file does not hold are left on the meta device: {left}")
    return module
