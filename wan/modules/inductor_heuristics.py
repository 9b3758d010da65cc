"""The one inductor heuristic fast mode sets itself (imported only when something is compiled: importing
inductor takes seconds).

Inductor runs in its deterministic mode, which never picks a kernel configuration by timing candidates
on the device. One thing timing would have found, this sets instead: a norm over the model width (1536
at full size) keeps its whole row in registers and reads it once, where inductor loops over rows wider
than 1024 in chunks. Measured on an H200: the norm kernels of a 21-frame run took 0.128 s instead of
0.165 s.
"""
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WHOLE_ROW_LIMIT = 2048


class WholeRowReductions(InductorChoices):
    """Inductor's heuristics, except that a reduction along contiguous rows of at most
    ``WHOLE_ROW_LIMIT`` elements is a persistent one (the whole row in registers)."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction):
        if features.get_reduction_hint() == ReductionHint.INNER and V.graph.sizevars.statically_known_leq(
            features.reduction_numel, WHOLE_ROW_LIMIT
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self):
        """Part of the key of inductor's on-disk cache of compiled graphs."""
        return f"{__name__}.WholeRowReductions({WHOLE_ROW_LIMIT})"
