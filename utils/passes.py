"""Where a captured self-attention call happened: its temporal block and its pass. The one owner of the
pass and block labels, the words that name them (``"cache"``, ``"last"``, ``"all"``), their order and
their parsing, for the capture, the CLI, the cache file and the plot.

A block's passes are its denoising passes 0, 1, ... (one per step of the schedule) and then the clean
cache-update pass ``"cache"``, which rewrites the block's keys and values. Blocks are 0-based; ``"last"``
names the video's last block.
"""
CACHE_PASS = "cache"  # the clean cache-update pass after a block's denoising passes
LAST_BLOCK = "last"  # the video's last temporal block
ALL = "all"  # every pass (or block) there is


def _is_index(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_pass(value):
    """Whether ``value`` is a pass label: a denoising pass index >= 0 or ``CACHE_PASS``."""
    return value == CACHE_PASS if isinstance(value, str) else _is_index(value)


def is_block(value):
    """Whether ``value`` names a block: an index >= 0 or ``LAST_BLOCK``."""
    return value == LAST_BLOCK if isinstance(value, str) else _is_index(value)


def pass_order(pass_):
    """Sort key of a pass label: the denoising passes 0, 1, ... then the cache-update pass."""
    return (1, 0) if pass_ == CACHE_PASS else (0, pass_)


def pass_name(pass_):
    """A pass label as messages show it: 2, or 'cache' quoted."""
    return repr(pass_) if isinstance(pass_, str) else str(pass_)


def parse_pass(text):
    """'2' -> 2, 'cache' -> 'cache'; ValueError for anything else."""
    if text == CACHE_PASS:
        return CACHE_PASS
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"pass {text!r} is not an int >= 0 or {CACHE_PASS!r}")
    return int(text)


def parse_passes(text, num_steps):
    """The passes one word chooses for a schedule of ``num_steps`` denoising steps: a pass index,
    ``"cache"`` or ``"all"`` (every denoising pass, then the cache pass). ValueError naming the word."""
    if text == ALL:
        return [*range(num_steps), CACHE_PASS]
    if text == CACHE_PASS:
        return [CACHE_PASS]
    if text not in {str(i) for i in range(num_steps)}:
        raise ValueError(f"{text!r}; expected 0..{num_steps - 1}, {CACHE_PASS!r} or {ALL!r}")
    return [int(text)]


def parse_blocks(words, num_blocks):
    """Block indices and/or ``"last"`` -> the distinct block indices they name, in block order.
    ValueError naming the word that is not a block of a video of ``num_blocks`` blocks, or repeats one."""
    blocks = []
    for word in words:
        if word == LAST_BLOCK:
            block = num_blocks - 1
        elif word.isascii() and word.isdigit() and int(word) < num_blocks:
            block = int(word)
        else:
            raise ValueError(f"{word!r}; expected a block index 0..{num_blocks - 1} (num_frames / num_frame_per_block "
                             f"blocks) or {LAST_BLOCK!r}")
        if block in blocks:
            raise ValueError(f"block {block} given more than once")
        blocks.append(block)
    return sorted(blocks)


def block_wanted(block, num_blocks, wanted):
    """Whether ``block`` of a video of ``num_blocks`` blocks is one of ``wanted`` (indices and/or
    ``"last"``)."""
    return block in wanted or (block == num_blocks - 1 and LAST_BLOCK in wanted)
