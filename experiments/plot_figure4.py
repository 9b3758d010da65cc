"""Plot Figure 4 of Deep Forcing (query-averaged attention of the last block over the KV cache)
from one or more attention caches written by experiments/run_extraction_figure4.py.

    PYTHONPATH=. python experiments/plot_figure4.py --cache cache/figure4.pt --out figure4.png
    PYTHONPATH=. python experiments/plot_figure4.py --cache 'cache/sweep_seed*.pt' --view frames

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
(frames) of +- one sample standard deviation over the files.

A cache may hold several captured passes or blocks: --pass and --block choose one (needed only when
the file holds more than one). Without --panels, the paper's 0:0 4:9 are drawn, or, when a cache lacks
them, the first head of its first two layers (clipped to the heads it has).

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
from utils.output import (Interrupted, OutputPathError, OutputSpaceError, check_output_path,  # noqa: E402
                        exit_on_signals, write_atomically)

OUTPUT_FORMATS = ("png", "pdf", "svg")
QUERY_SHADE = dict(color="tab:orange", alpha=0.15)
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
    """'2' -> 2, 'cache' -> 'cache': a denoising pass index or the cache-update pass."""
    if text == CACHE_PASS:
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"pass {text!r} is not an int >= 0 or {CACHE_PASS!r}")
    return int(text)


def parse_block(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"block {text!r} is not an int >= 0")
    return int(text)


@dataclass(frozen=True)
class Source:
    """One cache and the captured (block, pass) of it that is plotted."""

    cache: AttentionCache
    block: int
    pass_: object

    def entry(self, layer):
        return self.cache.entry(layer, self.pass_, self.block)

    def summary(self, layer):
        return self.cache.summary(layer, self.pass_, self.block)


def select(cache, pass_=None, block=None):
    """The Source of ``cache`` for --pass / --block (None: the file's only one)."""
    try:
        block, pass_ = cache.label(pass_, block)
    except ValueError as err:
        raise PlotInputError(f"{err} (--pass / --block choose)") from None
    return Source(cache, block, pass_)


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


def _shape(source):
    """What must agree between averaged sources."""
    entry = source.entry(source.cache.layer_indices[0])
    return {"block": source.block, "pass": source.pass_, "num_key_frames": entry.num_key_frames,
            "key_frame_indices": entry.key_frame_indices, "frame_seq_length": source.cache.frame_seq_length,
            "query_frames": entry.query_frames, "layer_indices": sorted(source.cache.layer_indices),
            "num_heads": source.cache.num_heads}


def check_compatible(sources):
    """All sources must share the pass, the key axis, the query block, layers and heads to be averaged."""
    first = _shape(sources[0])
    for other in sources[1:]:
        for attr, b in _shape(other).items():
            a = first[attr]
            if a != b:
                raise PlotInputError(
                    f"cannot average {sources[0].cache.path} and {other.cache.path}: {attr} differs ({a} vs {b})"
                )


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
    found = [f"{s.cache.path} layer {layer}: {s.entry(layer).nonfinite}"
             for s in sources for layer in layers if s.entry(layer).nonfinite]
    if not found:
        return None
    return f"warning: non-finite logits (NaN/Inf) in the plotted entries, which the curves include: {'; '.join(found)}"


def check_request(caches, panels, batch_index):
    """Every panel's layer and head, and the batch index, must exist in the (compatible) caches."""
    cache = caches[0]
    for layer, head in panels:
        if layer not in cache.layer_indices:
            raise PlotInputError(
                f"panel {layer}:{head}: layer {layer} is not in {cache.path}; layers available: {cache.layer_indices}"
            )
        if head >= cache.num_heads:
            raise PlotInputError(
                f"panel {layer}:{head}: head {head} out of range; heads available: 0..{cache.num_heads - 1}"
            )
    for c in caches:
        if not 0 <= batch_index < c.batch_size:
            raise PlotInputError(f"--batch_index {batch_index} out of range for {c.path} (batch size {c.batch_size})")


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


def _steps(values, per_frame):
    """x edges and y for a step plot where each value spans 1/per_frame of a frame: [L] -> [L + 1]."""
    x = torch.arange(values.shape[-1] + 1) / per_frame
    y = torch.cat([values, values[-1:]])
    return x.numpy(), y.numpy()


def draw_curve(ax, entry, mean, std, per_frame, ylabel):
    """Filled step curve of ``mean`` [L] (``per_frame`` values per frame), with a +-std band."""
    x, y = _steps(mean, per_frame)
    if std is not None:
        _, lo = _steps(mean - std, per_frame)
        _, hi = _steps(mean + std, per_frame)
        ax.fill_between(x, lo, hi, step="post", color="0.6", alpha=0.5, linewidth=0, zorder=1, label="± 1 std")
    ax.fill_between(x, y, 0, step="post", color="tab:blue", alpha=0.6, linewidth=0, zorder=2)
    ax.step(x, y, where="post", color="tab:blue", linewidth=0.5, zorder=3, label="mean" if std is not None else None)
    ax.axhline(0, color="black", linewidth=0.5)
    _frame_axis(ax, entry)
    ax.set_ylabel(ylabel)


def draw_frames(ax, entry, mean, std, ylabel):
    """Bars of ``mean`` [Fk], one per key frame, with +-std error bars."""
    centers = torch.arange(mean.shape[0]) + 0.5
    ax.bar(centers.numpy(), mean.numpy(), width=0.85, color="tab:blue",
           yerr=None if std is None else std.numpy(), capsize=2, error_kw=dict(linewidth=0.8))
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


def make_figure(sources, panels, view, softmax, batch_index):
    """The figure for already checked sources and panels."""
    first = sources[0]
    cache, entry = first.cache, first.entry(panels[0][0])
    if view == "heatmap":
        layers = list(dict.fromkeys(layer for layer, _ in panels))
        fig, axes = plt.subplots(len(layers), 1, figsize=(10, 0.25 * cache.num_heads * len(layers) + 1.5 * len(layers)),
                                 squeeze=False)
        quantity, label = ("frame_mass", "Attention Mass") if softmax else ("frame_logits", "Average Attention Weight")
        for ax, layer in zip(axes[:, 0], layers):
            mean, _ = sweep_values(sources, layer, quantity, batch_index)
            draw_heatmap(fig, ax, entry, mean, label)
            ax.set_title(f"L{layer + 1}, all heads")
    else:
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.8 * len(panels)), squeeze=False)
        if softmax:
            quantity, per_frame, ylabel = "frame_mass", 1, "Attention Mass"
        elif view == "curve":
            quantity, per_frame, ylabel = "token_logits", cache.frame_seq_length, "Average Attention Weight"
        else:
            quantity, per_frame, ylabel = "frame_logits", 1, "Average Attention Weight"
        for ax, (layer, head) in zip(axes[:, 0], panels):
            mean, std = sweep_values(sources, layer, quantity, batch_index)
            head_std = None if std is None else std[head]
            if view == "curve":
                draw_curve(ax, entry, mean[head], head_std, per_frame, ylabel)
            else:
                draw_frames(ax, entry, mean[head], head_std, ylabel)
            ax.set_title(f"L{layer + 1}H{head + 1}")
        axes[0, 0].legend(loc="upper left", fontsize=7)
    note = "  [RANDOM WEIGHTS: a demo, not a trained model]" if any(s.cache.random_init for s in sources) else ""
    captured = f"  (block {first.block}, pass {first.pass_}, t = {entry.timestep:g})"
    if len(sources) > 1:
        fig.suptitle(f"mean over {len(sources)} caches{captured}{note}", fontsize=9)
    else:
        prompt = cache.prompt if len(cache.prompt) <= 90 else cache.prompt[:87] + "..."
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
    parser.add_argument("--cache", nargs="+", required=True, metavar="PATH",
                        help="cache file(s) or quoted glob pattern(s); several files are averaged (mean +- 1 std)")
    parser.add_argument("--panels", nargs="+", type=parse_panel, default=None, metavar="LAYER:HEAD",
                        help="0-based layer:head pairs, one panel each (default: 0:0 4:9 = the paper's L1H1 and L5H10, "
                             "or the first head of the first two layers when a cache lacks them)")
    parser.add_argument("--pass", dest="pass_", type=parse_pass, default=None, metavar="PASS",
                        help="captured pass to plot: a denoising pass 0.. or 'cache' (default: the cache's only one)")
    parser.add_argument("--block", type=parse_block, default=None,
                        help="captured temporal block to plot, 0-based (default: the cache's only one)")
    parser.add_argument("--out", type=Path, default=Path("figure4.png"),
                        help="output file; the format follows the extension: .png, .pdf or .svg (default: figure4.png)")
    parser.add_argument("--view", choices=("curve", "heatmap", "frames"), default="curve",
                        help="curve: per-token filled curve (the paper's view); frames: bars per key frame; "
                             "heatmap: heads x key frames per layer (default: curve)")
    parser.add_argument("--softmax", action="store_true",
                        help="plot attention mass per key frame (post-softmax) instead of pre-softmax logits")
    parser.add_argument("--batch_index", type=int, default=0,
                        help="which sample of the cache's batch dimension to plot (default: 0)")
    return parser


def plot(args):
    """Check every input, then draw and write the figure."""
    fmt = check_output(args.out)
    paths = expand_cache_paths(args.cache)
    sources = [select(open_cache(p), args.pass_, args.block) for p in paths]
    check_compatible(sources)
    panels, note = choose_panels(sources[0].cache, args.panels)
    check_request([s.cache for s in sources], panels, args.batch_index)
    print(f"using {len(sources)} cache file(s):")
    for s in sources:
        entry = s.entry(s.cache.layer_indices[0])
        print(f"  {s.cache.path}  ({s.cache.save_mode}, block {s.block}, pass {s.pass_}, timestep {entry.timestep:g}, "
              f"layers {s.cache.layer_indices}, {s.cache.num_heads} heads, {entry.num_key_frames} key frames)")
    if note:
        print(note)
    warning = nonfinite_warning(sources, panels)
    if warning:
        print(warning, file=sys.stderr)
    fig = make_figure(sources, panels, args.view, args.softmax, args.batch_index)
    try:
        write_atomically(args.out, lambda handle: fig.savefig(handle, format=fmt, dpi=150))
    finally:
        plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with exit_on_signals():
            plot(args)
    except (CacheFileError, PlotInputError, OutputPathError) as err:
        print(f"plot_figure4.py: error: {err}", file=sys.stderr)
        return 2
    except OutputSpaceError as err:
        print(f"plot_figure4.py: error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"plot_figure4.py: {err}; nothing was written", file=sys.stderr)
        return err.exit_code
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
