"""Statistics of Figure 4 quantities across the items (prompts x seeds) of a sweep: computed, written
and read here only (the statistics file's one owner).

For every captured (layer, block, pass) and head, over the n items (each batch sample of each cache
file is one item):
  curve           [K]   the logit averaged over the block's query tokens, per key token (Figure 4)
  frame_logit     [Fk]  the mean logit per key frame (over the block's query and the frame's key tokens)
  mass            [Fk]  the attention mass per key frame: softmax over all keys, summed over the
                        frame's keys, averaged over the block's query tokens (each row sums to 1)
  sink_ratio      []    mass of the first key frame / mean mass of the middle key frames
  sink_logit_gap  []    frame_logit of the first key frame - mean frame_logit of the middle frames
"Middle" key frames are those after the first and before the query block's own frames; with none
(the first blocks) the two sink scores are NaN. Each quantity gets the mean, the sample standard
deviation and a two-sided 95% confidence interval of the mean, mean +- t(0.975, n-1) * std / sqrt(n)
(Student's t; NaN in the .pt and empty in the CSV for n = 1, where there is no spread to measure).

The CSV also holds one row per item (prompt index, prompt, seed, file) beside the pooled rows, each with
the model and the settings the items share.
"""
import hashlib
import json
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.attention_cache import KEY_LABEL_DTYPES, KEY_LABEL_KEYS, EntryLabels, open_cache
from utils.cli import command
from utils.output import csv_bytes, one_line, write_files_atomically
from utils.passes import is_pass

STATS_FORMAT = "figure4-sweep-statistics"
STATS_VERSION = 1
QUANTITIES = ("curve", "frame_logit", "mass", "sink_ratio", "sink_logit_gap")
CSV_QUANTITIES = ("frame_logit", "mass", "sink_ratio", "sink_logit_gap")  # the token-level curve stays in the .pt
FIELDS = ("mean", "std", "ci_low", "ci_high")
CSV_COLUMNS = ("layer", "block", "pass", "timestep", "head", "quantity", "key_slot", "video_frame", "n", *FIELDS,
               "scope", "prompt_index", "prompt", "seed", "file", "model", "settings")


@dataclass(frozen=True)
class StatsGroup(EntryLabels):
    """One (layer, block, pass) of a statistics file: the labels of the cache entries it is over, and
    ``values``, which maps each of QUANTITIES to its FIELDS ({mean, std, ci_low, ci_high}). Where every
    item held the same key tokens, their labels as a cache entry has them ([1, K] each, the true-frame
    axis of the plot); else None."""

    values: dict
    key_video_frames: torch.Tensor | None = None
    key_rope_frames: torch.Tensor | None = None
    key_roles: torch.Tensor | None = None


class StatsFileError(ValueError):
    """A file is not a readable sweep-statistics file of the supported version."""


class MixedCachesError(ValueError):
    """Caches of different settings, which must not be averaged together (or no cache at all)."""


def student_t_quantile(p, df):
    """The p-quantile (0.5 < p < 1) of Student's t distribution with ``df`` degrees of freedom: the
    CDF is integrated from the density (Simpson's rule) and inverted by bisection."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def upper_half_mass(x, steps=2000):  # integral of the density over [0, x]
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return h / 3 * (density(0) + inner + density(x))

    low, high = 0.0, 1.0
    while 0.5 + upper_half_mass(high) < p:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if 0.5 + upper_half_mass(mid) < p else (low, mid)
    return (low + high) / 2


def describe(values):
    """values [n, ...] (float64) -> {mean, std, ci_low, ci_high}, each [...]: the sample standard
    deviation and a 95% confidence interval of the mean (NaN for n = 1)."""
    n = values.shape[0]
    mean = values.mean(dim=0)
    if n < 2:
        nan = torch.full_like(mean, math.nan)
        return {"mean": mean, "std": nan, "ci_low": nan, "ci_high": nan}
    std = values.std(dim=0, correction=1)
    half = student_t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def item_quantities(summary, key_frame_indices, query_frames):
    """Per batch sample and head, the quantities of one entry from its reductions
    (``AttentionCache.summary``): a dict of [B, N, ...] float64 tensors."""
    frame_logit = summary["frame_mean_logits"].double().mean(dim=2)  # [B, N, Fk]
    mass = summary["frame_attention_mass"].double().mean(dim=2)  # [B, N, Fk]
    first_query_slot = key_frame_indices.index(query_frames[0])
    middle = slice(1, first_query_slot)
    if first_query_slot > 1:
        sink_ratio = mass[..., 0] / mass[..., middle].mean(dim=-1)
        sink_logit_gap = frame_logit[..., 0] - frame_logit[..., middle].mean(dim=-1)
    else:
        sink_ratio = sink_logit_gap = torch.full(mass.shape[:2], math.nan, dtype=torch.float64)
    return {"curve": summary["query_mean_logits"].double(), "frame_logit": frame_logit, "mass": mass,
            "sink_ratio": sink_ratio, "sink_logit_gap": sink_logit_gap}


def compare_key(cache):
    """What caches must share to be averaged: the video and capture layout, the model, its weights, its
    precision (exact or fast mode) and its attention cache (config model_kwargs: attention mode, window,
    sink, compression)."""
    meta = cache.metadata
    labels = tuple((e.layer_idx, e.block, e.pass_, tuple(e.key_frame_indices)) for e in cache.entries)
    return {
        "num_frames": cache.num_frames,
        "frame_seq_length": cache.frame_seq_length,
        "num_frame_per_block": cache.num_frame_per_block,
        "entries (layer, block, pass, key frames)": labels,
        "num_heads": cache.num_heads,
        "model": meta.get("model"),
        "model family": (meta.get("family"), meta.get("variant"), meta.get("lora_path")),
        "checkpoint": (meta.get("checkpoint_path"), meta.get("checkpoint_key")),
        "dtype": meta.get("dtype"),
        "precision": meta.get("precision"),
        "model_kwargs": meta.get("config", {}).get("model_kwargs"),
    }


def check_same_setting(caches):
    """Raise MixedCachesError naming the two files and the field when caches differ in what averaging needs."""
    first = compare_key(caches[0])
    for cache in caches[1:]:
        other = compare_key(cache)
        for name, value in first.items():
            if other[name] != value:
                raise MixedCachesError(f"{caches[0].path} and {cache.path} differ in {name}; statistics need caches of "
                                 "one setting (same frames, layers, passes, model and checkpoint)")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


STORAGE_SETTINGS = ("save_mode",)  # how a file keeps an item's entries (fp16 logits or summaries), not the item


def item_key(cache):
    """What makes two caches one item: the same prompt and seed made with the same settings
    (``metadata.settings``, which the extraction writes: the config, checkpoint, capture and dtype; not how
    the file keeps it, STORAGE_SETTINGS); for a file without them (not written by the extraction), its
    bytes."""
    meta = cache.metadata
    if meta.get("seed") is None or not isinstance(meta.get("settings"), dict):
        return ("bytes", _sha256(cache.path))
    settings = {k: v for k, v in meta["settings"].items() if k not in STORAGE_SETTINGS}
    return ("item", repr((cache.prompt, meta.get("seed"), settings, meta.get("prompt_switches"))))


def distinct_items(caches):
    """(``caches`` with each item once, [(duplicate, the cache it repeats)]): see ``item_key``; e.g. a file
    copied between sweeps, or byte-identical copies of one file."""
    kept, duplicates, seen = [], [], {}
    for cache in caches:
        key = item_key(cache)
        if key in seen:
            duplicates.append((cache, seen[key]))
        else:
            seen[key] = cache
            kept.append(cache)
    return kept, duplicates


def shared_key_labels(caches, layer, label):
    """The key token labels ({name: int list [K]}) of one (layer, block, pass) where every sample of every
    cache holds the same ones (no compression that picks tokens per item), else None."""
    labels = {}
    for name in KEY_LABEL_KEYS:
        rows = torch.cat([getattr(c.entry(layer, label[1], label[0]), name) for c in caches])  # [n, K]
        if not bool((rows == rows[:1]).all()):
            return None
        labels[name] = rows[0].tolist()
    return labels


def is_statistics_file(path):
    """Whether ``path`` is a statistics file of ``save_statistics`` (its pickle names STATS_FORMAT), read
    without loading any tensor: False for a cache or anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            return STATS_FORMAT.encode() in archive.read(name)
    except (OSError, zipfile.BadZipFile, StopIteration):
        return False


def setting_of(cache):
    """The setting of a cache's items, as the statistics file keeps it ("setting"): the model (family,
    variant, checkpoint or random weights, attention-cache policy) and the run (config, video length,
    capture, precision, dtype, model_kwargs). The labels of comparisons (utils/figure4_sources.py) and the
    CSV's model and settings columns (``model_of``, ``settings_text``) are made from it."""
    meta = cache.metadata
    return {"family": meta.get("family"), "variant": meta.get("variant"), "cache_policy": meta.get("cache_policy"),
            "checkpoint_path": meta.get("checkpoint_path"), "random_init": bool(cache.random_init),
            "config_path": meta.get("config_path"), "num_frames": cache.num_frames,
            "capture_step": meta.get("capture_step"), "capture_blocks": meta.get("capture_blocks"),
            "precision": meta.get("precision"), "dtype": meta.get("dtype"),
            "model_kwargs": meta.get("config", {}).get("model_kwargs")}


def model_of(setting):
    """The model of a ``setting_of`` in words: family, variant, checkpoint (or random weights) and cache policy."""
    weights = ("random weights" if setting["random_init"] else
               f"checkpoint {setting['checkpoint_path']}" if setting["checkpoint_path"] else "base weights")
    parts = (setting["family"], setting["variant"], weights, setting["cache_policy"])
    return "; ".join(str(p) for p in parts if p)


def settings_text(setting):
    """The run of a ``setting_of`` in one line: config, frames, capture, precision, dtype, model_kwargs."""
    kwargs = setting["model_kwargs"]
    parts = {"config": setting["config_path"], "num_frames": setting["num_frames"],
             "capture_step": setting["capture_step"], "capture_blocks": setting["capture_blocks"],
             "precision": setting["precision"], "dtype": setting["dtype"],
             "model_kwargs": json.dumps(kwargs, sort_keys=True) if kwargs is not None else None}
    return "; ".join(f"{k}={v}" for k, v in parts.items() if v is not None)


def sweep_statistics(caches, prompt_indices=None):
    """The statistics over the items of ``caches`` (opened attention caches of one setting, each item
    once: see ``distinct_items``), with each item's own values of the CSV quantities. ``prompt_indices``:
    each cache's prompt index in its sweep (None where not known)."""
    check_same_setting(caches)
    prompt_indices = prompt_indices or [None] * len(caches)
    groups = []
    for entry in caches[0].entries:
        per_item = [item_quantities(cache.summary(entry.layer_idx, entry.pass_, entry.block), entry.key_frame_indices,
                                    entry.query_frames) for cache in caches]
        stacked = {q: torch.cat([item[q] for item in per_item], dim=0) for q in QUANTITIES}  # [n, N, ...]
        groups.append({
            "layer_idx": entry.layer_idx, "block": entry.block, "pass": entry.pass_, "timestep": entry.timestep,
            "query_frames": list(entry.query_frames), "key_frame_indices": list(entry.key_frame_indices),
            "key_labels": shared_key_labels(caches, entry.layer_idx, entry.label),
            **{q: {k: v.float() for k, v in describe(stacked[q]).items()} for q in QUANTITIES},
            "items": {q: stacked[q].float() for q in CSV_QUANTITIES},  # [n, N, ...] each item's own values
        })
    first, setting = caches[0], setting_of(caches[0])
    items = [{"prompt_index": index, "prompt": c.prompt, "seed": c.metadata.get("seed"), "file": str(c.path),
              "batch_index": b} for c, index in zip(caches, prompt_indices) for b in range(c.batch_size)]
    return {
        "format": STATS_FORMAT, "format_version": STATS_VERSION,
        "n_items": sum(c.batch_size for c in caches), "files": [str(c.path) for c in caches],
        "prompts": [c.prompt for c in caches], "seeds": [c.metadata.get("seed") for c in caches],
        "num_frames": first.num_frames, "frame_seq_length": first.frame_seq_length,
        "num_heads": first.num_heads, "groups": groups, "items": items, "setting": setting,
        "model": model_of(setting), "settings": settings_text(setting),
    }


def statistics_of_files(paths, prompt_indices):
    """``sweep_statistics`` of the caches at ``paths`` (``prompt_indices``: each one's prompt index or None),
    each item once, with a note on stderr for each statistics file skipped and each repeated item, and a
    warning for a single item (no confidence interval). MixedCachesError where no cache is left."""
    caches, indices = [], []
    for path, index in zip(paths, prompt_indices):
        if is_statistics_file(path):
            print(f"note: {path} is a statistics file (the aggregator's output), not a cache: skipped", file=sys.stderr)
        else:
            caches.append(open_cache(path))
            indices.append(index)
    if not caches:
        raise MixedCachesError(f"{paths[0]} is a statistics file, not a cache; draw it with "
                               f"{command('plot_figure4.py', paths[0])}")
    kept, duplicates = distinct_items(caches)
    for duplicate, original in duplicates:
        print(f"note: {duplicate.path} repeats the item of {original.path} (same prompt, seed and settings, or the "
              "same bytes); counted once", file=sys.stderr)
    stats = sweep_statistics(kept, [indices[caches.index(c)] for c in kept])
    if stats["n_items"] == 1:
        print(f"warning: one item ({kept[0].path}): no spread to measure, so no confidence interval (NaN in the .pt, "
              "empty in the CSV); aggregate several seeds or prompts", file=sys.stderr)
    return stats


def _number(value):
    """A CSV cell of a statistic: empty where there is none (NaN: n = 1, or no middle key frames)."""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def csv_rows(stats):
    """The CSV's rows (CSV_COLUMNS) of a statistics dict: per layer, block, pass, head, quantity and key frame
    the pooled row over the n items, then one row per item with its own value."""
    model, settings = stats.get("model", ""), stats.get("settings", "")
    items = stats.get("items", [])
    rows = []
    for g in stats["groups"]:
        for head in range(stats["num_heads"]):
            for q in CSV_QUANTITIES:
                values = {k: g[q][k][head] for k in FIELDS}
                slots = range(values["mean"].numel()) if values["mean"].dim() else [None]
                for slot in slots:
                    labels = (g["layer_idx"], g["block"], g["pass"], g["timestep"], head, q,
                              "" if slot is None else slot, "" if slot is None else g["key_frame_indices"][slot])
                    pooled = [values[k] if slot is None else values[k][slot] for k in FIELDS]
                    rows.append((*labels, stats["n_items"], *map(_number, pooled), "pooled", "", "", "", "", model,
                                 settings))
                    for i, item in enumerate(items):
                        value = g["items"][q][i, head] if slot is None else g["items"][q][i, head, slot]
                        rows.append((*labels, 1, _number(value), "", "", "", "item",
                                     "" if item["prompt_index"] is None else item["prompt_index"], item["prompt"],
                                     "" if item["seed"] is None else item["seed"], item["file"], model, settings))
    return rows


def save_statistics(stats, path):
    """The statistics as ``path`` (.pt) and a CSV beside it (same name, .csv; ``csv_rows``): one row per
    layer, block, pass, head, quantity and key frame, pooled and per item (the token-level curve stays in
    the .pt). The two files are replaced together or not at all (a full disk or a signal leaves both old
    files)."""
    path = Path(path)
    table = csv_bytes(CSV_COLUMNS, csv_rows(stats))
    write_files_atomically([(path, lambda f: torch.save(stats, f)), (path.with_suffix(".csv"), lambda f: f.write(table))])
    return path.with_suffix(".csv")


def stats_groups(stats):
    """The groups of a statistics dict (``load_statistics``) as ``StatsGroup``s, in file order (files
    written before the key labels were kept have none)."""
    groups = []
    for g in stats["groups"]:
        held = g.get("key_labels") or {}
        labels = {name: torch.tensor([held[name]], dtype=KEY_LABEL_DTYPES[name]) for name in held}
        groups.append(StatsGroup(layer_idx=g["layer_idx"], block=g["block"], pass_=g["pass"], timestep=g["timestep"],
                                 query_frames=g["query_frames"], key_frame_indices=g["key_frame_indices"],
                                 values={q: g[q] for q in QUANTITIES}, **labels))
    return groups


def load_statistics(path):
    """Read and check a statistics file written by ``save_statistics``; StatsFileError otherwise."""
    path = Path(path)
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StatsFileError(f"{path}: file not found") from None
    except Exception as err:
        raise StatsFileError(f"{path}: not a readable statistics file ({one_line(err)})") from err
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT:
        raise StatsFileError(f"{path}: not a sweep-statistics file (expected format {STATS_FORMAT!r})")
    if stats.get("format_version") != STATS_VERSION:
        raise StatsFileError(f"{path}: format_version {stats.get('format_version')!r}; this reader reads {STATS_VERSION}")
    _check_statistics(stats, lambda problem: _refuse(path, problem))
    return stats


def _refuse(path, problem):
    raise StatsFileError(f"{path}: {problem}")


def _shown(value):
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _field(mapping, key, name, ok, expected, fail):
    """``mapping[key]``, which must pass ``ok``; else ``fail`` names it (missing, or its value)."""
    if key not in mapping:
        fail(f"{name} is missing, expected {expected}")
    if not ok(mapping[key]):
        fail(f"{name} is {_shown(mapping[key])}, expected {expected}")
    return mapping[key]


def _int_at_least(minimum):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _frame_list(value):
    return isinstance(value, list) and value and all(_int_at_least(0)(f) for f in value)


def _check_statistics(stats, fail):
    """Every field the readers use: the sizes, and per group its labels and each quantity's statistics
    as float tensors of the group's shape ([N, K] curve, [N, Fk] frame quantities, [N] sink scores)."""
    for key in ("n_items", "num_heads", "frame_seq_length"):
        _field(stats, key, key, _int_at_least(1), "an int >= 1", fail)
    groups = _field(stats, "groups", "groups", lambda v: isinstance(v, list) and v, "a non-empty list", fail)
    heads, fsl = stats["num_heads"], stats["frame_seq_length"]
    for i, g in enumerate(groups):
        name = f"groups[{i}]"
        if not isinstance(g, dict):
            fail(f"{name} is {_shown(g)}, expected a dict")
        _field(g, "layer_idx", f"{name}.layer_idx", _int_at_least(0), "an int >= 0", fail)
        _field(g, "block", f"{name}.block", _int_at_least(0), "an int >= 0", fail)
        _field(g, "pass", f"{name}.pass", is_pass, "an int >= 0 or 'cache'", fail)
        _field(g, "timestep", f"{name}.timestep", lambda v: isinstance(v, float), "a float", fail)
        _field(g, "query_frames", f"{name}.query_frames", _frame_list, "a non-empty list of frames", fail)
        fk = len(_field(g, "key_frame_indices", f"{name}.key_frame_indices", _frame_list, "a non-empty list of frames",
                        fail))
        held = g.get("key_labels")
        if held is not None and not (isinstance(held, dict) and set(held) == set(KEY_LABEL_KEYS) and all(
                isinstance(v, list) and len(v) == fk * fsl and all(_int_at_least(0)(x) for x in v) for v in held.values())):
            fail(f"{name}.key_labels is {_shown(held)}, expected None or {{{', '.join(KEY_LABEL_KEYS)}}}: "
                 f"lists of {fk * fsl} ints >= 0")
        shapes = {"curve": [heads, fk * fsl], "frame_logit": [heads, fk], "mass": [heads, fk], "sink_ratio": [heads],
                  "sink_logit_gap": [heads]}
        for q, shape in shapes.items():
            values = _field(g, q, f"{name}.{q}", lambda v: isinstance(v, dict), f"a dict of {FIELDS}", fail)
            for k in FIELDS:
                tensor = _field(values, k, f"{name}.{q}.{k}", lambda v: isinstance(v, torch.Tensor) and v.is_floating_point(),
                                "a float tensor", fail)
                if list(tensor.shape) != shape:
                    fail(f"{name}.{q}.{k} has shape {list(tensor.shape)}, expected {shape}")
