"""From prompts to a report (experiments/report_figure4.py): prompts x seeds x settings -> one sweep
per setting -> statistics -> figures and per-head analysis -> one self-contained HTML page and its CSVs.

The report folder:
    sweeps/<setting>/        the setting's sweep (pipeline/sweep.py's layout; resumable: a re-run with
                             more seeds or prompts computes only the items missing)
    stats/<setting>.pt, .csv its statistics (utils/sweep_stats.py)
    figures/*.png            the figures the page embeds
    sink_scores.csv          per setting, layer, block and pass: the head-averaged sink scores, 95% CI
    head_classes.csv         per setting, block and pass: how many sink, local and spread heads
    heads.csv                per setting, layer, block, pass and head: the masses on the sink, the
                             current block and the rest, 95% CI, and the head's class
    settings.csv, files.csv  the settings and every item file
    report.html              the page (figures embedded; its tables are these CSVs' strings), written
                             with the figures and CSVs together or not at all

Every setting's plan is checked (pipeline/plan.py, no torch) before the first sweep starts; importing
this module imports no torch.
"""
import io
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.plan import UsageError, plan_run
from pipeline.sweep import item_name, read_manifest
from utils.config import model_sizes
from utils.head_classes import HeadThresholds
from utils.output import check_output_path, csv_bytes, write_files_atomically

REPORT_HTML = "report.html"
SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# extraction options the report sets itself, for every setting alike
RESERVED = {"--output_path": "the report writes each setting's sweep into <out>/sweeps/<name>",
            "--output_dir": "the report writes each setting's sweep into <out>/sweeps/<name>",
            "--save_mode": "the report's sweeps save summaries (exact fp32 reductions)",
            "--prompt": "give the prompts to the report, once for all settings",
            "--prompts_file": "give the prompts to the report, once for all settings",
            "--seed": "give the seeds to the report (--seeds), once for all settings",
            "--seeds": "give the seeds to the report, once for all settings"}
SETTINGS_COLUMNS = ("setting", "model", "config", "options", "cache_policy", "num_frames", "layers", "passes", "blocks",
                    "checkpoint", "dtype", "precision", "device", "random_weights", "prompts", "seeds", "items",
                    "sweep_folder")
FILES_COLUMNS = ("setting", "prompt_index", "seed", "prompt", "file", "bytes", "sha256")


@dataclass(frozen=True)
class ReportSetting:
    """One setting of the report: its name, the extraction options as the user gave them (``flags``),
    and the extraction's Options for its sweep."""

    name: str
    flags: str
    options: object


@dataclass(frozen=True)
class ReportOptions:
    """The report's folder, its settings, the figures' panels (None: the default ones), the head
    classification's thresholds (utils.head_classes.HeadThresholds's fields) and the page's title."""

    out: Path
    settings: tuple
    panels: tuple | None
    sink_threshold: float
    local_threshold: float
    sink_frames: int
    title: str

    def thresholds(self):
        return HeadThresholds(self.sink_threshold, self.local_threshold, self.sink_frames)


def parse_setting(text):
    """'NAME=CONFIG [extraction options]' (or 'CONFIG [...]', named by the config's file name) ->
    (name, config path, option words)."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise UsageError(f"--setting {text!r}: {err}") from None
    if not words:
        raise UsageError("--setting: empty; expected NAME=CONFIG [extraction options], e.g. sf=configs/tiny.yaml")
    name, _, config = words[0].rpartition("=")
    name = name or Path(config).stem
    if not config or config.startswith("-"):
        raise UsageError(f"--setting {text!r}: expected NAME=CONFIG first, then extraction options")
    if not SETTING_NAME.fullmatch(name):
        raise UsageError(f"--setting {text!r}: name {name!r} must be letters, digits, '_', '.', '-' (a folder name)")
    return name, config, words[1:]


def check_forwarded(words, where):
    """Extraction options that the report sets itself are refused, naming the option and why."""
    for word in words:
        option = word.split("=", 1)[0]
        if option in RESERVED or option == "--config_path":
            reason = RESERVED.get(option, "the config is the setting's NAME=CONFIG")
            raise UsageError(f"{where}: {option} is set by the report ({reason})")


def check_report(report):
    """Every setting's plan (no torch), the panels against each setting's layers and heads, and the
    report folder; returns the plans in setting order."""
    names = [s.name for s in report.settings]
    again = sorted({n for n in names if names.count(n) > 1})
    if again:
        raise UsageError(f"--setting: name {again[0]!r} given more than once; name each setting (NAME=CONFIG)")
    if report.out.exists() and not report.out.is_dir():
        raise UsageError(f"--out: {report.out} exists and is not a folder")
    for name in (REPORT_HTML, *CSV_NAMES):
        try:
            check_output_path(report.out / name)
        except Exception as err:
            raise UsageError(f"--out: {err}") from None
    plans = []
    for setting in report.settings:
        try:
            plan = plan_run(setting.options)
        except UsageError as err:
            raise UsageError(f"--setting {setting.name}: {err}") from None
        heads = model_sizes(plan.config)["num_heads"]
        for layer, head in report.panels or ():
            if layer not in plan.layers or head >= heads:
                raise UsageError(f"--panels {layer}:{head}: setting {setting.name} captures layers {plan.layers} of "
                                 f"{heads} heads (--layer_indices chooses)")
        plans.append(plan)
    return plans


CSV_NAMES = ("settings.csv", "files.csv", "sink_scores.csv", "head_classes.csv", "heads.csv")


def _png(fig):
    from utils.figure4_plot import plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _say(text):
    print(text, flush=True)


def build_report(report):
    """The whole report (``ReportOptions``); returns the page's path. UsageError for bad input, raised
    before any sweep starts."""
    t_start = time.perf_counter()
    plans = check_report(report)
    from pipeline.run import run

    steps = len(report.settings) + 2
    for i, (setting, plan) in enumerate(zip(report.settings, plans), 1):
        _say(f"[{i}/{steps}] sweep {setting.name!r}: {len(plan.items)} items ({len(plan.prompts)} prompts x "
             f"{len(plan.seeds)} seeds) into {plan.output_dir}; items already complete are kept")
        run(setting.options, show_next=False)  # the report goes on itself
    from utils.attention_cache import CacheFileError
    from utils.figure4_sources import PlotInputError
    from utils.sweep_stats import MixedCachesError

    try:
        _say(f"[{steps - 1}/{steps}] statistics and per-head analysis")
        results = [_analyse(report, setting, plan) for setting, plan in zip(report.settings, plans)]
        _say(f"[{steps}/{steps}] figures and the page")
        page = _write_outputs(report, results)
    except (CacheFileError, MixedCachesError, PlotInputError) as err:  # an item file changed under the report
        raise UsageError(str(err)) from err
    _say(f"done in {time.perf_counter() - t_start:.1f} s")
    _say(f"Report: {page} (open it in a web browser)")
    return page


def _analyse(report, setting, plan):
    """One setting's statistics file and per-head groups from the items of its plan."""
    from utils.attention_cache import open_cache
    from utils.figure4_sources import model_label
    from utils.head_analysis import head_statistics
    from utils.sweep_stats import distinct_items, save_statistics, setting_of, sweep_statistics

    folder = plan.output_dir
    opened = [open_cache(folder / item_name(p, s)) for p, s in plan.items]
    caches, duplicates = distinct_items(opened)
    for duplicate, original in duplicates:
        _say(f"  note: {duplicate.path} repeats the item of {original.path}; counted once")
    n = sum(cache.batch_size for cache in caches)
    stats_path = None
    if same_key_frames(caches):
        stats_path = report.out / "stats" / f"{setting.name}.pt"
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats = sweep_statistics(caches, [plan.items[opened.index(cache)][0] for cache in caches])
        save_statistics(stats, stats_path)
        _say(f"  {setting.name}: {n} items, {len(stats['groups'])} (layer, block, pass) groups x {stats['num_heads']} "
             f"heads -> {stats_path}" + ("  (warning: one item, no confidence interval)" if n < 2 else ""))
    else:
        _say(f"  note: {setting.name}: its items hold other key frames (a compressing cache picks other tokens per "
             "item), so it has no per-frame statistics or Figure 4 curves; its sink scores and head analysis use each "
             "item's own key labels")
    groups = head_statistics(caches, report.thresholds())
    lines = {(line["prompt_index"], line["seed"]): line for line in read_manifest(folder)}
    return {"setting": setting, "plan": plan, "stats_path": stats_path, "n": n, "groups": groups,
            "model": model_label(setting_of(caches[0])), "caches": caches, "lines": lines}


def same_key_frames(caches):
    """Whether every item holds the same key frames in every entry: what per-frame statistics need."""
    first = [e.key_frame_indices for e in caches[0].entries]
    return all([e.key_frame_indices for e in cache.entries] == first for cache in caches[1:])


def _settings_row(result):
    setting, plan, first = result["setting"], result["plan"], result["caches"][0]
    meta = first.metadata
    return [setting.name, result["model"], setting.options.config_path, setting.flags, str(meta.get("cache_policy")),
            str(first.num_frames), " ".join(map(str, plan.layers)), " ".join(map(str, plan.passes)),
            " ".join(map(str, plan.blocks)), str(plan.checkpoint_path or "none"), plan.dtype, plan.precision,
            plan.device, str(bool(plan.config.get("random_init"))), str(len(plan.prompts)),
            " ".join(map(str, plan.seeds)), str(result["n"]), str(plan.output_dir)]


def _files_rows(result):
    rows = []
    plan = result["plan"]
    for p, s in plan.items:
        line = result["lines"].get((p, s), {})
        rows.append([result["setting"].name, str(p), str(s), plan.prompts[p], item_name(p, s), str(line.get("bytes", "")),
                     str(line.get("sha256", ""))])
    return rows


def _figures(report, results):
    """[(file name, PNG bytes, caption)] of the page, in its order (each figure closed once drawn)."""
    from utils.figure4_plot import RANDOM_NOTE, make_figure
    from utils.figure4_sources import PlotInputError, StatsFile, check_panels, choose_panels, select, select_columns
    from utils.head_plot import head_heatmaps
    from utils.passes import pass_order

    with_stats = [r for r in results if r["stats_path"] is not None]
    files = [StatsFile(r["stats_path"]) for r in with_stats]
    labels = [r["setting"].name + ": " + r["model"] for r in with_stats]
    panels = []
    if files:
        panels = choose_panels(files[0], list(report.panels) if report.panels else None)
        panels = [p for p in panels if all(p[0] in f.layer_indices and p[1] < f.num_heads for f in files)]
        for f in files:
            check_panels(f, panels)
    out = []
    if panels:
        firsts = []
        for f, label in zip(files, labels):
            block = max(b for b, _ in f.labels)
            pass_ = min((p for b, p in f.labels if b == block), key=pass_order)
            firsts.append(select(f, pass_, block, label if len(files) > 1 else None))
        out.append(("compare_logits.png", _png(make_figure(firsts, panels, "curve", False, 0, "frames")),
                    "Figure 4 per setting, side by side on one y scale: the query-averaged logit per key token on the "
                    "true-frame key axis (each key token at its video frame), mean over items with its 95% CI; the "
                    "last captured block, first pass."))
        if len(files) > 1:
            for name, softmax, what in (("overlay_logits.png", False, "The query-averaged logit per key token"),
                                        ("overlay_mass.png", True, "The attention mass per key frame (softmax over "
                                                                   "all keys)")):
                try:
                    fig, axis = make_figure(firsts, panels, "curve", softmax, 0, "frames", overlay=True), "true-frame"
                except PlotInputError:  # a compressed cache's slots mix frames and its items kept other tokens
                    fig, axis = make_figure(firsts, panels, "curve", softmax, 0, "slots", overlay=True), "key slot"
                out.append((name, _png(fig), f"{what}, one colour per setting on shared axes (the {axis} key axis), never "
                                       "averaged together."))
        for f, label in zip(files, labels):
            if len(f.labels) > 1:
                columns = select_columns(f, ["all"], ["all"])
                out.append((f"{Path(f.path).stem}_all.png", _png(make_figure(columns, panels, "curve", False, 0, "frames")),
                            f"{label}: every captured block and pass, one column each."))
    for result in results:
        label = result["setting"].name + ": " + result["model"]
        for block, pass_ in dict.fromkeys((g["block"], g["pass"]) for g in result["groups"]):
            same = [g for g in result["groups"] if (g["block"], g["pass"]) == (block, pass_)]
            note = RANDOM_NOTE if result["plan"].config.get("random_init") else ""
            fig = head_heatmaps(same, f"{label}, block {block}, pass {pass_}: mean over {same[0]['n']} items{note}")
            out.append((f"heads_{result['setting'].name}_b{block}_p{pass_}.png", _png(fig),
                        f"{label}, block {block}, pass {pass_}: per layer and head, the mean softmax mass on the sink "
                        "frames, the current block and the rest, and the head's class."))
    return out


def _write_outputs(report, results):
    from utils import report_html as H
    from utils.head_analysis import CLASS_COLUMNS, HEAD_COLUMNS, LAYER_COLUMNS, class_rows, head_rows, layer_rows

    tables = {
        "settings.csv": (SETTINGS_COLUMNS, [_settings_row(r) for r in results]),
        "files.csv": (FILES_COLUMNS, [row for r in results for row in _files_rows(r)]),
        "sink_scores.csv": (LAYER_COLUMNS, [row for r in results for row in layer_rows(r["setting"].name, r["model"],
                                                                                        r["groups"])]),
        "head_classes.csv": (CLASS_COLUMNS, [row for r in results for row in class_rows(r["setting"].name, r["model"],
                                                                                         r["groups"])]),
        "heads.csv": (HEAD_COLUMNS, [row for r in results for row in head_rows(r["setting"].name, r["model"],
                                                                                r["groups"])]),
    }
    figures = _figures(report, results)
    random = any(r["plan"].config.get("random_init") for r in results)
    banner = ("RANDOM WEIGHTS: at least one setting runs a model with random weights; its figures and head classes "
              "show the pipeline at work and mean nothing about a trained model.") if random else None
    prompts = results[0]["plan"].prompts
    page = H.page(report.title, banner, [
        ("What this is", H.paragraph(
            f"{len(results)} setting(s) x {len(prompts)} prompt(s) x {len(results[0]['plan'].seeds)} seed(s). "
            "Each setting is its own sweep, statistics and figures: settings are compared side by side, never "
            "averaged together. Confidence intervals are two-sided 95% intervals of the mean over items "
            "(Student's t).") + H.csv_table(*tables["settings.csv"], "settings.csv")),
        ("Prompts", H.bullet_list(prompts)),
        ("Figures", "".join(H.figure(png, caption) for name, png, caption in figures if not name.startswith("heads_"))),
        ("Sink scores per layer", H.paragraph(
            "Per item, the mean over heads of: the softmax mass on the sink frames and on the current block "
            "(utils/head_analysis.py), the sink logit gap (first key frame minus the middle frames, query-averaged "
            "logits) and the sink ratio (mass of the first key frame over the mean of the middle frames; nan where "
            "the block has no middle frames); then the mean over items and its 95% CI.")
         + H.csv_table(*tables["sink_scores.csv"], "sink_scores.csv")),
        ("Heads", H.paragraph(report.thresholds().describe()) + H.paragraph(
            "Dummy Forcing reports that about 25% of Self-Forcing's heads put more than 80% of their attention on "
            "the current frame, stable across prompts; that needs the real weights. Here 'current' is the whole "
            "current block (the query frames); local_share is the share of local heads (on the mean over items), "
            "and the per-item share shows how stable it is across prompts and seeds.")
         + H.csv_table(*tables["head_classes.csv"], "head_classes.csv")
         + "".join(H.figure(png, caption) for name, png, caption in figures if name.startswith("heads_"))
         + H.details(f"every head ({len(tables['heads.csv'][1])} rows)", H.csv_table(*tables["heads.csv"], "heads.csv"))),
        ("Files", H.paragraph("Statistics: " + (", ".join(str(r["stats_path"].relative_to(report.out)) for r in results
                                                          if r["stats_path"]) or "none")
                              + " (each with its .csv: per-frame and per-head quantities, pooled and per item)." + "".join(
                                  f" {r['setting'].name}: no per-frame statistics (its items hold other key frames: a "
                                  "compressing cache picks other tokens per item)." for r in results if not r["stats_path"]))
         + H.details(f"item files ({len(tables['files.csv'][1])})", H.csv_table(*tables["files.csv"], "files.csv"))),
    ])
    path = report.out / REPORT_HTML
    outputs = [(report.out / "figures" / name, lambda f, png=png: f.write(png)) for name, png, _ in figures]
    outputs += [(report.out / name, lambda f, c=columns, r=rows: f.write(csv_bytes(c, r)))
                for name, (columns, rows) in tables.items()]
    write_files_atomically([*outputs, (path, lambda f: f.write(page.encode("utf-8")))])  # together or not at all
    return path
