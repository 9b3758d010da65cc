"""Statistics across the items of a Figure 4 sweep: per (layer, block, pass, head), the mean, standard
deviation and 95% confidence interval over items of the query-averaged curve, the per-key-frame logit
and attention mass, and two sink scores (definitions: utils/sweep_stats.py and README.md).

    PYTHONPATH=. python experiments/aggregate_figure4.py cache/sweep
    PYTHONPATH=. python experiments/aggregate_figure4.py 'cache/sweep_seed*.pt' --out stats/seeds.pt

Inputs: sweep folders (their manifest's files, else every p*_s*.pt) and/or cache files or quoted glob
patterns. They must share one setting (frames, layers, passes, model, checkpoint): mixed caches are
refused, not averaged. Writes a small .pt (every statistic, the token-level curve included) and a CSV
beside it (per-frame quantities and sink scores); the two are replaced together or not at all. An --out
that is one of the inputs (or whose CSV is) is refused. Exit status: 0 written; 1 disk full (the old
files kept); 2 bad input (nothing written); 129, 130, 143 on SIGHUP, Ctrl-C, SIGTERM (nothing written,
or, after the files are written, a line saying they are complete).
"""
if __name__ == "__main__":  # from here to the last line a signal exits 128 + signal with one line (utils/output.py)
    from utils.output import exit_on_signals_from_start
    exit_on_signals_from_start("aggregate_figure4.py")

import argparse
import glob
import sys
from pathlib import Path

from pipeline.sweep import SweepFolderError, sweep_files
from utils.output import output_path_arg, same_file


class InputError(ValueError):
    """The inputs cannot be aggregated (missing, unreadable, mixed)."""


def input_files(inputs):
    files = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sweep_files(path)
        elif glob.has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text))]
        else:
            found = [path]
        if not found:
            raise InputError(f"{text}: no cache file found")
        files.extend(found)
    resolved = [f.resolve() for f in files]
    repeated = sorted({str(f) for f in files if resolved.count(f.resolve()) > 1})
    if repeated:
        raise InputError(f"{repeated[0]} is given more than once; each item may count once")
    return files


def default_out(inputs):
    first = Path(inputs[0])
    return first / "statistics.pt" if first.is_dir() else Path("statistics.pt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("inputs", nargs="+", help="sweep folders, cache files or quoted glob patterns")
    parser.add_argument("--out", default=None, type=output_path_arg, help="statistics file (.pt; the CSV goes beside it); default: "
                        "<first folder>/statistics.pt, or statistics.pt")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out is not None else default_out(args.inputs)
    if out.suffix != ".pt":
        print(f"error: --out {out}: expected a .pt file name (the CSV is written beside it)", file=sys.stderr)
        return 2

    from utils.attention_cache import CacheFileError, open_cache
    from utils.output import OutputPathError, exit_status
    from utils.sweep_stats import MixedCachesError, distinct_items, save_statistics, sweep_statistics

    def aggregate():
        files = input_files(args.inputs)
        for path in files:
            for written in (out, out.with_suffix(".csv")):
                if same_file(path, written):
                    raise InputError(f"--out {out}: {written} is the input {path}; refusing to write over it")
        caches, duplicates = distinct_items([open_cache(path) for path in files])
        for duplicate, original in duplicates:
            print(f"note: {duplicate.path} repeats the item of {original.path} (same prompt, seed and settings); "
                  "counted once", file=sys.stderr)
        stats = sweep_statistics(caches)
        csv_path = save_statistics(stats, out)
        print(f"{stats['n_items']} items, {len(stats['groups'])} (layer, block, pass) groups x {stats['num_heads']} heads")
        print(f"Saved: {out} and {csv_path}")

    return exit_status(aggregate, (InputError, SweepFolderError, CacheFileError, MixedCachesError, OutputPathError))


if __name__ == "__main__":
    sys.exit(main())
