"""From prompts to an HTML report: prompts x seeds x one or more settings (model configs and their
extraction options) -> one resumable sweep per setting -> statistics -> figures, per-head analysis ->
one self-contained HTML page (figures embedded) and its CSVs.

    python experiments/report_figure4.py --prompt "a cat" --prompt "a dog" --seeds 0-2 \\
        --setting sf=configs/tiny.yaml --setting df=configs/tiny_deep_forcing.yaml --num_frames 12 --out reports/tiny

--setting NAME=CONFIG [extraction options] (repeatable; quote it when it holds options): a setting,
its sweep in <out>/sweeps/NAME. Options of experiments/run_extraction_figure4.py given to the report
itself (e.g. --num_frames 21 --layer_indices 0 4 --capture_step all --device cuda:1) apply to every
setting; a setting's own options come after them and win, e.g.
    --setting "df=configs/tiny_deep_forcing.yaml --num_frames 126 --capture_blocks 6 20 last"
The report sets --output_dir, --save_mode summary and the prompts and seeds itself.

Re-running with more seeds or prompts computes only the items missing (each sweep resumes) and
rebuilds the statistics, figures and page. Every setting is checked before the first sweep starts.
The per-head analysis (utils/head_analysis.py) classifies each head as a sink, local or spread head
by its mean mass on the sink frames and on the current block; the thresholds are --sink_threshold and
--local_threshold. With random weights (the tiny configs) the figures show the pipeline, not a trained
model. Runs from any folder: configs are found in the repository, the report folder is relative to the
current one; the CPU is the default on a machine without a GPU and a config of random weights loads no
checkpoint. The last line printed names the page.

Exit status: 0 written; 1 a failure while running (e.g. a full disk); 2 bad input (nothing run);
129, 130, 143 on SIGHUP, Ctrl-C, SIGTERM (finished items stay; re-run to resume).
"""
import os
import sys

if __name__ == "__main__":  # from here to the last line a signal exits 128 + signal with one line (utils/output.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, from any folder
    from utils.output import exit_on_signals_from_start
    exit_on_signals_from_start("report_figure4.py")

import argparse
import shlex
from pathlib import Path

from experiments.run_extraction_figure4 import build_parser as extraction_parser
from pipeline.plan import UsageError, options_from_args
from pipeline.report import ReportOptions, ReportSetting, build_report, check_forwarded, parse_setting
from pipeline.sweep import SweepFolderError
from utils.cli import ArgumentParser, parse_panel
from utils.head_classes import HeadThresholds
from utils.output import exit_status


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def at_least_one(text):
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
    return int(text)


def build_parser():
    extraction = [s for action in extraction_parser()._actions for s in action.option_strings]
    parser = ArgumentParser(prog="report_figure4.py", description=__doc__.split("\n\n")[0],
                            epilog="\n\n".join(__doc__.split("\n\n")[1:]), forwarded_options=extraction)
    parser.add_argument("--setting", action="append", required=True, metavar="'NAME=CONFIG [OPTIONS]'",
                        help="a setting: a name, its config and extraction options; repeat for each setting")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for several")
    parser.add_argument("--prompts_file", default=None, help="UTF-8 file, one prompt per line (# lines skipped)")
    parser.add_argument("--seeds", nargs="+", default=["0-2"], help="seeds: integers and ranges (default: 0-2)")
    parser.add_argument("--out", type=Path, default=Path("reports/figure4"),
                        help="the report folder (default: reports/figure4); report.html and the CSVs go there")
    parser.add_argument("--panels", nargs="+", type=parse_panel, default=None, metavar="LAYER:HEAD",
                        help="0-based layer:head panels of the Figure 4 plots, titled the same way (default: 0:0 4:9, "
                             "the paper's L1H1 and L5H10; on a small model its first two layers, the heads clipped: "
                             "0:0 4:3 for the tiny model)")
    defaults = HeadThresholds()
    parser.add_argument("--sink_threshold", type=fraction, default=defaults.sink,
                        help=f"a head whose mean mass on the sink frames reaches this is a sink head (default: {defaults.sink:g})")
    parser.add_argument("--local_threshold", type=fraction, default=defaults.local,
                        help="else, one whose mean mass on the current block reaches this is a local head "
                             f"(default: {defaults.local:g}, Dummy Forcing's 80%%)")
    parser.add_argument("--sink_frames", type=at_least_one, default=defaults.sink_frames,
                        help=f"video frames taken as the sink where the cache policy labels none (default: {defaults.sink_frames})")
    parser.add_argument("--title", default="Attention sinks: Figure 4 report", help="the page's title")
    return parser


def report_options(argv):
    """The report's options; extraction options are parsed by run_extraction_figure4.py's own parser,
    per setting (its errors exit 2 naming the setting and the option); an option of neither script exits 2
    with the closest options of both."""
    parser = build_parser()
    args, common = parser.parse_known_args(argv)
    unknown = [w for w in common if w.startswith("--") and w.split("=", 1)[0] not in parser.forwarded_options]
    if unknown:
        parser.error(f"unrecognized arguments: {unknown[0]}")
    check_forwarded(common, "options for every setting")
    given = [w for p in args.prompt or [] for w in ("--prompt", p)]
    given += ["--prompts_file", args.prompts_file] if args.prompts_file else []
    settings = []
    for text in args.setting:
        name, config, words = parse_setting(text)
        check_forwarded(words, f"--setting {name}")
        folder = args.out / "sweeps" / name
        argv_setting = ["--config_path", config, *common, *words, *given, "--seeds", *args.seeds, "--save_mode",
                        "summary", "--output_dir", str(folder), "--quiet"]
        extraction = extraction_parser()
        extraction.prog = f"report_figure4.py --setting {name}"
        settings.append(ReportSetting(name, shlex.join([*common, *words]),
                                      options_from_args(extraction.parse_args(argv_setting))))
    return ReportOptions(args.out, tuple(settings), tuple(args.panels) if args.panels else None, args.sink_threshold,
                         args.local_threshold, args.sink_frames, args.title)


def main(argv=None):
    def work():
        build_report(report_options(argv))
        return 0

    return exit_status(work, (UsageError, SweepFolderError))


if __name__ == "__main__":
    sys.exit(main())
