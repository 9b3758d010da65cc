"""The model families by name (see base.py for what a family says). A new family is a module beside
these and one entry in ``FAMILIES``; Deep Forcing is not a family of its own but Self-Forcing with one
of its cache policies.

The config names the family (``family``, default Self-Forcing) and its variant (``variant``, default
the family's first). ``check_model`` checks those and ``model_kwargs``, which the family and its
cache policy share: ``timestep_shift`` (the schedule's) and the policy's options. Torch is not
imported here.
"""
import math

from wan import cache_policies
from wan.families.causal_forcing import CAUSAL_FORCING
from wan.families.causvid import CAUSVID
from wan.families.infinite_forcing import INFINITE_FORCING
from wan.families.longlive import LONGLIVE
from wan.families.reward_forcing import REWARD_FORCING
from wan.families.rolling_forcing import ROLLING_FORCING
from wan.families.self_forcing import SELF_FORCING
from wan.families.wan21 import WAN21

FAMILIES = {family.name: family for family in (WAN21, SELF_FORCING, CAUSAL_FORCING, CAUSVID, LONGLIVE, REWARD_FORCING,
                                               INFINITE_FORCING, ROLLING_FORCING)}
DEFAULT_FAMILY = SELF_FORCING
SCHEDULE_KEYS = ("timestep_shift",)  # the model_kwargs of the schedule; the rest are the cache policy's
MAX_TIMESTEP_SHIFT = 1000  # the largest timestep_shift accepted (a finite, sane schedule)

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "SCHEDULE_KEYS", "cache_policy", "check_model", "family_and_variant",
           "schedule_differences", "timestep_shift"]


def timestep_shift(model_kwargs):
    """The flow-matching shift of a run: the config's ``model_kwargs.timestep_shift``, else the default
    family's."""
    return model_kwargs.get("timestep_shift", DEFAULT_FAMILY.variant().schedule.timestep_shift)


def _policy_kwargs(model_kwargs):
    """The cache policy's part of ``model_kwargs``: everything but the schedule's keys."""
    return {key: value for key, value in model_kwargs.items() if key not in SCHEDULE_KEYS}


def cache_policy(model_kwargs, per_block):
    """The cache policy a config's (checked) ``model_kwargs`` name, for blocks of ``per_block`` frames."""
    return cache_policies.policy_from_kwargs(_policy_kwargs(model_kwargs), per_block)


def family_and_variant(config):
    """The (ModelFamily, Variant) a checked config names."""
    family = FAMILIES[config.get("family") or DEFAULT_FAMILY.name]
    return family, family.variant(config.get("variant"))


def _check_family(config):
    name = config.get("family")
    if name is not None and name not in FAMILIES:
        return "family", f"one of {list(FAMILIES)} (absent: {DEFAULT_FAMILY.name})"
    family = FAMILIES[name or DEFAULT_FAMILY.name]
    variant = config.get("variant")
    if variant is not None and variant not in family.variant_names:
        return "variant", f"one of family {family.name}'s variants {family.variant_names} (absent: {family.variant_names[0]})"
    return None


def _check_model_kwargs(model_kwargs, per_block):
    known = sorted({*SCHEDULE_KEYS, *cache_policies.option_names()})
    unknown = sorted(set(model_kwargs) - set(known))
    if unknown:
        return unknown[0], f"one of the known model_kwargs {known}"
    shift = timestep_shift(model_kwargs)
    if (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0
            or shift > MAX_TIMESTEP_SHIFT):
        return "timestep_shift", (f"a number > 0 and at most {MAX_TIMESTEP_SHIFT} (the shift of the flow-matching "
                                  "schedule; the releases use 3 to 8)")
    return cache_policies.problem(_policy_kwargs(model_kwargs), per_block)


def check_model(config, per_block):
    """(dotted key, what was expected) for the first of the config's model settings (a plain dict with
    ``family``, ``variant`` and ``model_kwargs``, each optional) that no owner reads or that cannot run
    with blocks of ``per_block`` frames, else None."""
    problem = _check_family(config)
    if problem is not None:
        return problem
    model_kwargs = config.get("model_kwargs") or {}
    problem = _check_model_kwargs(model_kwargs, per_block)
    if problem is not None:
        return f"model_kwargs.{problem[0]}", problem[1]
    family, _ = family_and_variant(config)
    policy = cache_policies.policy_class(_policy_kwargs(model_kwargs))
    if policy.pipeline != family.pipeline:
        fitting = [name for name, other in cache_policies.POLICIES.items() if other.pipeline == family.pipeline]
        return "model_kwargs.attention_mode", (f"one of {fitting}: family {family.name} runs the {family.pipeline} loop, "
                                               f"and {policy.name!r} works in the {policy.pipeline} loop only")
    return None


def schedule_differences(config, variant):
    """The config's schedule keys (dotted) whose values differ from the release schedule of
    ``variant``, as 'key = value (release: value)' strings; [] for a variant without a schedule."""
    if variant.schedule is None:
        return []
    found = []
    for key, release in variant.schedule.config_values().items():
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value != release:
            found.append(f"{key} = {value!r} (release: {release!r})")
    return found
