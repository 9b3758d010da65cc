"""What every attention-cache policy is: the interface the model, the config checks and the pre-flight
estimate use, whatever the policy keeps.

A policy decides which keys each self-attention call of a causal, block-wise run attends to: the
frames it keeps, evicts, shifts or compresses, and the temporal RoPE position of each kept key. It owns

- ``options``: the ``model_kwargs`` keys it reads, each with its default and its check (the config
  names a policy with ``model_kwargs.attention_mode``);
- ``cache_frames``: how many frames of keys and values one layer's cache holds, for the cache and the
  pre-flight's memory estimate;
- ``describe``: one line for the run's header and the cache file's metadata;
- ``new_cache``: the cache of one transformer block, whose ``update`` writes (and evicts, shifts or
  compresses) on each pass and returns the keys and values to attend to, and which labels every cached
  token with its video frame and temporal RoPE position (``key_positions``).

Policy modules import no torch: their settings are checked before torch is imported, so a bad value is
reported at once. The caches, which hold tensors, live in wan/modules/ and are imported by ``new_cache``.
"""
from dataclasses import dataclass
from typing import Callable, ClassVar


class PolicyError(ValueError):
    """A policy's settings are unknown, missing or out of range."""


@dataclass(frozen=True)
class Option:
    """One ``model_kwargs`` key of a policy: its default and ``check(value, settings, per_block)``, which
    returns None when ``value`` is fine and otherwise what was expected; ``settings`` holds every option
    of the policy (defaults filled in) and ``per_block`` is the run's num_frame_per_block."""

    default: object
    check: Callable


@dataclass(frozen=True)
class CacheLayout:
    """What one transformer block's cache is built for: the whole video of ``num_frames`` latent frames
    of ``frame_seq_length`` tokens, keys and values of ``num_heads`` x ``head_dim`` in ``dtype`` on
    ``device``; ``rope``, the model's ``RoPE3D``, for policies that move keys in time."""

    batch: int
    num_frames: int
    frame_seq_length: int
    num_heads: int
    head_dim: int
    dtype: object
    device: object
    rope: object


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value):
    return is_int(value) and value > 0


class CachePolicy:
    """Base class of the policies. A subclass sets ``name`` (its ``attention_mode``) and ``options``
    and implements ``cache_frames``, ``describe`` and ``new_cache``; ``check`` may add rules that tie
    several options together."""

    name: ClassVar[str]
    options: ClassVar[dict] = {}
    pipeline: ClassVar[str] = "block_wise"  # the denoising loop its caches work in (a family's ``pipeline``)

    def __init__(self, per_block=1, **settings):
        """Settings by option name (defaults for those not given), checked for blocks of ``per_block``
        frames; ``PolicyError`` names the first bad one."""
        unknown = sorted(set(settings) - set(self.options))
        if unknown:
            raise PolicyError(f"attention_mode {self.name!r} does not read {unknown}; its options are {sorted(self.options)}")
        self.settings = self.with_defaults(settings)
        problem = self.problem(self.settings, per_block)
        if problem is not None:
            key, expected = problem
            raise PolicyError(f"{key} = {self.settings[key]!r}; expected {expected}")

    @classmethod
    def with_defaults(cls, settings):
        """Every option: the value in ``settings``, else its default."""
        return {key: settings.get(key, option.default) for key, option in cls.options.items()}

    @classmethod
    def problem(cls, settings, per_block):
        """(option, what was expected) of the first of ``settings`` (every option) that fails its check,
        then of ``check``'s rules across options; None when all pass."""
        for key, option in cls.options.items():
            expected = option.check(settings[key], settings, per_block)
            if expected is not None:
                return key, expected
        return cls.check(settings, per_block)

    @classmethod
    def check(cls, settings, per_block):
        """Rules across options, run once each option passed its own check: (option, expected) or None."""
        return None

    def __eq__(self, other):
        return type(self) is type(other) and self.settings == other.settings

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"

    def cache_frames(self, num_frames):
        """Frames of keys and values one layer's cache holds in a video of ``num_frames`` frames."""
        raise NotImplementedError

    def describe(self):
        """One line: the policy and its settings, for the run's header and the file's metadata."""
        raise NotImplementedError

    def new_cache(self, layout):
        """An empty cache of one transformer block for ``layout`` (a ``CacheLayout``)."""
        raise NotImplementedError

    def recache_frames(self):
        """For a policy that supports prompt switches: the latest frames re-encoded with the new prompt
        after one (its caches then have ``begin_recache`` and ``end_recache``); None: no prompt switch."""
        return None
