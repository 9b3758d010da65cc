"""The on-disk caches of compiled kernels shared by every process of the project on one machine.

Fast mode compiles its block halves with inductor (5-10 s in a new process) and the capture's Triton
kernel at first use. Both keep what they compiled on disk, keyed by the code, the shapes, the options,
the GPU and the library versions, so a later process loads it instead: ``COMPILE_CACHE`` (the project's
``cache/compiled/``, git-ignored) holds inductor's caches (``TORCHINDUCTOR_CACHE_DIR``) and Triton's
(``TRITON_CACHE_DIR``), unless the user points either variable elsewhere. Deleting the folder only
costs the next process its compile time. No torch here: the variables must be set before torch
compiles anything.
"""
import os
from dataclasses import dataclass
from pathlib import Path

COMPILE_CACHE = Path(__file__).resolve().parents[1] / "cache" / "compiled"
CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


@dataclass(frozen=True)
class CompileCache:
    folders: dict  # variable -> the folder it names
    chosen_by_user: tuple  # the variables that were already set
    had_entries: bool  # whether any folder held files before this process

    def describe(self):
        """One line for the run's header."""
        where = ", ".join(f"{name}={folder}" + (" (yours)" if name in self.chosen_by_user else "")
                          for name, folder in self.folders.items())
        state = ("kernels compiled by earlier processes are reused where they match" if self.had_entries
                 else "empty: this process compiles, and later ones reuse its kernels")
        return f"compiled-kernel cache: {state} ({where})"


def use_compile_cache(folder=COMPILE_CACHE, environ=None):
    """Point inductor's and Triton's caches at ``folder``/inductor and ``folder``/triton, each unless
    its variable is already set in ``environ`` (default ``os.environ``) to another folder (the user's
    choice; an earlier run of this process set it to the project's), and say whether they held anything
    before."""
    environ = os.environ if environ is None else environ
    folders, mine = {}, []
    for name, sub in CACHE_VARIABLES.items():
        ours = str(Path(folder) / sub)
        if environ.get(name) and environ[name] != ours:
            mine.append(name)
        else:
            environ[name] = ours
        folders[name] = Path(environ[name])
    had_entries = any(next(path.rglob("*"), None) is not None for path in folders.values() if path.is_dir())
    return CompileCache(folders, tuple(mine), had_entries)
