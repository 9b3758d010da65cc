"""Small helpers shared by the scripts and loaders."""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def set_seed(seed: int):
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def seeded(build, seed):
    """Call ``build()`` with torch's CPU RNG seeded by ``seed``, leaving the global RNG state as it
    was: random weights that are the same for every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def write_atomically(path, write):
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it over ``path``.
    ``path`` is always either the old file or the complete new one: on any error, Ctrl-C or signal
    turned into an exception, the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def reset_host_peak():
    """Restart the count of this process's peak resident memory (Linux; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_gib():
    """Peak resident memory of this process since start or the last ``reset_host_peak``, in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
