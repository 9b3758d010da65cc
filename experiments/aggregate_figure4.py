"""Statistics across the items of a Figure 4 sweep: per (layer, block, pass, head), the mean, standard
deviation and 95% confidence interval over items of the query-averaged curve, the per-key-frame logit
and attention mass, and two sink scores (definitions: utils/sweep_stats.py and README.md).

    python experiments/aggregate_figure4.py cache/sweep              # cache/sweep/stats/statistics.pt and .csv
    python experiments/aggregate_figure4.py 'cache/sweep_seed*.pt' --out stats/seeds.pt

Inputs (the same as plot_figure4.py's): sweep folders (their manifest's files, else every p*_s*.pt),
cache files or quoted glob patterns. They must share one setting (frames, layers, passes, model,
checkpoint): mixed caches are refused, not averaged. Each item counts once: a file that repeats another's
item (the same prompt, seed and settings, e.g. copied between sweeps, or byte-identical) is counted once,
with a note; a statistics file among the inputs (this script's output) is skipped, with a note. With one
item there is no spread: a warning, and the CSV leaves std and the confidence interval empty.

Writes a small .pt (every statistic, the token-level curve included) and a CSV beside it: per frame
quantity and sink score, the pooled row over the items and one row per item (prompt index, prompt,
seed, file, model, settings); the two are replaced together or not at all. Default --out: stats/statistics.pt
in the first input's folder (the sweep folder, or the folder of the first file), never where
'<folder>/*.pt' would glob it. An --out that is one of the inputs (or whose CSV is) is refused. Exit
status: 0 written; 1 disk full (the old files kept); 2 bad input (nothing written); 129, 130, 143 on
SIGHUP, Ctrl-C, SIGTERM (nothing written, or, after the files are written, a line saying they are
complete).
"""
import os
import sys

if __name__ == "__main__":  # from here to the last line a signal exits 128 + signal with one line (utils/output.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, from any folder
    from utils.output import exit_on_signals_from_start
    exit_on_signals_from_start("aggregate_figure4.py")

from pathlib import Path

from pipeline.sweep import InputError, SweepFolderError, input_files, item_of
from utils.cli import ArgumentParser, command
from utils.output import OutputPathError, check_output_path, exit_status, output_path_arg, same_file

DEFAULT_NAME = Path("stats") / "statistics.pt"


def default_out(files, inputs):
    """stats/statistics.pt in the first input's folder: the sweep folder given, else the first file's."""
    first = Path(inputs[0])
    return (first if first.is_dir() else files[0].parent) / DEFAULT_NAME


def build_parser():
    parser = ArgumentParser(prog="aggregate_figure4.py", description=__doc__.split("\n\n")[0],
                            epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="sweep folders, cache files or quoted glob patterns (as plot_figure4.py takes)")
    parser.add_argument("--out", default=None, type=output_path_arg,
                        help="statistics file (.pt; the CSV goes beside it); default: stats/statistics.pt in the "
                        "first input's folder (created)")
    return parser


def check_out(out, files):
    """--out must be a .pt that is none of the inputs, nor has its CSV on one."""
    if out.suffix != ".pt":
        raise InputError(f"--out {out}: expected a .pt file name (the CSV is written beside it)")
    for path in files:
        for written in (out, out.with_suffix(".csv")):
            if same_file(path, written):
                raise InputError(f"--out {out}: {written} is the input {path}; refusing to write over it")
    for written in (out, out.with_suffix(".csv")):
        try:
            check_output_path(written)
        except OutputPathError as err:
            raise InputError(f"--out {err}") from None


def aggregate(args):
    files = input_files(args.inputs)  # checked before torch is imported: a bad input is refused at once
    default = args.out is None
    out = default_out(files, args.inputs) if default else Path(args.out)
    check_out(out, files)

    from utils.attention_cache import CacheFileError
    from utils.sweep_stats import MixedCachesError, save_statistics, statistics_of_files

    try:
        stats = statistics_of_files(files, [(item_of(path) or (None,))[0] for path in files])
    except (CacheFileError, MixedCachesError) as err:
        raise InputError(str(err)) from None
    if default:
        out.parent.mkdir(exist_ok=True)
    csv_path = save_statistics(stats, out)
    print(f"{stats['n_items']} item{'s' if stats['n_items'] > 1 else ''}, {len(stats['groups'])} (layer, block, pass) groups x {stats['num_heads']} heads")
    print(f"Saved: {out} and {csv_path}" + (" (the default place; --out chooses)" if default else ""))
    several = {name: len({g[key] for g in stats["groups"]}) > 1 for name, key in (("--pass", "pass"), ("--block", "block"))}
    extra = [word for name, many in several.items() if many for word in (name, "all")]
    print(f"Next: draw it: {command('plot_figure4.py', out, *extra)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return exit_status(lambda: aggregate(args), (InputError, SweepFolderError, OutputPathError))


if __name__ == "__main__":
    sys.exit(main())
