"""Reading weight files from local folders, checked key by key.

Every loader in the project goes through these three functions, so that a missing file, a missing
or unexpected key and a wrong shape all give the same kind of error: one that names the file and the
key. Pickled files are read with ``weights_only=True`` unless the caller opts in explicitly.
"""
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, or does not fit the model it is loaded into."""


def read_state_dict(path, allow_pickle=False, device="cpu"):
    """Return the tensors of a ``.safetensors`` file or a torch ``.pth``/``.pt`` file on ``device``.

    Both are read through memory maps, tensor by tensor, so loading onto a GPU costs little host
    memory. ``allow_pickle=True`` unpickles arbitrary objects (it can run code from the file); only
    for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device=str(device))
        except Exception as err:
            raise WeightFileError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        return torch.load(path, map_location=device, weights_only=not allow_pickle, mmap=True)
    except RuntimeError as err:
        # Old (non-zip) torch files cannot be memory-mapped; read them whole.
        if "mmap" not in str(err):
            raise WeightFileError(f"{path}: not a readable torch file ({err})") from err
        return torch.load(path, map_location=device, weights_only=not allow_pickle)
    except Exception as err:
        hint = "" if allow_pickle else "; it holds objects beyond tensors: if you trust the file, opt in (--allow_pickle)"
        raise WeightFileError(f"{path}: cannot be read with weights_only=True ({err}){hint}") from err


def check_state_dict(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], source):
    """Raise ``WeightFileError`` naming ``source`` and the key unless ``found`` has exactly the
    keys of ``expected`` with the same shapes."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} (file {tuple(found[k].shape)}, model {tuple(expected[k])})"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightFileError(f"{source}: does not fit the model: " + "; ".join(problems))


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source, device=None, dtype=None):
    """Check ``state_dict`` against ``module`` and load it by assignment (no init needed: ``module``
    may live on the meta device). Tensors are moved to ``device`` and floating ones cast to ``dtype``
    (where given) one at a time; tensors shared between keys stay shared. Returns ``module``."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source)
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
