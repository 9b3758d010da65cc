"""The inputs of the Figure 4 plot (experiments/plot_figure4.py): attention caches and statistics files
opened as Sources, the (block, pass) columns chosen from them, the checks that they can be averaged and
drawn, and the values each column plots, per head. The drawing is utils/figure4_plot.py's.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.attention_cache import AttentionCache, open_cache
from utils.passes import ALL, pass_order
from utils.sweep_stats import StatsFileError, compare_key, distinct_items, load_statistics, setting_of, stats_groups

STATS_QUANTITY = {"token_logits": "curve", "frame_logits": "frame_logit", "frame_mass": "mass"}
DEFAULT_PANELS = ((0, 0), (4, 9))  # the paper's L1H1 and L5H10


class PlotInputError(ValueError):
    """The command line asks for something the caches or the file system cannot give."""


# ---------------------------------------------------------------------------------------------
# inputs


class StatsFile:
    """A statistics file of experiments/aggregate_figure4.py, read with utils.sweep_stats.load_statistics
    and opened for plotting like a cache: path, labels, layer_indices, num_heads, frame_seq_length,
    n_items, random_init (whether its items came from random weights), entry(layer, pass_, block)."""

    label = AttentionCache.label  # the same (block, pass) choice, and messages, as a cache

    def __init__(self, path):
        self.path = Path(path)
        stats = load_statistics(self.path)
        self.setting = stats.get("setting") or {}  # files written before it was kept: {}
        self.random_init = bool(self.setting.get("random_init"))
        self.n_items = stats["n_items"]
        self.num_heads = stats["num_heads"]
        self.frame_seq_length = stats["frame_seq_length"]
        self.groups = stats_groups(stats)
        self.labels = list(dict.fromkeys((g.block, g.pass_) for g in self.groups))
        self.layer_indices = list(dict.fromkeys(g.layer_idx for g in self.groups))

    def entry(self, layer_idx, pass_=None, block=None):
        label = self.label(pass_, block)
        return next(g for g in self.groups if g.layer_idx == layer_idx and (g.block, g.pass_) == label)


@dataclass(frozen=True)
class Source:
    """One file (an AttentionCache, or a StatsFile for --stats) and the captured (block, pass) of it
    that is plotted. ``column``: the figure column it belongs to, by its model (with --by_model) and the
    block and pass the user asked for (None where the file's only one was taken: files that differ
    there are refused, not split)."""

    file: object
    block: int
    pass_: object
    column: tuple = (None, None, None)

    @property
    def model(self):
        """The model label of its column (--by_model), or None."""
        return self.column[0]

    def entry(self, layer):
        return self.file.entry(layer, self.pass_, self.block)

    def summary(self, layer):
        return self.file.summary(layer, self.pass_, self.block)


def model_label(setting):
    """The name of a model in a figure: its family, variant and attention-cache policy (``setting`` as
    utils.sweep_stats.setting_of gives it)."""
    policy = str(setting.get("cache_policy") or "").split(":")[0]
    return ", ".join(str(part) for part in (setting.get("family"), setting.get("variant"), policy) if part)


def _setting_details(setting):
    """What tells two settings of one model apart, in the order labels name it."""
    checkpoint = setting.get("checkpoint_path")
    return {
        "policy": str(setting.get("cache_policy") or "").partition(": ")[2],
        "frames": f"{setting.get('num_frames')} frames",
        "checkpoint": Path(checkpoint).name if checkpoint else "no checkpoint",
        "dtype": str(setting.get("dtype")),
        "precision": str(setting.get("precision")),
        "config": Path(str(setting.get("config_path") or "")).stem,
    }


def setting_labels(settings):
    """A label per setting (dicts of utils.sweep_stats.setting_of) that tells apart the settings of one
    model: the model (``model_label``), then whatever of policy sizes, video length, checkpoint, dtype,
    precision and config differs between settings of that model, in parentheses."""
    labels = []
    for setting in settings:
        model = model_label(setting)
        same_model = [_setting_details(s) for s in settings if model_label(s) == model]
        mine = _setting_details(setting)
        differing = [value for key, value in mine.items() if any(d[key] != value for d in same_model)]
        labels.append(model + (f" ({'; '.join(differing)})" if differing else ""))
    return labels


def select(file, pass_=None, block=None, model=None):
    """The Source of ``file`` for --pass / --block (None: the file's only one), in the column of
    ``model`` (--by_model) or of the block and pass alone."""
    try:
        found_block, found_pass = file.label(pass_, block)
    except ValueError as err:
        raise PlotInputError(f"{err} (--pass / --block choose)") from None
    return Source(file, found_block, found_pass, column=(model, block, pass_))


def _chosen(values, flag, held):
    """The values of --pass or --block: None (the file's only one: [None]), ['all'] (every one ``held``
    in the file, in its order) or the values given, in their order."""
    if values is None:
        return [None]
    if ALL in values:
        if values != [ALL]:
            raise PlotInputError(f"{flag} takes {ALL!r} alone or values")
        return list(dict.fromkeys(held))
    if len(set(values)) != len(values):
        raise PlotInputError(f"{flag} {' '.join(map(str, values))}: a value is given more than once")
    return values


def select_columns(file, passes=None, blocks=None, model=None):
    """The Sources of ``file`` for --pass and --block, one per (block, pass) to draw, blocks first."""
    blocks = _chosen(blocks, "--block", sorted(b for b, _ in file.labels))
    passes = _chosen(passes, "--pass", sorted((p for _, p in file.labels), key=pass_order))
    return [select(file, pass_, block, model) for block in blocks for pass_ in passes]


def columns_of(sources):
    """Sources grouped by model (--by_model) and the block and pass asked for, one figure column each,
    in the order they first appear."""
    columns = dict.fromkeys(s.column for s in sources)
    return [[s for s in sources if s.column == column] for column in columns]


def _shown(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _shape(source):
    """What must agree between averaged sources: the plotted entry's pass and axes, then what
    utils/sweep_stats.compare_key asks of caches averaged over (frames, layers, heads and model)."""
    entry = source.entry(source.file.layer_indices[0])
    return {"block": source.block, "pass": source.pass_, "num_key_frames": entry.num_key_frames,
            "key_frame_indices": entry.key_frame_indices, "query_frames": entry.query_frames,
            "layer_indices": sorted(source.file.layer_indices), **compare_key(source.file)}


def check_compatible(sources):
    """All sources of one column must share the pass, the key axis, the query block, layers, heads and
    model to be averaged."""
    first = _shape(sources[0])
    for other in sources[1:]:
        for attr, b in _shape(other).items():
            a = first[attr]
            if a != b:
                raise PlotInputError(f"cannot average {sources[0].file.path} and {other.file.path}: {attr} differs "
                                     f"({_shown(a)} vs {_shown(b)})")


def _panel_exists(cache, panel):
    layer, head = panel
    return layer in cache.layer_indices and head < cache.num_heads


def choose_panels(cache, given):
    """--panels as given; without it, the paper's panels, or when ``cache`` lacks them (a small model) its
    first two layers' heads, the paper's heads clipped to the heads it has (0:0 4:3 for the tiny model)."""
    if given is not None:
        return given
    if all(_panel_exists(cache, panel) for panel in DEFAULT_PANELS):
        return list(DEFAULT_PANELS)
    layers = sorted(cache.layer_indices)[: len(DEFAULT_PANELS)]
    return [(layer, min(head, cache.num_heads - 1)) for layer, (_, head) in zip(layers, DEFAULT_PANELS)]


def nonfinite_warning(sources, panels):
    """One line naming the plotted entries that hold NaN or Inf logits, or None."""
    layers = list(dict.fromkeys(layer for layer, _ in panels))
    found = [f"{s.file.path} layer {layer}: {s.entry(layer).nonfinite}"
             for s in sources for layer in layers if s.entry(layer).nonfinite]
    if not found:
        return None
    return f"warning: non-finite logits (NaN/Inf) in the plotted entries, which the curves include: {'; '.join(found)}"


def check_panels(file, panels):
    """Every panel's layer and head must exist in ``file`` (and so in the files compatible with it)."""
    for layer, head in panels:
        if layer not in file.layer_indices:
            raise PlotInputError(
                f"panel {layer}:{head}: layer {layer} is not in {file.path}; layers available: {file.layer_indices}"
            )
        if head >= file.num_heads:
            raise PlotInputError(
                f"panel {layer}:{head}: head {head} out of range; heads available: 0..{file.num_heads - 1}"
            )


def check_batch_index(caches, batch_index):
    """--batch_index must name a sample of every cache's batch."""
    for c in caches:
        if not 0 <= batch_index < c.batch_size:
            raise PlotInputError(f"--batch_index {batch_index} out of range for {c.path} (batch size {c.batch_size})")


def check_same_key_tokens(column, layers, batch_index):
    """Averaged caches drawn on the true-frame axis must hold the same key tokens: a compressed cache's
    top-C tokens depend on the item, and then only the key slots line up."""
    first = column[0]
    for other in column[1:]:
        for layer in layers:
            for name in ("key_video_frames", "key_rope_frames"):
                if not torch.equal(getattr(first.entry(layer), name)[batch_index],
                                   getattr(other.entry(layer), name)[batch_index]):
                    raise PlotInputError(
                        f"cannot average {first.file.path} and {other.file.path} on the true-frame axis: {name} of "
                        f"layer {layer}, block {first.block} differs (other key tokens per item); --x slots averages "
                        "per key slot")


# ---------------------------------------------------------------------------------------------
# values


def layer_values(source, layer, quantity, batch_index):
    """One source's plotted values for every head of a layer, fp32 [N, L]:
      'token_logits': query-mean logit per key token, L = num_key_frames * frame_seq_length
      'frame_logits': mean logit per key frame (averaged over query frames), L = num_key_frames
      'frame_mass':   attention mass per key frame (averaged over query frames), L = num_key_frames
    """
    summary = source.summary(layer)
    if quantity == "token_logits":
        return summary["query_mean_logits"][batch_index]
    key = {"frame_logits": "frame_mean_logits", "frame_mass": "frame_attention_mass"}[quantity]
    # query frames all hold frame_seq_length tokens, so their plain mean is the mean over query tokens
    return summary[key][batch_index].mean(dim=1)  # [N, Fq, Fk] -> [N, Fk]


def aggregate(values):
    """Mean and sample standard deviation (n - 1) over files of stacked values [F, ...];
    the standard deviation is None for a single file."""
    std = values.std(dim=0) if values.shape[0] > 1 else None
    return values.mean(dim=0), std


def sweep_values(sources, layer, quantity, batch_index):
    """(mean, std) over sources of ``layer_values``, each [N, L]."""
    return aggregate(torch.stack([layer_values(s, layer, quantity, batch_index) for s in sources]))


def column_band(column, layer, quantity, batch_index):
    """What a column (the sources of one block) plots for every head of a layer: (mean, low, high,
    band label), each [N, L] as in ``layer_values``; low and high None without a band. A statistics
    file gives its mean and 95% confidence interval (none for one item), caches their mean +- one
    standard deviation."""
    source = column[0]
    if isinstance(source.file, StatsFile):
        values = source.entry(layer).values[STATS_QUANTITY[quantity]]
        if source.file.n_items == 1:
            return values["mean"], None, None, None
        return values["mean"], values["ci_low"], values["ci_high"], "95% CI"
    mean, std = sweep_values(column, layer, quantity, batch_index)
    if std is None:
        return mean, None, None, None
    return mean, mean - std, mean + std, "± 1 std"


# ---------------------------------------------------------------------------------------------
# the checked sources of a command line


def cache_sources(paths, passes, blocks, panels, batch_index, x_axis, view, softmax, by_model=False):
    """The Sources of the cache files ``paths`` (the plot's inputs, expanded by pipeline.sweep.input_files)
    for --pass, --block, --panels (None: the default ones) and --batch_index, checked for the --x axis,
    --view and --softmax they are drawn with; each item once; with ``by_model`` each model or setting in
    columns of its own (labelled by ``setting_labels``), its files averaged. Prints the files used and any non-finite logits. Returns (sources, panels)."""
    caches, duplicates = distinct_items([open_cache(p) for p in paths])
    for duplicate, original in duplicates:
        print(f"note: {duplicate.path} repeats the item of {original.path} (same prompt, seed and settings, or the "
              "same bytes); averaged once", file=sys.stderr)
    labels = setting_labels([setting_of(cache) for cache in caches]) if by_model else [None] * len(caches)
    sources = [s for cache, label in zip(caches, labels) for s in select_columns(cache, passes, blocks, label)]
    columns = columns_of(sources)
    for column in columns:
        check_compatible(column)
    panels = choose_panels(caches[0], panels)
    for cache in caches:
        check_panels(cache, panels)
    check_batch_index(caches, batch_index)
    if x_axis == "frames" and view == "curve" and not softmax:
        for column in columns:
            check_same_key_tokens(column, list(dict.fromkeys(layer for layer, _ in panels)), batch_index)
    print(f"using {len(caches)} cache file(s):")
    for s in sources:
        entry = s.entry(s.file.layer_indices[0])
        print(f"  {s.file.path}  ({s.file.save_mode}, block {s.block}, pass {s.pass_}, timestep {entry.timestep:g}, "
              f"layers {s.file.layer_indices}, {s.file.num_heads} heads, {entry.num_key_frames} key frames)")
    warning = nonfinite_warning(sources, panels)
    if warning:
        print(warning, file=sys.stderr)
    return sources, panels


def stats_sources(paths, passes, blocks, panels, batch_index):
    """The Sources of the statistics files ``paths`` for --pass, --block and --panels (None: the default
    ones), checked (--batch_index must be 0); prints what each file holds. Several files are drawn side by
    side (or overlaid), labelled by their settings, never averaged. Returns (sources, panels)."""
    if batch_index != 0:
        raise PlotInputError("--batch_index selects a sample of a cache; a statistics file is over all items")
    files = []
    for path in paths:
        try:
            files.append(StatsFile(path))
        except StatsFileError as err:
            raise PlotInputError(str(err)) from None
    labels = [None]
    if len(files) > 1:
        labels = [label or f.path.stem for label, f in zip(setting_labels([f.setting for f in files]), files)]
        labels = [label if labels.count(label) == 1 else f"{label} [{f.path.name}]" for label, f in zip(labels, files)]
    sources = [s for stats, label in zip(files, labels) for s in select_columns(stats, passes, blocks, label)]
    panels = choose_panels(files[0], panels)
    for stats in files:
        check_panels(stats, panels)
    for stats in files:
        held = ", ".join(f"block {s.block} pass {s.pass_}" for s in sources if s.file is stats)
        n = stats.n_items
        print(f"using {stats.path}: statistics over {n} item{'s' if n > 1 else ''}, {held}, layers {stats.layer_indices}, "
              f"{stats.num_heads} heads")
    return sources, panels
