"""The drawing of the Figure 4 plot (experiments/plot_figure4.py): the true-frame key axis (each key
token at its video frame), the panels of the curve, frames and heatmap views, the figure of checked
Sources (utils/figure4_sources.py) and its output file. matplotlib draws off-screen (Agg).
"""
import textwrap
from dataclasses import dataclass

import matplotlib
import torch

from utils.attention_cache import EMA_SINK, SINK, TOP_C
from utils.figure4_sources import PlotInputError, StatsFile, column_band, columns_of
from utils.output import write_atomically

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt  # noqa: E402

QUERY_SHADE = dict(color="tab:orange", alpha=0.15)
SINK_SHADE = dict(color="tab:purple", alpha=0.12)
TOPC_SHADE = dict(color="tab:green", alpha=0.12)
TITLE_CHARS_PER_INCH = 14  # characters of a 9-point title per inch of its column: longer column names wrap
LEGEND_INCHES_PER_COLUMN = 2.8  # the width one label of the 7-point legend takes: a narrow figure stacks them
RANDOM_NOTE = "  [RANDOM WEIGHTS: a demo, not a trained model]"


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
    return f"frame {min(frames)}" if min(frames) == max(frames) else f"frames {min(frames)}-{max(frames)}"


def _query_label(entry):
    """The shaded queries: a block, or a rolling call's whole window (its index, its oldest and newest
    frames' levels)."""
    if entry.window is None:
        return f"query block ({_frame_range(entry.query_frames)})"
    levels = entry.query_levels
    return f"query window {entry.window} ({_frame_range(entry.query_frames)}, levels {levels[0]} to {levels[-1]})"


def true_frame_axis(entry, batch_index, frame_seq_length):
    """The TrueFrameAxis of a cache entry, its regions as the cache policy labelled its key tokens
    (``key_roles``): the sink (RoPE-shifted or not; an EMA sink with the number of blocks blended into
    it, ``sink_updates``) and the top-C tokens of a compression."""
    video, rope = entry.key_video_frames[batch_index], entry.key_rope_frames[batch_index]
    roles = entry.key_roles[batch_index]
    ema = roles == EMA_SINK
    sink = (roles == SINK) | ema
    sink_label = ""
    if sink.any():
        shifted = (rope[sink] != video[sink]).any()
        sink_label = (("EMA sink" if ema.any() else "sink") + f" ({_frame_range(video[sink].tolist())}"
                      + (f", RoPE {_frame_range(rope[sink].tolist())}" if shifted else "")
                      + (f", {entry.sink_updates} evicted blocks blended in" if ema.any() else "") + ")")
    topc = roles == TOP_C
    topc_label = ""
    if topc.any():
        topc_label = f"top-C ({int(topc.sum())} tokens of {_frame_range(video[topc].tolist())})"
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
                   label=_query_label(entry))
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
               label=_query_label(entry))
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
    ax.set_yticks(range(n), [str(h) for h in range(n)], fontsize=6 if n > 8 else 8)
    ax.set_xlabel("Key Frame Index")
    ax.set_ylabel("Head (0-based, as --panels)")
    fig.colorbar(image, ax=ax, label=label)


def printable(text):
    """``text`` as a matplotlib title shows it literally: lone surrogates (a prompt given as invalid
    UTF-8) as backslash escapes, '$' not starting math."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("$", r"\$")


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
        axis = true_frame_axis(entry, batch_index, fsl)
        draw_true_frame_curve(ax, entry, axis, mean, low, high, band_label, ylabel)
    else:
        draw_curve(ax, entry, mean, low, high, band_label, per_frame, ylabel)


def uses_true_frames(source, layer, view, softmax, batch_index, x_axis):
    """Whether a panel of ``layer`` puts key tokens at their video frames: --x frames, the token curve
    of a cache (or of a statistics file whose items shared their key tokens), and keys that are not
    simply video frames 0..Fk-1."""
    entry = source.entry(layer)
    return (x_axis == "frames" and view == "curve" and not softmax and entry.key_video_frames is not None
            and not has_slot_layout(entry, batch_index, source.file.frame_seq_length))


def _column_name(column):
    entry = column[0].entry(column[0].file.layer_indices[0])
    n = f" (n = {column[0].file.n_items})" if isinstance(column[0].file, StatsFile) and column[0].model else ""
    model = f"{column[0].model}{n}: " if column[0].model else ""
    return f"{model}block {column[0].block} ({_frame_range(entry.query_frames)}), pass {column[0].pass_}"


def panel_name(layer, head):
    """A panel's title, in the numbering of --panels (0-based), with the paper's 1-based name beside it."""
    return f"layer {layer} head {head} (L{layer + 1}H{head + 1})"


def figure_legend(fig, axes, ncol=4):
    """One legend for the whole figure, below the panels: every label drawn, once, ``ncol`` a row. Returns
    the number of labels."""
    entries = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=min(len(entries), ncol), fontsize=7,
                   frameon=False)
    return len(entries)


def wrapped(text, width, note=""):
    """``text`` wrapped to ``width`` characters a line (a long setting label over several lines), then
    ``note`` (the RANDOM WEIGHTS banner) kept whole, on the last line where it fits, else on its own."""
    lines = textwrap.wrap(text, max(width, 20), break_long_words=False)
    if note and len(lines[-1]) + len(note) <= max(width, 20):
        lines[-1] += note
    elif note:
        lines.append(note.strip())
    return "\n".join(lines)


def make_figure(sources, panels, view, softmax, batch_index, x_axis="slots", overlay=False):
    """The figure for already checked sources and panels: one column per block of ``sources``, whose
    sources of one block are averaged. ``x_axis`` 'frames' puts key tokens at their video frames
    (``uses_true_frames``), 'slots' keeps the key slot axis. Several columns are sized to stay readable at
    a page's width (about 3 inches a column, 16 at most), their names above the first row, one legend below.
    ``overlay`` draws every column on the same axes instead, one colour each (the curve view)."""
    columns = columns_of(sources)
    if overlay:
        return make_overlay_figure(columns, panels, view, softmax, batch_index, x_axis)
    first = sources[0]
    entry = first.entry(panels[0][0])
    layers = list(dict.fromkeys(layer for layer, _ in panels))
    rows = layers if view == "heatmap" else panels
    by_model = first.model is not None  # models side by side: one y scale per row, to compare them
    width = 10 if len(columns) == 1 else min(16, (4.0 if by_model else 3.2) * len(columns))
    if view == "heatmap":
        height = 0.25 * first.file.num_heads * len(layers) + 1.5 * len(layers)
    else:
        height = (2.8 if len(columns) == 1 else 2.4) * len(panels) + 0.6
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(width, height), squeeze=False,
                             sharey="row" if by_model and view != "heatmap" else "none")
    quantity, label = ("frame_mass", "Attention Mass") if softmax else ("frame_logits", "Average Attention Weight")
    for col, column in enumerate(columns):
        for i, (ax, row) in enumerate(zip(axes[:, col], rows)):
            header = wrapped(_column_name(column), int(TITLE_CHARS_PER_INCH * width / len(columns))) + "\n" \
                if len(columns) > 1 and i == 0 else ""
            if view == "heatmap":
                mean = column_band(column, row, quantity, batch_index)[0]
                draw_heatmap(fig, ax, column[0].entry(row), mean, label)
                ax.set_title(f"{header}layer {row} (L{row + 1}), all heads", fontsize=9)
            else:
                draw_panel(ax, column, row, view, softmax, batch_index, x_axis)
                ax.set_title(header + panel_name(*row), fontsize=9)
            if col > 0:
                ax.set_ylabel("")
    legend_rows = 0
    if view != "heatmap":
        ncol = max(1, min(4, int(width // LEGEND_INCHES_PER_COLUMN)))
        legend_rows = -(-figure_legend(fig, axes, ncol) // ncol)
    blocks = ", ".join(map(str, dict.fromkeys(column[0].block for column in columns)))
    passes = ", ".join(map(str, dict.fromkeys(column[0].pass_ for column in columns)))
    timestep = f", t = {entry.timestep:g}" if len(columns) == 1 else ""
    captured = f"  (block{'s' if ',' in blocks else ''} {blocks}, pass{'es' if ',' in passes else ''} {passes}{timestep})"
    note = RANDOM_NOTE if any(s.file.random_init for s in sources) else ""
    if isinstance(first.file, StatsFile):
        n_items = sorted({s.file.n_items for s in sources})
        if len(n_items) > 1:
            items = "the items of each column (n in its name)"
        else:
            items = f"{n_items[0]} item{'s' if n_items[0] > 1 else ''}"
        spread = "95% CI" if n_items[0] > 1 else "no confidence interval (n = 1)"
        title = f"mean over {items}, {spread}{captured}"
    elif len(columns[0]) > 1:
        title = f"mean over {len(columns[0])} caches{captured}"
    else:
        prompt = first.file.prompt if len(first.file.prompt) <= 90 else first.file.prompt[:87] + "..."
        title = printable(prompt) + captured
    fig.suptitle(wrapped(title, int(TITLE_CHARS_PER_INCH * width), note), fontsize=9)
    fig.tight_layout(rect=(0, min(0.3, 0.2 * legend_rows / height), 1, 1))
    return fig


# ---------------------------------------------------------------------------------------------
# several groups on the same axes (--overlay)


def key_positions(entry, batch_index, frame_seq_length, per_token, x_axis):
    """Where an entry's values go on a shared key axis, in units of 1/frame_seq_length of a frame for
    tokens (``per_token``) or whole frames for key slots: int64 [K] or [Fk]. 'slots' is the slot index;
    'frames' the video frame (each token at its frame, ``true_frame_tokens``; each slot at its frame
    where it holds one whole frame), None where the entry cannot say: no token labels (a statistics file
    whose items kept other tokens), or slots that mix frames (compression)."""
    fk = entry.num_key_frames
    if x_axis == "slots":
        return torch.arange(fk * frame_seq_length if per_token else fk)
    if entry.key_video_frames is None:
        return None
    video = entry.key_video_frames[batch_index].long()
    if per_token:
        return true_frame_tokens(video, frame_seq_length)
    slots = video.view(fk, frame_seq_length)  # [Fk, fsl]
    whole = bool((slots == slots[:, :1]).all()) and bool((slots[:, 0].diff() > 0).all())
    return slots[:, 0] if whole else None


def draw_overlay_panel(ax, columns, names, panel, softmax, batch_index, x_axis):
    """Every column (a model, setting, block or pass) of one (layer, head) on the same axes, one colour
    each, its band in its colour, its query block marked in its colour; never averaged together."""
    layer, head = panel
    quantity, ylabel = ("frame_mass", "Attention Mass") if softmax else ("token_logits", "Average Attention Weight")
    right = 0
    for i, (column, name) in enumerate(zip(columns, names)):
        color = f"C{i % 10}"
        source = column[0]
        entry, fsl = source.entry(layer), source.file.frame_seq_length
        per_frame = 1 if softmax else fsl
        positions = key_positions(entry, batch_index, fsl, not softmax, x_axis)
        if positions is None:
            raise PlotInputError(f"{name}: its key slots mix video frames (compression), or its items kept other key "
                                 "tokens (no per-token frames); use --x slots")
        mean, low, high, band_label = column_band(column, layer, quantity, batch_index)
        mean, low, high = (_head(v, head) for v in (mean, low, high))
        breaks = (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()
        for k, (a, b) in enumerate(zip([0, *breaks], [*breaks, len(positions)])):
            x, y = _steps(mean[a:b], per_frame, int(positions[a]))
            if low is not None:
                _, lo = _steps(low[a:b], per_frame)
                _, hi = _steps(high[a:b], per_frame)
                ax.fill_between(x, lo, hi, step="post", color=color, alpha=0.2, linewidth=0)
            ax.step(x, y, where="post", color=color, linewidth=1.0, label=(f"{name}" + (f" ({band_label})"
                                                                                      if band_label else "")) if k == 0 else None)
        query = [j for j, frame in enumerate(entry.key_frame_indices) if frame in entry.query_frames]
        start, end = ((min(entry.query_frames), max(entry.query_frames) + 1) if x_axis == "frames"
                      else (min(query), max(query) + 1))
        ax.axvspan(start, end, color=color, alpha=0.07, zorder=0)
        right = max(right, end)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlim(0, right)
    ax.set_xlabel("Key Video Frame (query blocks shaded)" if x_axis == "frames" else "Key Frame Index (slots)")
    ax.set_ylabel(ylabel)


def make_overlay_figure(columns, panels, view, softmax, batch_index, x_axis):
    """One axes per panel with every column drawn on it (``draw_overlay_panel``)."""
    if view != "curve":
        raise PlotInputError(f"--overlay draws curves on shared axes; --view {view} draws one column per group "
                             "(leave --overlay out)")
    names = [_column_name(column) for column in columns]
    width, height = 11, 3.2 * len(panels) + 0.2 * len(columns) + 0.3
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False)
    try:
        for ax, panel in zip(axes[:, 0], panels):
            draw_overlay_panel(ax, columns, names, panel, softmax, batch_index, x_axis)
            ax.set_title(panel_name(*panel), fontsize=9)
    except PlotInputError:
        plt.close(fig)
        raise
    legend_rows = figure_legend(fig, axes, ncol=1)  # a group a line: setting labels are long
    sources = [s for column in columns for s in column]
    note = RANDOM_NOTE if any(s.file.random_init for s in sources) else ""
    band = "95% CI" if isinstance(sources[0].file, StatsFile) else "± 1 std where averaged"
    fig.suptitle(wrapped(f"{len(columns)} groups on shared axes, each its own mean ({band}), never averaged together",
                         int(TITLE_CHARS_PER_INCH * width), note), fontsize=9)
    fig.tight_layout(rect=(0, min(0.4, (0.2 * legend_rows + 0.1) / height), 1, 1))
    return fig


# ---------------------------------------------------------------------------------------------
# the output file


def write_figure(fig, out, fmt):
    """Write ``fig`` to ``out`` in the format ``fmt`` (from ``utils.output.check_output_file``), replacing it
    whole or not at all, then close the figure."""
    try:
        write_atomically(out, lambda handle: fig.savefig(handle, format=fmt, dpi=150))
    finally:
        plt.close(fig)
