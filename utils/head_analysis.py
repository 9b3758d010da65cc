"""Per-head analysis of Figure 4 caches: where each head's softmax mass goes, and which heads are sink,
local or spread heads.

For every captured (layer, block, pass) and head, from the exact frame masses of each item
(``frame_attention_mass`` of the cache's summary: softmax over all keys, summed over a key slot's
tokens, averaged over the block's query tokens; each row sums to 1), the mass on three regions of the
key slots, told apart by the entry's key labels (``key_video_frames``, ``key_roles``):
  sink     slots the cache policy labelled as its sink or EMA sink (``key_roles``); for a policy without a sink
           (global attention), slots of the first ``sink_frames`` video frames that are not in the
           query block (so the first block has no sink)
  current  slots of the queries' own frames (the current block; for a call of Rolling Forcing's loop the
           whole window, over whose queries the summary's masses are averaged)
  rest     every other slot (sink + current + rest = 1)
averaged over the items (each batch sample of each cache) with a 95% confidence interval
(utils.sweep_stats.describe). A head is classified from its mean masses (``HeadThresholds``): a sink
head if its sink mass >= the sink threshold, else a local head if its current-block mass >= the local
threshold, else a spread head.

Also per layer, the scores of the report's sink table: per item the mean over heads of the sink and
current-block masses and of utils.sweep_stats's two sink scores, with their confidence intervals.
"""
import math

import torch

from utils.attention_cache import EMA_SINK, SINK
from utils.head_classes import HEAD_CLASSES
from utils.sweep_stats import describe, item_quantities

REGIONS = ("sink", "current", "rest")
LAYER_SCORES = ("sink_mass", "current_mass", "sink_logit_gap", "sink_ratio")


def slot_regions(entry, batch_index, frame_seq_length, sink_frames):
    """Per key slot of ``entry`` (a CacheEntry) for one batch sample: its region, an index into REGIONS,
    int64 [Fk], from the key labels of the slot's tokens."""
    video = entry.key_video_frames[batch_index].view(entry.num_key_frames, frame_seq_length)  # [Fk, fsl]
    roles = entry.key_roles[batch_index].view(entry.num_key_frames, frame_seq_length)
    current = torch.isin(video, torch.tensor(entry.query_frames, dtype=video.dtype)).all(dim=1)
    policy_sink = (roles == SINK) | (roles == EMA_SINK)
    if bool(policy_sink.any()):
        sink = policy_sink.all(dim=1)
    else:
        sink = (video < sink_frames).all(dim=1) & ~current
    regions = torch.full((entry.num_key_frames,), REGIONS.index("rest"))
    regions[sink] = REGIONS.index("sink")
    regions[current] = REGIONS.index("current")
    return regions


def region_masses(cache, entry, sink_frames):
    """[B, N, 3] float64: per batch sample and head of one entry, the mass on each of REGIONS."""
    mass = cache.summary(entry.layer_idx, entry.pass_, entry.block)["frame_attention_mass"].double().mean(dim=2)
    out = torch.zeros(*mass.shape[:2], len(REGIONS), dtype=torch.float64)  # mass: [B, N, Fk]
    for b in range(mass.shape[0]):
        regions = slot_regions(entry, b, cache.frame_seq_length, sink_frames)
        for r in range(len(REGIONS)):
            out[b, :, r] = mass[b][:, regions == r].sum(dim=-1)
    return out


def head_statistics(caches, thresholds):
    """For each (layer, block, pass) of the caches (of one setting, each item once, as
    utils.sweep_stats.sweep_statistics takes them), in the first cache's entry order: a dict of its
    labels, ``n``, ``heads`` ({region: {mean, std, ci_low, ci_high} [N]}), ``classes`` (per head),
    ``local_per_item`` ([n, N]: 1 where the item's current-block mass reaches the local threshold) and ``layer``
    ({LAYER_SCORES name: the same fields, scalars}: per item, the mean over heads)."""
    groups = []
    for entry in caches[0].entries:
        masses, scores = [], {name: [] for name in LAYER_SCORES}
        for cache in caches:
            own = cache.entry(entry.layer_idx, entry.pass_, entry.block)
            item = region_masses(cache, own, thresholds.sink_frames)  # [B, N, 3]
            masses.append(item)
            sink = item_quantities(cache.summary(own.layer_idx, own.pass_, own.block), own.key_frame_indices,
                                   own.query_frames)
            scores["sink_mass"].append(item[..., 0].mean(dim=1))
            scores["current_mass"].append(item[..., 1].mean(dim=1))
            scores["sink_logit_gap"].append(sink["sink_logit_gap"].mean(dim=1))
            scores["sink_ratio"].append(sink["sink_ratio"].mean(dim=1))
        masses = torch.cat(masses)  # [n, N, 3]
        heads = {region: describe(masses[..., r]) for r, region in enumerate(REGIONS)}
        groups.append({
            "layer_idx": entry.layer_idx, "block": entry.block, "pass": entry.pass_, "n": masses.shape[0],
            "heads": heads, "classes": thresholds.classify(heads["sink"]["mean"], heads["current"]["mean"]),
            "local_per_item": (masses[..., 1] >= thresholds.local).double(),  # [n, N]
            "layer": {name: describe(torch.cat(values)) for name, values in scores.items()},
        })
    return groups


def number(value):
    """How the report's CSVs and tables write a number: 6 significant digits; empty where there is none
    (NaN: an interval of n = 1, a ratio without middle frames), as in the statistics CSV."""
    value = float(value)
    return "" if math.isnan(value) else f"{value:.6g}"


HEAD_COLUMNS = ("setting", "model", "layer", "block", "pass", "head", "n",
                *(f"{region}_{field}" for region in REGIONS for field in ("mean", "ci_low", "ci_high")), "class")
LAYER_COLUMNS = ("setting", "model", "layer", "block", "pass", "n",
                 *(f"{name}_{field}" for name in LAYER_SCORES for field in ("mean", "ci_low", "ci_high")))
CLASS_COLUMNS = ("setting", "model", "block", "pass", "layers", "heads", *(f"{c}_heads" for c in HEAD_CLASSES),
                 "local_share", "current_over_local_threshold_share_per_item_mean",
                 "current_over_local_threshold_share_per_item_ci_low",
                 "current_over_local_threshold_share_per_item_ci_high", "n")


def _fields(stats, index=None):
    pick = (lambda t: t) if index is None else (lambda t: t[index])
    return [number(pick(stats[field])) for field in ("mean", "ci_low", "ci_high")]


def head_rows(setting, model, groups):
    """One row per (layer, block, pass, head) of HEAD_COLUMNS, strings."""
    rows = []
    for g in groups:
        for head, kind in enumerate(g["classes"]):
            values = [v for region in REGIONS for v in _fields(g["heads"][region], head)]
            rows.append([setting, model, str(g["layer_idx"]), str(g["block"]), str(g["pass"]), str(head), str(g["n"]),
                         *values, kind])
    return rows


def layer_rows(setting, model, groups):
    """One row per (layer, block, pass) of LAYER_COLUMNS, strings."""
    return [[setting, model, str(g["layer_idx"]), str(g["block"]), str(g["pass"]), str(g["n"]),
             *(v for name in LAYER_SCORES for v in _fields(g["layer"][name]))] for g in groups]


def class_rows(setting, model, groups):
    """One row per (block, pass) of CLASS_COLUMNS: how many heads of each class over the captured layers,
    the share of local heads among them, and per item the share of heads whose current-block mass is at
    least the local threshold (mean and 95% CI over items: how stable it is across prompts and seeds)."""
    rows = []
    for label in dict.fromkeys((g["block"], g["pass"]) for g in groups):
        same = [g for g in groups if (g["block"], g["pass"]) == label]
        classes = [c for g in same for c in g["classes"]]
        per_item = torch.cat([g["local_per_item"] for g in same], dim=1).mean(dim=1)  # [n, heads of all layers] -> [n]
        rows.append([setting, model, str(label[0]), str(label[1]), " ".join(str(g["layer_idx"]) for g in same),
                     str(len(classes)), *(str(classes.count(c)) for c in HEAD_CLASSES),
                     number(classes.count("local") / len(classes)), *_fields(describe(per_item)), str(same[0]["n"])])
    return rows
