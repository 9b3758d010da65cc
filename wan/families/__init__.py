"""The model families by name (see base.py for what a family says). A new family is a module beside
these and one entry in ``FAMILIES``; Deep Forcing is not a family of its own but Self-Forcing with one
of its cache policies.

``check_model_kwargs`` checks the config's ``model_kwargs``, which the family and its cache policy
share: ``timestep_shift`` (the schedule's) and the policy's options. Torch is not imported here.
"""
import math

from wan import cache_policies
from wan.families.self_forcing import SELF_FORCING
from wan.families.wan21 import WAN21

FAMILIES = {family.name: family for family in (WAN21, SELF_FORCING)}
DEFAULT_FAMILY = SELF_FORCING
SCHEDULE_KEYS = ("timestep_shift",)  # the model_kwargs of the schedule; the rest are the cache policy's

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "SELF_FORCING", "WAN21", "check_model_kwargs", "timestep_shift"]


def timestep_shift(model_kwargs):
    """The flow-matching shift of a run: the config's ``model_kwargs.timestep_shift``, else the default
    family's."""
    return model_kwargs.get("timestep_shift", DEFAULT_FAMILY.schedule.timestep_shift)


def check_model_kwargs(model_kwargs, per_block):
    """(key, what was expected) for the first entry of the config's ``model_kwargs`` (a dict) that no
    owner reads or that cannot run with blocks of ``per_block`` frames, else None."""
    known = sorted({*SCHEDULE_KEYS, *cache_policies.option_names()})
    unknown = sorted(set(model_kwargs) - set(known))
    if unknown:
        return unknown[0], f"one of the known model_kwargs {known}"
    shift = timestep_shift(model_kwargs)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        return "timestep_shift", "a number > 0 (the shift of the flow-matching schedule)"
    return cache_policies.problem({k: v for k, v in model_kwargs.items() if k not in SCHEDULE_KEYS}, per_block)
