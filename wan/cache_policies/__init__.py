"""The attention-cache policies by name: ``model_kwargs.attention_mode`` -> the policy class (see
base.py for what a policy is). A new policy is a module beside these and one entry in ``POLICIES``.

Without ``attention_mode`` the policy follows upstream Self-Forcing's convention: ``global`` when
``local_attn_size`` is -1 (or absent), ``window`` otherwise. Torch is not imported here.
"""
from wan.cache_policies.base import CacheLayout, CachePolicy, Option, PolicyError
from wan.cache_policies.deep_sink import DeepSink
from wan.cache_policies.global_attention import GlobalAttention
from wan.cache_policies.infinite_forcing import InfiniteForcing
from wan.cache_policies.longlive import LongLive
from wan.cache_policies.participative_compression import ParticipativeCompression
from wan.cache_policies.reward_forcing import RewardForcing
from wan.cache_policies.rolling_forcing import RollingForcing
from wan.cache_policies.window import Window

POLICIES = {policy.name: policy for policy in (GlobalAttention, Window, DeepSink, ParticipativeCompression, LongLive,
                                               RewardForcing, InfiniteForcing, RollingForcing)}
MODE_KEY = "attention_mode"

__all__ = ["POLICIES", "CacheLayout", "CachePolicy", "Option", "PolicyError", "option_names", "policy_class", "policy_from_kwargs", "problem"]


def option_names():
    """Every model_kwargs key some policy reads, and ``attention_mode``."""
    return {MODE_KEY, *(key for policy in POLICIES.values() for key in policy.options)}


def policy_class(kwargs):
    """The policy class ``kwargs`` name (its ``attention_mode``, or the Self-Forcing convention); None
    for an unknown mode."""
    mode = kwargs.get(MODE_KEY)
    if mode is None:
        mode = GlobalAttention.name if kwargs.get("local_attn_size", -1) == -1 else Window.name
    return POLICIES.get(mode) if isinstance(mode, str) else None


def problem(kwargs, per_block):
    """(model_kwargs key, what was expected) for the first of the policy options ``kwargs`` (a dict
    with ``attention_mode`` and the chosen policy's options) that cannot run with blocks of
    ``per_block`` frames, else None. Options of other policies are refused: nothing would read them."""
    policy = policy_class(kwargs)
    if policy is None:
        return MODE_KEY, f"one of {list(POLICIES)} (or absent: global, or window with local_attn_size)"
    settings = {key: value for key, value in kwargs.items() if key != MODE_KEY}
    foreign = [key for key in settings if key not in policy.options]
    if foreign:
        readers = [name for name, other in POLICIES.items() if foreign[0] in other.options]
        return foreign[0], f"absent with attention_mode {policy.name!r}, which does not read it (read by {', '.join(readers)})"
    found = policy.problem(policy.with_defaults(settings), per_block)
    if found is not None and found[0] == "local_attn_size" and kwargs.get(MODE_KEY) is None:
        return found[0], "-1 (global attention) or " + found[1]  # the window was chosen by local_attn_size
    return found


def policy_from_kwargs(kwargs, per_block=1):
    """The policy of ``kwargs`` (``attention_mode`` and its options; other keys are not allowed), built
    and checked; ``PolicyError`` naming the key otherwise."""
    found = problem(kwargs, per_block)
    if found is not None:
        key, expected = found
        shown = repr(kwargs[key]) if key in kwargs else "missing"
        raise PolicyError(f"model_kwargs.{key} = {shown}; expected {expected}")
    settings = {key: value for key, value in kwargs.items() if key != MODE_KEY}
    return policy_class(kwargs)(per_block, **settings)
