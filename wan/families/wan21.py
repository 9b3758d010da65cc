"""Base Wan2.1-T2V-1.3B: the official transformer weights (utils/wan21.py names the files) run causally,
block by block, with no generator checkpoint. It is the base every other family loads first; it was
not trained for few-step causal sampling, so it has no schedule of its own (the config gives one)."""
from wan.families.base import ModelFamily, Variant

WAN21 = ModelFamily(
    name="wan2.1",
    description="base Wan2.1-T2V-1.3B weights",
    variants=(Variant("base", checkpoint=None, schedule=None),),
)
