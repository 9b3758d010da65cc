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

Exit status: 0 when the figure is written; 2 when a cache, a panel or --out is unusable (nothing is
written) and on malformed flags.
"""
import argparse
import glob
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from utils.attention_cache import CacheFileError, open_cache  # noqa: E402
from utils.misc import write_atomically  # noqa: E402

OUTPUT_FORMATS = ("png", "pdf", "svg")
QUERY_SHADE = dict(color="tab:orange", alpha=0.15)


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


def check_compatible(caches):
    """All caches must share the key axis, the query block, layers and heads to be averaged."""
    first = caches[0]
    for other in caches[1:]:
        for attr in ("num_key_frames", "frame_seq_length", "query_frames", "layer_indices", "num_heads"):
            a, b = getattr(first, attr), getattr(other, attr)
            if a != b:
                raise PlotInputError(
                    f"cannot average {first.path} and {other.path}: {attr} differs ({a} vs {b})"
                )


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
    """The output's format from its extension; its folder must exist."""
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise PlotInputError(f"--out {out}: extension {out.suffix!r} not supported, expected one of .png, .pdf, .svg")
    if not out.parent.is_dir():
        raise PlotInputError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise PlotInputError(f"--out {out} is a folder, expected a file name")
    return fmt


# ---------------------------------------------------------------------------------------------
# values


def layer_values(cache, layer, quantity, batch_index):
    """One cache's plotted values for every head of a layer, fp32 [N, L]:
      'token_logits': query-mean logit per key token, L = num_key_frames * frame_seq_length
      'frame_logits': mean logit per key frame (averaged over query frames), L = num_key_frames
      'frame_mass':   attention mass per key frame (averaged over query frames), L = num_key_frames
    """
    summary = cache.summary(layer)
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


def sweep_values(caches, layer, quantity, batch_index):
    """(mean, std) over caches of ``layer_values``, each [N, L]."""
    return aggregate(torch.stack([layer_values(c, layer, quantity, batch_index) for c in caches]))


# ---------------------------------------------------------------------------------------------
# drawing


def _frame_axis(ax, cache, label_prefix=""):
    """Key-frame x axis 0..num_key_frames: thin frame boundaries and the query block shaded."""
    fk = cache.num_key_frames
    for j in range(1, fk):
        ax.axvline(j, color="0.8", linewidth=0.4, zorder=0)
    own = [f for f in cache.query_frames if f < fk]
    if own:
        ax.axvspan(min(own), max(own) + 1, **QUERY_SHADE, zorder=0,
                   label=f"{label_prefix}query block (frames {min(cache.query_frames)}-{max(cache.query_frames)})")
    ax.set_xlim(0, fk)
    ax.set_xticks(range(0, fk + 1, 1 if fk <= 12 else 2))
    ax.set_xlabel("Key Frame Index")


def _steps(values, per_frame):
    """x edges and y for a step plot where each value spans 1/per_frame of a frame: [L] -> [L + 1]."""
    x = torch.arange(values.shape[-1] + 1) / per_frame
    y = torch.cat([values, values[-1:]])
    return x.numpy(), y.numpy()


def draw_curve(ax, cache, mean, std, per_frame, ylabel):
    """Filled step curve of ``mean`` [L] (``per_frame`` values per frame), with a +-std band."""
    x, y = _steps(mean, per_frame)
    if std is not None:
        _, lo = _steps(mean - std, per_frame)
        _, hi = _steps(mean + std, per_frame)
        ax.fill_between(x, lo, hi, step="post", color="0.6", alpha=0.5, linewidth=0, zorder=1, label="± 1 std")
    ax.fill_between(x, y, 0, step="post", color="tab:blue", alpha=0.6, linewidth=0, zorder=2)
    ax.step(x, y, where="post", color="tab:blue", linewidth=0.5, zorder=3, label="mean" if std is not None else None)
    ax.axhline(0, color="black", linewidth=0.5)
    _frame_axis(ax, cache)
    ax.set_ylabel(ylabel)


def draw_frames(ax, cache, mean, std, ylabel):
    """Bars of ``mean`` [Fk], one per key frame, with +-std error bars."""
    centers = torch.arange(mean.shape[0]) + 0.5
    ax.bar(centers.numpy(), mean.numpy(), width=0.85, color="tab:blue",
           yerr=None if std is None else std.numpy(), capsize=2, error_kw=dict(linewidth=0.8))
    ax.axhline(0, color="black", linewidth=0.5)
    _frame_axis(ax, cache)
    ax.set_ylabel(ylabel)


def draw_heatmap(fig, ax, cache, mean, label):
    """Heads x key frames image of ``mean`` [N, Fk]; the query block's columns outlined."""
    n, fk = mean.shape
    image = ax.imshow(mean.numpy(), aspect="auto", origin="lower", extent=(0, fk, -0.5, n - 0.5), cmap="viridis")
    own = [f for f in cache.query_frames if f < fk]
    if own:
        ax.axvspan(min(own), max(own) + 1, fill=False, edgecolor="tab:red", linewidth=2)
    ax.set_xticks(range(0, fk + 1, 1 if fk <= 12 else 2))
    ax.set_yticks(range(n), [f"H{h + 1}" for h in range(n)], fontsize=6 if n > 8 else 8)
    ax.set_xlabel("Key Frame Index")
    ax.set_ylabel("Head")
    fig.colorbar(image, ax=ax, label=label)


def make_figure(caches, panels, view, softmax, batch_index):
    """The figure for already checked caches and panels."""
    cache = caches[0]
    if view == "heatmap":
        layers = list(dict.fromkeys(layer for layer, _ in panels))
        fig, axes = plt.subplots(len(layers), 1, figsize=(10, 0.25 * cache.num_heads * len(layers) + 1.5 * len(layers)),
                                 squeeze=False)
        quantity, label = ("frame_mass", "Attention Mass") if softmax else ("frame_logits", "Average Attention Weight")
        for ax, layer in zip(axes[:, 0], layers):
            mean, _ = sweep_values(caches, layer, quantity, batch_index)
            draw_heatmap(fig, ax, cache, mean, label)
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
            mean, std = sweep_values(caches, layer, quantity, batch_index)
            head_std = None if std is None else std[head]
            if view == "curve":
                draw_curve(ax, cache, mean[head], head_std, per_frame, ylabel)
            else:
                draw_frames(ax, cache, mean[head], head_std, ylabel)
            ax.set_title(f"L{layer + 1}H{head + 1}")
        axes[0, 0].legend(loc="upper left", fontsize=7)
    random = any((c.metadata.get("config") or {}).get("random_init") for c in caches)
    note = "  [RANDOM WEIGHTS: a demo, not a trained model]" if random else ""
    if len(caches) > 1:
        fig.suptitle(f"mean over {len(caches)} caches{note}", fontsize=9)
    else:
        prompt = cache.prompt if len(cache.prompt) <= 90 else cache.prompt[:87] + "..."
        fig.suptitle(prompt + note, fontsize=8)
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
    parser.add_argument("--panels", nargs="+", type=parse_panel, default=[(0, 0), (4, 9)], metavar="LAYER:HEAD",
                        help="0-based layer:head pairs, one panel each (default: 0:0 4:9 = the paper's L1H1 and L5H10)")
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        fmt = check_output(args.out)
        paths = expand_cache_paths(args.cache)
        caches = [open_cache(p) for p in paths]
        check_compatible(caches)
        check_request(caches, args.panels, args.batch_index)
        print(f"using {len(caches)} cache file(s):")
        for c in caches:
            print(f"  {c.path}  ({c.save_mode}, timestep {c.metadata.get('timestep')}, "
                  f"layers {c.layer_indices}, {c.num_heads} heads, {c.num_key_frames} key frames)")
        fig = make_figure(caches, args.panels, args.view, args.softmax, args.batch_index)
        try:
            write_atomically(args.out, lambda handle: fig.savefig(handle, format=fmt, dpi=150))
        finally:
            plt.close(fig)
    except (CacheFileError, PlotInputError) as err:
        print(f"plot_figure4.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
