"""Small helpers shared by the scripts and loaders: seeding and memory figures."""
import random
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
