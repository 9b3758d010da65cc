"""torch.compile for fast mode: one compiled function per Python function, shared by every caller, with
code generation that gives the same bits in every process."""
import functools

import torch


@functools.cache
def compiled(fn):
    """``fn`` through ``torch.compile(dynamic=False)``, once per process: every block and every model in
    fast mode share the compiled function and its graphs.

    Inductor's deterministic mode: kernel configurations are not chosen by timing them on the device,
    which could pick another reduction order in another process (measured on an H200: 1 item in 8
    differed between a sweep and its single runs without it). Its heuristics are inductor's own plus
    ``WholeRowReductions`` (wan/modules/inductor_heuristics.py), installed for this thread (inductor
    reads them from a per-thread handler; they decide only how fast the generated kernels run) and
    named in the compile options, so that inductor's on-disk cache keys what they compiled apart.
    Where this torch has no such option, inductor's own heuristics stay."""
    from torch._inductor import config
    from torch._inductor.virtualized import V

    options = {"deterministic": True}
    if hasattr(config, "inductor_choices_class"):
        from wan.modules.inductor_heuristics import WholeRowReductions

        options["inductor_choices_class"] = WholeRowReductions
        V.set_choices_handler(WholeRowReductions())
    return torch.compile(fn, dynamic=False, options=options)
