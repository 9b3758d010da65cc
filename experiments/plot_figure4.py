"""Plot Figure 4 of Deep Forcing (query-averaged attention of the last block over the KV cache)
from attention caches written by experiments/run_extraction_figure4.py, or a statistics file of
experiments/aggregate_figure4.py.

    python experiments/plot_figure4.py cache/figure4.pt --out figure4.png
    python experiments/plot_figure4.py cache/sweep --view frames          # a sweep folder: its items averaged
    python experiments/plot_figure4.py 'cache/sweep_seed*.pt' --view frames
    python experiments/plot_figure4.py cache/sweep/stats/statistics.pt --pass all
    python experiments/plot_figure4.py cache/tiny_df.pt --block all
    python experiments/plot_figure4.py cache/sf.pt cache/cf.pt cache/ll.pt --by_model
    python experiments/plot_figure4.py reports/tiny/stats/sf.pt reports/tiny/stats/df.pt --overlay

Inputs (the same as aggregate_figure4.py's): cache files, sweep folders (their manifest's files, else
every p*_s*.pt) or quoted glob patterns; or statistics files, recognised by their content. A statistics
file met among caches (a glob over a folder holding one) is skipped, with a note. --cache and --stats
are the older spellings of the inputs, still taken.

Views (one panel per ``layer:head`` of --panels, 0-based, titled the same way, "layer 4 head 9", with the
paper's 1-based name beside it, "L5H10"):
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
layers, heads and model (utils/sweep_stats.compare_key: model family and variant, model sizes, checkpoint, precision,
dtype, model_kwargs). --by_model draws each model or setting (family, variant, attention-cache
policy, and whatever else differs: video length, checkpoint, dtype, precision, config) in columns of its own
instead, side by side on one y scale, labelled by their settings: compared, never averaged.
Statistics files of experiments/aggregate_figure4.py are drawn as the mean over their items with the
95% confidence interval of the mean as the band or error bars (none for one item); several files (one
per setting, e.g. of experiments/report_figure4.py) are drawn side by side, labelled by their settings.
--overlay draws every column (settings, models, blocks, passes) on the same axes instead, one colour
each, on the true-frame key axis: caches or statistics of 21 and 126 frames go on one axis.

True frames: when the keys of a window, Deep Sink or compressed cache are not video frames 0..Fk-1,
the curve view puts each key token at its video frame (x = frame + its rank among the frame's cached
tokens / frame_seq_length, so frame j's tokens fall in [j, j+1)), evicted frames left as gaps, and
marks the regions the cache labelled (the sink, RoPE-shifted or not, and the top-C tokens of
participative compression) and the query block. --x slots keeps the key slot axis; global-attention caches, the
per-slot views (frames, heatmap, --softmax) and statistics files whose items kept other key tokens (a
compression picks them per item) always use it.

A cache may hold several captured passes or blocks: --pass and --block choose (needed only when the
file holds more than one); --block all (or several blocks) and --pass all (or several passes) draw
one column per block and pass: --pass all on an every-pass capture is the paper's Figure 11. Without
--panels, the paper's 0:0 4:9 are drawn, or, when a cache lacks them (the tiny model), the first head of its
first layer and the last head of its second (clipped to the heads it has).

--out follows a symlink to its target; an existing --out that is a folder, FIFO, socket or device is
refused. A new file gets the umask's mode, a replaced one keeps its mode.

Exit status: 0 when the figure is written; 1 when the disk is full; 2 when a cache, a panel or --out is
unusable (nothing is written) and on malformed flags; 129, 130, 143 on SIGHUP, Ctrl-C, SIGTERM
(nothing is written); a signal after the figure is written still exits 129, 130 or 143, saying it is
complete.
"""
import os
import sys

if __name__ == "__main__":  # from here to the last line a signal exits 128 + signal with one line (utils/output.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, from any folder
    from utils.output import exit_on_signals_from_start
    exit_on_signals_from_start("plot_figure4.py")

import argparse
from pathlib import Path

from pipeline.sweep import InputError, SweepFolderError, input_files
from utils import passes
from utils.cli import ArgumentParser, parse_panel
from utils.output import OutputPathError, check_output_file, exit_status, output_path_arg, same_file

OUTPUT_FORMATS = ("png", "pdf", "svg")


def parse_pass(text):
    """'2' -> 2, 'cache' -> 'cache': a denoising pass index or the cache-update pass; 'all' as given."""
    if text == passes.ALL:
        return text
    try:
        return passes.parse_pass(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"pass {text!r} is not an int >= 0, {passes.CACHE_PASS!r} or {passes.ALL!r}") from None


def parse_block(text):
    """'6' -> 6; 'all' as given."""
    if text == passes.ALL:
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"block {text!r} is not an int >= 0 or {passes.ALL!r}")
    return int(text)


def build_parser():
    parser = ArgumentParser(
        prog="plot_figure4.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="cache files, sweep folders or quoted glob patterns (several caches are averaged, mean +- "
                             "1 std), or statistics files (the mean with the 95%% confidence interval; several are "
                             "drawn side by side, labelled by their settings, never averaged)")
    parser.add_argument("--cache", nargs="+", metavar="PATH", default=[],
                        help="cache files, folders or quoted glob patterns: the same as the inputs")
    parser.add_argument("--stats", nargs="+", metavar="FILE", default=[],
                        help="statistics files of experiments/aggregate_figure4.py: the same as giving them as the inputs")
    parser.add_argument("--panels", nargs="+", type=parse_panel, default=None, metavar="LAYER:HEAD",
                        help="0-based layer:head pairs, one panel each, titled the same way (default: 0:0 4:9 = the "
                             "paper's L1H1 and L5H10; on a small model the paper's heads clipped to its heads, on its first two layers: "
                             "0:0 4:3 for the tiny model)")
    parser.add_argument("--pass", dest="pass_", nargs="+", type=parse_pass, default=None, metavar="PASS",
                        help="captured pass(es) to plot: denoising passes 0.., 'cache', or 'all' (Figure 11: every pass "
                             "side by side, one column each); default: the file's only one")
    parser.add_argument("--block", nargs="+", type=parse_block, default=None,
                        help="captured temporal block(s) to plot, 0-based, or 'all'; several blocks are drawn side "
                             "by side, one column each; default: the file's only one")
    parser.add_argument("--out", type=lambda text: Path(output_path_arg(text)), default=Path("figure4.png"),
                        help="output file in the current folder's terms; the format follows the extension: .png, .pdf "
                             "or .svg (default: figure4.png)")
    parser.add_argument("--view", choices=("curve", "heatmap", "frames"), default="curve",
                        help="curve: per-token filled curve (the paper's view); frames: bars per key frame; "
                             "heatmap: heads x key frames per layer (default: curve)")
    parser.add_argument("--softmax", action="store_true",
                        help="plot attention mass per key frame (post-softmax) instead of pre-softmax logits")
    parser.add_argument("--batch_index", type=int, default=0,
                        help="which sample of the cache's batch dimension to plot (default: 0)")
    parser.add_argument("--by_model", action="store_true",
                        help="draw the caches of each model or setting (family, variant, attention-cache policy, and "
                             "whatever else differs: frames, checkpoint, dtype, precision, config) in columns of their own, side by "
                             "side on one y scale, labelled by it, the files of one setting averaged (settings are never "
                             "averaged together)")
    parser.add_argument("--overlay", action="store_true",
                        help="draw every column (models, settings, statistics files, blocks, passes) on the same axes, "
                             "one colour each, instead of side by side (curve view)")
    parser.add_argument("--x", dest="x_axis", choices=("frames", "slots"), default="frames",
                        help="key axis of the curve view: frames puts each key token at its video frame when the "
                             "cache's keys are not frames 0..Fk-1 (window, Deep Sink, compression); slots keeps "
                             "the key slot index (default: frames)")
    return parser


def check_arguments(args):
    """The files of the inputs and the output's format, checked before torch and matplotlib are imported."""
    texts = [*args.inputs, *args.cache, *args.stats]
    if not texts:
        raise InputError("no input: give cache files, sweep folders, glob patterns or statistics files")
    if args.stats and len(texts) > len(args.stats):
        raise InputError(f"--stats {' '.join(args.stats)}: statistics files are drawn without caches; leave out the "
                         "other inputs")
    files = input_files(texts)
    fmt = check_output_file(args.out, OUTPUT_FORMATS)
    for path in files:
        if same_file(path, args.out):
            raise InputError(f"--out {args.out} is the input {path}; refusing to write over it")
    return files, fmt


def split_inputs(files):
    """(cache files, statistics files): statistics files alone are drawn as statistics (several side by side);
    one among caches (a glob over a folder that holds it) is skipped with a note."""
    from utils.sweep_stats import is_statistics_file

    stats = [f for f in files if is_statistics_file(f)]
    caches = [f for f in files if f not in stats]
    if caches:
        for path in stats:
            print(f"note: {path} is a statistics file, not a cache: skipped (draw it without caches)", file=sys.stderr)
        return caches, []
    return [], stats


def plot(args, files, fmt):
    """Draw and write the figure of the checked input ``files`` in the format ``fmt``."""
    caches, stats = split_inputs(files)
    if stats and args.by_model:
        raise InputError("--by_model tells the models of several caches apart; statistics files are of one setting "
                         "each and always drawn apart")
    from utils.figure4_plot import make_figure, write_figure
    from utils.figure4_sources import cache_sources, stats_sources

    if stats:
        sources, panels = stats_sources(stats, args.pass_, args.block, args.panels, args.batch_index)
    else:
        sources, panels = cache_sources(caches, args.pass_, args.block, args.panels, args.batch_index, args.x_axis,
                                        args.view, args.softmax, args.by_model)
    figure = make_figure(sources, panels, args.view, args.softmax, args.batch_index, args.x_axis, args.overlay)
    write_figure(figure, args.out, fmt)
    print(f"wrote {args.out}")


def main(argv=None):
    args = build_parser().parse_args(argv)

    def work():
        files, fmt = check_arguments(args)  # before torch and matplotlib are imported: a bad input is refused at once
        from utils.attention_cache import CacheFileError
        from utils.figure4_sources import PlotInputError
        try:
            return plot(args, files, fmt)
        except (CacheFileError, PlotInputError) as err:
            raise InputError(str(err)) from None

    return exit_status(work, (InputError, SweepFolderError, OutputPathError), "plot_figure4.py: error")


if __name__ == "__main__":
    sys.exit(main())
