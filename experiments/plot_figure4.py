"""Plot Figure 4 of Deep Forcing (query-averaged attention of the last block over the KV cache)
from one or more attention caches written by experiments/run_extraction_figure4.py.

    PYTHONPATH=. python experiments/plot_figure4.py --cache cache/figure4.pt --out figure4.png
    PYTHONPATH=. python experiments/plot_figure4.py --cache 'cache/sweep_seed*.pt' --view frames
    PYTHONPATH=. python experiments/plot_figure4.py --stats stats/seeds.pt
    PYTHONPATH=. python experiments/plot_figure4.py --cache cache/tiny_df.pt --block all

Views (one panel per ``layer:head`` of --panels, 0-based; titles are 1-based like the paper):
  curve    the paper's layout: the logit averaged over the last block's query tokens, per key token,
           x = key token index / frame_seq_length (so frame j spans [j, j+1)), filled to 0.
  frames   bars of the per-key-frame value (mean logit over the frame's query and key tokens).
  heatmap  per layer: heads x key frames image of the same per-key-frame value (heads of --panels
           are checked but every head is shown).
--softmax plots the attention mass per key frame (softmax over all keys, summed over the frame's
keys, averaged over queries) instead of logits; the curve view then draws it per frame, as steps,
since caches keep no token-level mass.

Several caches (paths or quoted glob patterns) are averaged, with a band (curve) or error bars
(frames) of +- one sample standard deviation over the files; they must share the pass, block, frames,
layers, heads and model (utils/sweep_stats.compare_key: model sizes, checkpoint, dtype, model_kwargs).
--stats draws a statistics file of experiments/aggregate_figure4.py instead: the mean over its items
with the 95% confidence interval of the mean as the band or error bars.

True frames: when the keys of a window, Deep Sink or compressed cache are not video frames 0..Fk-1,
the curve view puts each key token at its video frame (x = frame + its rank among the frame's cached
tokens / frame_seq_length, so frame j's tokens fall in [j, j+1)), evicted frames left as gaps, and
marks the sink (RoPE-shifted keys and the first sink_size frames), the top-C tokens of participative
compression and the query block. --x slots keeps the key slot axis; global-attention caches, the
per-slot views (frames, heatmap, --softmax) and statistics files (which keep no per-token frames)
always use it.

A cache may hold several captured passes or blocks: --pass and --block choose (needed only when the
file holds more than one); --block all (or several blocks) and --pass all (or several passes) draw
one column per block and pass: --pass all on an every-pass capture is the paper's Figure 11. Without
--panels, the paper's 0:0 4:9 are drawn, or, when a cache lacks them, the first head of its first two
layers (clipped to the heads it has).

--out follows a symlink to its target; an existing --out that is a folder, FIFO, socket or device is
refused. A new file gets the umask's mode, a replaced one keeps its mode.

Exit status: 0 when the figure is written; 1 when the disk is full; 2 when a cache, a panel or --out is
unusable (nothing is written) and on malformed flags; 129, 130, 143 on SIGHUP, Ctrl-C, SIGTERM
(nothing is written).
"""
import argparse
import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from utils.attention_cache import CACHE_PASS, AttentionCache, CacheFileError, open_cache  # noqa: E402
from utils.output import OutputPathError, check_output_path, exit_status, write_atomically  # noqa: E402
from utils.sweep_stats import StatsFileError, compare_key, load_statistics  # noqa: E402
from utils.passes import pass_order  # noqa: E402

OUTPUT_FORMATS = ("png", "pdf", "svg")
QUERY_SHADE = dict(color="tab:orange", alpha=0.15)
SINK_SHADE = dict(color="tab:purple", alpha=0.12)
TOPC_SHADE = dict(color="tab:green", alpha=0.12)
STATS_QUANTITY = {"token_logits": "curve", "frame_logits": "frame_logit", "frame_mass": "mass"}
DEFAULT_PANELS = ((0, 0), (4, 9))  # the paper's L1H1 and L5H10


class PlotInputError(ValueError):
    """The command line asks for something the caches or the file system cannot give."""


# ---------------------------------------------------------------------------------------------
# inputs


def parse_panel(text):
    """'4:9' -> (4, 9): a 0-based (layer, head) pair."""
    try:
        layer, head = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"panel {text!r} is not LAYER:HEAD with 0-based ints, e.g. 4:9") from None
    if layer < 0 or head < 0:
        raise argparse.ArgumentTypeError(f"panel {text!r}: layer and head must be >= 0")
    return layer, head


def parse_pass(text):
    """'2' -> 2, 'cache' -> 'cache': a denoising pass index or the cache-update pass; 'all' as given."""
    if text in (CACHE_PASS, "all"):
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"pass {text!r} is not an int >= 0, {CACHE_PASS!r} or 'all'")
    return int(text)


def parse_block(text):
    """'6' -> 6; 'all' as given."""
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"block {text!r} is not an int >= 0 or 'all'")
    return int(text)


@dataclass(frozen=True)
class StatsGroup:
    """One (layer, block, pass) of a statistics file, with the attributes of a CacheEntry that the
    axes and titles read; ``values`` maps a quantity to its mean, std, ci_low and ci_high."""

    layer_idx: int
    block: int
    pass_: object
    timestep: float
    query_frames: list
    key_frame_indices: list
    values: dict

    @property
    def num_key_frames(self):
        return len(self.key_frame_indices)


class StatsFile:
    """A statistics file of experiments/aggregate_figure4.py, read with utils.sweep_stats.load_statistics
    and opened for plotting like a cache: path, labels, layer_indices, num_heads, frame_seq_length,
    n_items, entry(layer, pass_, block)."""

    label = AttentionCache.label  # the same (block, pass) choice, and messages, as a cache

    def __init__(self, path):
        self.path = Path(path)
        stats = load_statistics(self.path)
        self.n_items = stats["n_items"]
        self.num_heads = stats["num_heads"]
        self.frame_seq_length = stats["frame_seq_length"]
        self.groups = [StatsGroup(g["layer_idx"], g["block"], g["pass"], g["timestep"], g["query_frames"],
                                  g["key_frame_indices"], {q: g[q] for q in STATS_QUANTITY.values()})
                       for g in stats["groups"]]
        self.labels = list(dict.fromkeys((g.block, g.pass_) for g in self.groups))
        self.layer_indices = list(dict.fromkeys(g.layer_idx for g in self.groups))

    def entry(self, layer_idx, pass_=None, block=None):
        label = self.label(pass_, block)
        return next(g for g in self.groups if g.layer_idx == layer_idx and (g.block, g.pass_) == label)


@dataclass(frozen=True)
class Source:
    """One file (an AttentionCache, or a StatsFile for --stats) and the captured (block, pass) of it
    that is plotted. ``column``: the figure column it belongs to, by the block and pass the user asked
    for (None where the file's only one was taken: files that differ there are refused, not split)."""

    file: object
    block: int
    pass_: object
    column: tuple = (None, None)

    def entry(self, layer):
        return self.file.entry(layer, self.pass_, self.block)

    def summary(self, layer):
        return self.file.summary(layer, self.pass_, self.block)


def select(file, pass_=None, block=None):
    """The Source of ``file`` for --pass / --block (None: the file's only one)."""
    try:
        found_block, found_pass = file.label(pass_, block)
    except ValueError as err:
        raise PlotInputError(f"{err} (--pass / --block choose)") from None
    return Source(file, found_block, found_pass, column=(block, pass_))


def _chosen(values, flag, held):
    """The values of --pass or --block: None (the file's only one: [None]), ['all'] (every one ``held``
    in the file, in its order) or the values given, in their order."""
    if values is None:
        return [None]
    if "all" in values:
        if values != ["all"]:
            raise PlotInputError(f"{flag} takes 'all' alone or values")
        return list(dict.fromkeys(held))
    if len(set(values)) != len(values):
        raise PlotInputError(f"{flag} {' '.join(map(str, values))}: a value is given more than once")
    return values


def select_columns(file, passes=None, blocks=None):
    """The Sources of ``file`` for --pass and --block, one per (block, pass) to draw, blocks first."""
    blocks = _chosen(blocks, "--block", sorted(b for b, _ in file.labels))
    passes = _chosen(passes, "--pass", sorted((p for _, p in file.labels), key=pass_order))
    return [select(file, pass_, block) for block in blocks for pass_ in passes]


def columns_of(sources):
    """Sources grouped by the block and pass asked for, one figure column each, in the order they first
    appear."""
    columns = dict.fromkeys(s.column for s in sources)
    return [[s for s in sources if s.column == column] for column in columns]


def expand_cache_paths(patterns):
    """Paths of --cache: literal paths as given, glob patterns expanded (sorted); each file once."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise PlotInputError(f"--cache pattern {pattern!r} matches no file")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(pattern))
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise PlotInputError(f"--cache names {paths[i]} more than once; each file may count once in the average")
    return paths


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
    """--panels as given; without it, the paper's panels, or when ``cache`` lacks them the first two
    layers' heads clipped to the heads it has. Returns (panels, a note to print or None)."""
    if given is not None:
        return given, None
    if all(_panel_exists(cache, panel) for panel in DEFAULT_PANELS):
        return list(DEFAULT_PANELS), None
    layers = sorted(cache.layer_indices)[: len(DEFAULT_PANELS)]
    panels = [(layer, min(head, cache.num_heads - 1)) for layer, (_, head) in zip(layers, DEFAULT_PANELS)]
    note = (f"note: {cache.path} lacks the default panels {' '.join(f'{l}:{h}' for l, h in DEFAULT_PANELS)}; "
            f"plotting {' '.join(f'{l}:{h}' for l, h in panels)} (--panels chooses)")
    return panels, note


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


def check_output(out):
    """The output's format from its extension; its folder must exist and it must be a regular file or new."""
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise PlotInputError(f"--out {out}: extension {out.suffix!r} not supported, expected one of .png, .pdf, .svg")
    if not out.parent.is_dir():
        raise PlotInputError(f"--out {out}: folder {out.parent} does not exist")
    try:
        check_output_path(out)
    except OutputPathError as err:
        raise PlotInputError(f"--out {err}") from None
    return fmt


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
    file gives its mean and 95% confidence interval, caches their mean +- one standard deviation."""
    source = column[0]
    if isinstance(source.file, StatsFile):
        values = source.entry(layer).values[STATS_QUANTITY[quantity]]
        return values["mean"], values["ci_low"], values["ci_high"], "95% CI"
    mean, std = sweep_values(column, layer, quantity, batch_index)
    if std is None:
        return mean, None, None, None
    return mean, mean - std, mean + std, "± 1 std"


# ---------------------------------------------------------------------------------------------
# the true-frame key axis


def has_slot_layout(entry, batch_index, frame_seq_length):
    """Whether key slot j holds exactly video frame j (global attention): then slots are frames."""
    slots = torch.arange(entry.num_key_frames, dtype=torch.int32).repeat_interleave(frame_seq_length)
    return torch.equal(entry.key_video_frames[batch_index], slots)


def true_frame_tokens(video_frames, frame_seq_length):
    """Each key token's place on the video-frame axis, in tokens: its frame * frame_seq_length + its rank
    among the cached tokens of that frame (the cache does not record which tokens of a frame top-C
    kept, so they are packed from the frame's start). int64 [K]; divided by frame_seq_length it is x."""
    frames = video_frames.long()
    rank = torch.empty_like(frames)
    for frame in frames.unique():
        same = frames == frame
        rank[same] = torch.arange(int(same.sum()))
    return frames * frame_seq_length + rank


@dataclass(frozen=True)
class TrueFrameAxis:
    """Where one entry's key tokens go on the true-frame axis: ``tokens`` as in ``true_frame_tokens``;
    ``sink`` and ``topc`` boolean masks over the key tokens; the labels of their shading."""

    frame_seq_length: int
    tokens: torch.Tensor
    sink: torch.Tensor
    topc: torch.Tensor
    sink_label: str
    topc_label: str

    def runs(self):
        """Index slices of the key tokens that sit next to each other on the axis."""
        breaks = (torch.nonzero(self.tokens.diff() != 1).flatten() + 1).tolist()
        return [slice(a, b) for a, b in zip([0, *breaks], [*breaks, len(self.tokens)])]

    def span(self, mask):
        """(start, end) in frames of the tokens of ``mask``."""
        chosen = self.tokens[mask]
        return int(chosen.min()) / self.frame_seq_length, (int(chosen.max()) + 1) / self.frame_seq_length


def _frame_range(frames):
    return f"{min(frames)}-{max(frames)}"


def true_frame_axis(entry, batch_index, frame_seq_length, model_kwargs):
    """The TrueFrameAxis of a cache entry. Sink: keys at a RoPE frame other than their video frame (a
    shifted sink) or in the first ``sink_size`` frames. Top-C, under participative compression once it
    compressed: the tokens after the sink up to the last ``recent`` frames of the ``budget`` frames a
    compression keeps (later blocks are appended after them)."""
    video, rope = entry.key_video_frames[batch_index], entry.key_rope_frames[batch_index]
    sink = (rope != video) | (video < model_kwargs.get("sink_size", 0))
    sink_label = ""
    if sink.any():
        shifted = (rope[sink] != video[sink]).any()
        sink_label = (f"sink (frames {_frame_range(video[sink].tolist())}"
                      + (f", RoPE {_frame_range(rope[sink].tolist())})" if shifted else ")"))
    topc = torch.zeros_like(sink)
    topc_label = ""
    if model_kwargs.get("attention_mode") == "participative_compression":
        kept = min(model_kwargs["budget"], model_kwargs["local_attn_size"])
        first = model_kwargs["sink_size"] * frame_seq_length
        last = (kept - model_kwargs["recent"]) * frame_seq_length
        if len(video) >= kept * frame_seq_length:
            topc[first:last] = True
            topc_label = f"top-C ({last - first} tokens of frames {_frame_range(video[topc].tolist())})"
    return TrueFrameAxis(frame_seq_length, true_frame_tokens(video, frame_seq_length), sink, topc, sink_label,
                         topc_label)


# ---------------------------------------------------------------------------------------------
# drawing


def _query_slots(entry):
    """Key frame slots that hold the entry's own query frames."""
    return [j for j, frame in enumerate(entry.key_frame_indices) if frame in entry.query_frames]


def _frame_axis(ax, entry):
    """Key-frame x axis 0..num_key_frames: thin frame boundaries and the query block shaded."""
    fk = entry.num_key_frames
    for j in range(1, fk):
        ax.axvline(j, color="0.8", linewidth=0.4, zorder=0)
    own = _query_slots(entry)
    if own:
        ax.axvspan(min(own), max(own) + 1, **QUERY_SHADE, zorder=0,
                   label=f"query block (frames {min(entry.query_frames)}-{max(entry.query_frames)})")
    ax.set_xlim(0, fk)
    ax.set_xticks(range(0, fk + 1, 1 if fk <= 12 else 2))
    ax.set_xlabel("Key Frame Index")


def _steps(values, per_frame, start=0):
    """x edges and y for a step plot where each value spans 1/per_frame of a frame, the first from
    start / per_frame: [L] -> [L + 1]."""
    x = (start + torch.arange(values.shape[-1] + 1)) / per_frame
    y = torch.cat([values, values[-1:]])
    return x.numpy(), y.numpy()


def _draw_steps(ax, start, mean, low, high, band_label, per_frame):
    """Filled step curve of ``mean`` [L], each value spanning 1/per_frame of a frame from
    start / per_frame on, with the band low..high when given (labelled ``band_label``)."""
    x, y = _steps(mean, per_frame, start)
    if low is not None:
        _, lo = _steps(low, per_frame)
        _, hi = _steps(high, per_frame)
        ax.fill_between(x, lo, hi, step="post", color="0.6", alpha=0.5, linewidth=0, zorder=1, label=band_label)
    ax.fill_between(x, y, 0, step="post", color="tab:blue", alpha=0.6, linewidth=0, zorder=2)
    ax.step(x, y, where="post", color="tab:blue", linewidth=0.5, zorder=3,
            label=None if band_label is None else "mean")


def draw_curve(ax, entry, mean, low, high, band_label, per_frame, ylabel):
    """Filled step curve of ``mean`` [L] (``per_frame`` values per key slot), with the band low..high."""
    _draw_steps(ax, 0, mean, low, high, band_label, per_frame)
    ax.axhline(0, color="black", linewidth=0.5)
    _frame_axis(ax, entry)
    ax.set_ylabel(ylabel)


def draw_true_frame_curve(ax, entry, axis, mean, low, high, band_label, ylabel):
    """The token curve ``mean`` [K] with each key token at its video frame (``axis``: a TrueFrameAxis),
    one filled run per stretch of adjacent tokens, so evicted frames stay empty; the sink, the top-C
    tokens and the query block shaded."""
    for i, run in enumerate(axis.runs()):
        band = (None, None) if low is None else (low[run], high[run])
        _draw_steps(ax, int(axis.tokens[run.start]), mean[run], *band, band_label if i == 0 else None,
                    axis.frame_seq_length)
    for frame in axis.tokens.div(axis.frame_seq_length, rounding_mode="floor").unique().tolist():
        ax.axvline(frame, color="0.8", linewidth=0.4, zorder=0)
    for mask, label, shade in ((axis.sink, axis.sink_label, SINK_SHADE), (axis.topc, axis.topc_label, TOPC_SHADE)):
        if mask.any():
            ax.axvspan(*axis.span(mask), **shade, zorder=0, label=label)
    ax.axvspan(min(entry.query_frames), max(entry.query_frames) + 1, **QUERY_SHADE, zorder=0,
               label=f"query block (frames {_frame_range(entry.query_frames)})")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlim(0, max(entry.query_frames) + 1)
    ax.set_xlabel("Key Video Frame")
    ax.set_ylabel(ylabel)


def draw_frames(ax, entry, mean, low, high, ylabel):
    """Bars of ``mean`` [Fk], one per key frame, with error bars from low to high."""
    centers = torch.arange(mean.shape[0]) + 0.5
    yerr = None if low is None else torch.stack([mean - low, high - mean]).numpy()
    ax.bar(centers.numpy(), mean.numpy(), width=0.85, color="tab:blue",
           yerr=yerr, capsize=2, error_kw=dict(linewidth=0.8))
    ax.axhline(0, color="black", linewidth=0.5)
    _frame_axis(ax, entry)
    ax.set_ylabel(ylabel)


def draw_heatmap(fig, ax, entry, mean, label):
    """Heads x key frames image of ``mean`` [N, Fk]; the query block's columns outlined."""
    n, fk = mean.shape
    image = ax.imshow(mean.numpy(), aspect="auto", origin="lower", extent=(0, fk, -0.5, n - 0.5), cmap="viridis")
    own = _query_slots(entry)
    if own:
        ax.axvspan(min(own), max(own) + 1, fill=False, edgecolor="tab:red", linewidth=2)
    ax.set_xticks(range(0, fk + 1, 1 if fk <= 12 else 2))
    ax.set_yticks(range(n), [f"H{h + 1}" for h in range(n)], fontsize=6 if n > 8 else 8)
    ax.set_xlabel("Key Frame Index")
    ax.set_ylabel("Head")
    fig.colorbar(image, ax=ax, label=label)


def printable(text):
    """``text`` as a matplotlib title shows it literally: lone surrogates (a prompt given as invalid
    UTF-8) as backslash escapes, '$' not starting math."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("$", r"\$")


def _model_kwargs(file):
    """A cache's config model_kwargs; {} for a statistics file, which keeps none."""
    if not isinstance(file, AttentionCache):
        return {}
    return file.metadata.get("config", {}).get("model_kwargs") or {}


def _head(values, head):
    return None if values is None else values[head]


def draw_panel(ax, column, panel, view, softmax, batch_index, x_axis):
    """One curve or frames panel (layer, head) of a column (the sources of one block)."""
    layer, head = panel
    source = column[0]
    entry, fsl = source.entry(layer), source.file.frame_seq_length
    if softmax:
        quantity, per_frame, ylabel = "frame_mass", 1, "Attention Mass"
    elif view == "curve":
        quantity, per_frame, ylabel = "token_logits", fsl, "Average Attention Weight"
    else:
        quantity, per_frame, ylabel = "frame_logits", 1, "Average Attention Weight"
    mean, low, high, band_label = column_band(column, layer, quantity, batch_index)
    mean, low, high = (_head(v, head) for v in (mean, low, high))
    if view == "frames":
        draw_frames(ax, entry, mean, low, high, ylabel)
    elif uses_true_frames(source, layer, view, softmax, batch_index, x_axis):
        axis = true_frame_axis(entry, batch_index, fsl, _model_kwargs(source.file))
        draw_true_frame_curve(ax, entry, axis, mean, low, high, band_label, ylabel)
    else:
        draw_curve(ax, entry, mean, low, high, band_label, per_frame, ylabel)


def uses_true_frames(source, layer, view, softmax, batch_index, x_axis):
    """Whether a panel of ``layer`` puts key tokens at their video frames: --x frames, the token curve
    of a cache, and keys that are not simply video frames 0..Fk-1."""
    return (x_axis == "frames" and view == "curve" and not softmax and isinstance(source.file, AttentionCache)
            and not has_slot_layout(source.entry(layer), batch_index, source.file.frame_seq_length))


def _column_name(column):
    entry = column[0].entry(column[0].file.layer_indices[0])
    return f"block {column[0].block} (frames {_frame_range(entry.query_frames)}), pass {column[0].pass_}"


def make_figure(sources, panels, view, softmax, batch_index, x_axis="slots"):
    """The figure for already checked sources and panels: one column per block of ``sources``, whose
    sources of one block are averaged. ``x_axis`` 'frames' puts key tokens at their video frames
    (``uses_true_frames``), 'slots' keeps the key slot axis."""
    columns = columns_of(sources)
    first = sources[0]
    entry = first.entry(panels[0][0])
    layers = list(dict.fromkeys(layer for layer, _ in panels))
    rows = layers if view == "heatmap" else panels
    width = 10 if len(columns) == 1 else 5.5 * len(columns)
    if view == "heatmap":
        height = 0.25 * first.file.num_heads * len(layers) + 1.5 * len(layers)
    else:
        height = 2.8 * len(panels)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(width, height), squeeze=False)
    quantity, label = ("frame_mass", "Attention Mass") if softmax else ("frame_logits", "Average Attention Weight")
    for col, column in enumerate(columns):
        suffix = f", {_column_name(column)}" if len(columns) > 1 else ""
        for ax, row in zip(axes[:, col], rows):
            if view == "heatmap":
                mean = column_band(column, row, quantity, batch_index)[0]
                draw_heatmap(fig, ax, column[0].entry(row), mean, label)
                ax.set_title(f"L{row + 1}, all heads{suffix}")
            else:
                draw_panel(ax, column, row, view, softmax, batch_index, x_axis)
                ax.set_title(f"L{row[0] + 1}H{row[1] + 1}{suffix}")
        if view != "heatmap":
            axes[0, col].legend(loc="upper left", fontsize=7)
    blocks = ", ".join(map(str, dict.fromkeys(column[0].block for column in columns)))
    passes = ", ".join(map(str, dict.fromkeys(column[0].pass_ for column in columns)))
    timestep = f", t = {entry.timestep:g}" if len(columns) == 1 else ""
    captured = f"  (block{'s' if ',' in blocks else ''} {blocks}, pass{'es' if ',' in passes else ''} {passes}{timestep})"
    if isinstance(first.file, StatsFile):
        fig.suptitle(f"mean over {first.file.n_items} items, 95% CI{captured}", fontsize=9)
    else:
        note = "  [RANDOM WEIGHTS: a demo, not a trained model]" if any(s.file.random_init for s in sources) else ""
        files = columns[0]
        if len(files) > 1:
            fig.suptitle(f"mean over {len(files)} caches{captured}{note}", fontsize=9)
        else:
            prompt = first.file.prompt if len(first.file.prompt) <= 90 else first.file.prompt[:87] + "..."
            fig.suptitle(printable(prompt) + captured + note, fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# command line


def build_parser():
    parser = argparse.ArgumentParser(
        prog="plot_figure4.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--cache", nargs="+", metavar="PATH",
                        help="cache file(s) or quoted glob pattern(s); several files are averaged (mean +- 1 std)")
    inputs.add_argument("--stats", type=Path, metavar="FILE",
                        help="a statistics file of experiments/aggregate_figure4.py: its mean with the 95%% "
                             "confidence interval")
    parser.add_argument("--panels", nargs="+", type=parse_panel, default=None, metavar="LAYER:HEAD",
                        help="0-based layer:head pairs, one panel each (default: 0:0 4:9 = the paper's L1H1 and L5H10, "
                             "or the first head of the first two layers when a cache lacks them)")
    parser.add_argument("--pass", dest="pass_", nargs="+", type=parse_pass, default=None, metavar="PASS",
                        help="captured pass(es) to plot: denoising passes 0.., 'cache', or 'all' (Figure 11: every pass "
                             "side by side, one column each) (default: the cache's only one)")
    parser.add_argument("--block", nargs="+", type=parse_block, default=None,
                        help="captured temporal block(s) to plot, 0-based, or 'all'; several blocks are drawn side "
                             "by side, one column each (default: the cache's only one)")
    parser.add_argument("--out", type=Path, default=Path("figure4.png"),
                        help="output file; the format follows the extension: .png, .pdf or .svg (default: figure4.png)")
    parser.add_argument("--view", choices=("curve", "heatmap", "frames"), default="curve",
                        help="curve: per-token filled curve (the paper's view); frames: bars per key frame; "
                             "heatmap: heads x key frames per layer (default: curve)")
    parser.add_argument("--softmax", action="store_true",
                        help="plot attention mass per key frame (post-softmax) instead of pre-softmax logits")
    parser.add_argument("--batch_index", type=int, default=0,
                        help="which sample of the cache's batch dimension to plot (default: 0)")
    parser.add_argument("--x", dest="x_axis", choices=("frames", "slots"), default="frames",
                        help="key axis of the curve view: frames puts each key token at its video frame when the "
                             "cache's keys are not frames 0..Fk-1 (window, Deep Sink, compression); slots keeps "
                             "the key slot index (default: frames)")
    return parser


def cache_sources(args):
    """The Sources of --cache, checked; returns (sources, panels, a note to print or None)."""
    caches = [open_cache(p) for p in expand_cache_paths(args.cache)]
    sources = [s for cache in caches for s in select_columns(cache, args.pass_, args.block)]
    columns = columns_of(sources)
    for column in columns:
        check_compatible(column)
    panels, note = choose_panels(caches[0], args.panels)
    check_panels(caches[0], panels)
    check_batch_index(caches, args.batch_index)
    if args.x_axis == "frames" and args.view == "curve" and not args.softmax:
        for column in columns:
            check_same_key_tokens(column, list(dict.fromkeys(layer for layer, _ in panels)), args.batch_index)
    print(f"using {len(caches)} cache file(s):")
    for s in sources:
        entry = s.entry(s.file.layer_indices[0])
        print(f"  {s.file.path}  ({s.file.save_mode}, block {s.block}, pass {s.pass_}, timestep {entry.timestep:g}, "
              f"layers {s.file.layer_indices}, {s.file.num_heads} heads, {entry.num_key_frames} key frames)")
    warning = nonfinite_warning(sources, panels)
    if warning:
        print(warning, file=sys.stderr)
    return sources, panels, note


def stats_sources(args):
    """The Sources of --stats, checked; returns (sources, panels, a note to print or None)."""
    if args.batch_index != 0:
        raise PlotInputError("--batch_index selects a sample of a cache; a statistics file is over all items")
    try:
        stats = StatsFile(args.stats)
    except StatsFileError as err:
        raise PlotInputError(str(err)) from None
    sources = select_columns(stats, args.pass_, args.block)
    panels, note = choose_panels(stats, args.panels)
    check_panels(stats, panels)
    labels = ", ".join(f"block {s.block} pass {s.pass_}" for s in sources)
    print(f"using {stats.path}: statistics over {stats.n_items} items, {labels}, layers {stats.layer_indices}, "
          f"{stats.num_heads} heads")
    return sources, panels, note


def plot(args):
    """Check every input, then draw and write the figure."""
    fmt = check_output(args.out)
    sources, panels, note = stats_sources(args) if args.stats else cache_sources(args)
    if note:
        print(note)
    fig = make_figure(sources, panels, args.view, args.softmax, args.batch_index, args.x_axis)
    try:
        write_atomically(args.out, lambda handle: fig.savefig(handle, format=fmt, dpi=150))
    finally:
        plt.close(fig)
    print(f"wrote {args.out}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return exit_status(lambda: plot(args), (CacheFileError, PlotInputError, OutputPathError), "plot_figure4.py: error")


if __name__ == "__main__":
    sys.exit(main())
