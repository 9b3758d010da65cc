"""The Figure 4 attention cache file, format version 5: built, written, read and checked here only.
Version 4 added each entry's ``sink_updates`` (and the key role ``ema_sink``); version 5 each entry's
``window`` and ``query_levels`` (Rolling Forcing's rolling loop). Versions 3 and 4 are read too, their
entries with no blended sink (``sink_updates`` 0) and block-wise (``window`` None).

A cache is a ``torch.save`` dict. Its entries hold, per captured layer and captured pass, either the
full pre-softmax logit matrix of one temporal block's queries against every key (save_mode 'full', fp16
[B, N, Q, K]) or its reductions (save_mode 'summary', fp32). ``build_cache`` makes the dict from the
capture's entries (``CacheEntry``, the one form of a captured entry from the run to the reader),
``save_cache`` writes it atomically, ``open_cache`` checks every field of a file and
``AttentionCache.summary`` gives the same three reductions for both modes, through the one code path in
``utils.attention_stats``. ``build_cache`` and ``open_cache`` run the same checks.

Full caches are memory-mapped: a real layer is 3.7 GB, so opening a file reads no tensor data and a
summary reads its entry one (head, query frame) tile at a time.
"""
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.attention_stats import stored_tiles, summarize_logits
from utils.output import one_line, write_atomically
from utils.passes import is_pass, pass_name

CACHE_FORMAT = "figure4-attention-cache"
CACHE_FORMAT_VERSION = 5
READABLE_VERSIONS = (3, 4, 5)
CAPTURE_METHOD = "native_inference_capture"
SAVE_MODES = ("full", "summary")
SUMMARY_KEYS = ("query_mean_logits", "frame_mean_logits", "frame_attention_mass")
TOP_LEVEL_KEYS = (
    "attention_weights", "prompt", "num_frames", "frame_seq_length", "num_frame_per_block",
    "layer_indices", "is_logits", "capture_method", "query_frames", "key_frames", "metadata",
)
ENTRY_KEYS = (  # the spec's per-entry fields, then the entry's labels
    "layer_idx", "is_logits", "num_frames", "frame_seq_length", "num_heads", "num_query_frames", "num_key_frames",
    "block", "pass", "timestep", "query_frames", "key_frame_indices", "nonfinite", "logit_min", "logit_max",
)
SINK_UPDATES_KEY = "sink_updates"  # per entry, since version 4: evicted blocks blended into an EMA sink so far
WINDOW_KEYS = ("window", "query_levels")  # per entry, since version 5: a rolling call's window and query levels
KEY_LABEL_KEYS = ("key_video_frames", "key_rope_frames", "key_roles")  # per key token, [B, K] each
KEY_LABEL_DTYPES = {"key_video_frames": torch.int32, "key_rope_frames": torch.int32, "key_roles": torch.int8}
# key_roles codes: what the cache policy kept each key token as. A plain cached key (a frame of the
# window, or of the whole video), a sink key, a token a compression selected (top-C), or a key of an
# EMA sink slot (Reward Forcing's: the slot's first frames blended with the evicted ones; the entry's
# sink_updates counts the blends).
KEY_ROLES = ("cached", "sink", "top_c", "ema_sink")
CACHED, SINK, TOP_C, EMA_SINK = range(len(KEY_ROLES))
TENSOR_KEYS = {"full": ("attn_logits",), "summary": SUMMARY_KEYS}
RESERVED_METADATA = ("format", "format_version", "save_mode")
METADATA_TYPES = {  # the open metadata fields that readers (the plot, the statistics) read: their types
    "model": dict, "family": str, "variant": str, "cache_policy": str, "dtype": str, "seed": int,
}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format starts with a zip local-file header


class CacheFileError(ValueError):
    """A file is missing, unreadable, or not a Figure 4 attention cache of the supported version."""


@dataclass(frozen=True)
class EntryLabels:
    """Where a captured entry comes from: the transformer block ``layer_idx``, the temporal ``block`` of
    its queries and their video frames ``query_frames``, the pass (``pass_``: a denoising pass 0.. or
    ``"cache"``, utils/passes.py) and its ``timestep``, and ``key_frame_indices[j]``, the video frame of
    the first token of key frame slot j (a compressed cache may fill a slot from several frames). Shared
    by the cache's entries and the statistics' groups (utils/sweep_stats.py).

    A call of the rolling loop (Rolling Forcing) holds a window of several blocks: ``window`` is its
    index (None for a block-wise call), ``query_frames`` the window's frames, which include the frames
    of ``block``, and ``query_levels[i]`` the level (pass) query frame i was at; (block, pass_) then
    names the call where ``block`` is at level ``pass_`` (its ``timestep``). For a block-wise call
    the queries are the block's frames, all at ``pass_`` (``query_levels`` None: that)."""

    layer_idx: int
    block: int
    pass_: object
    timestep: float
    query_frames: list
    key_frame_indices: list
    window: int | None = field(default=None, kw_only=True)
    query_levels: list | None = field(default=None, kw_only=True)

    @property
    def levels(self):
        """The level (pass) of each query frame."""
        return self.query_levels if self.query_levels is not None else [self.pass_] * len(self.query_frames)

    @property
    def label(self):
        """(block, pass) of the entry."""
        return self.block, self.pass_

    @property
    def num_query_frames(self):
        return len(self.query_frames)

    @property
    def num_key_frames(self):
        return len(self.key_frame_indices)


@dataclass(frozen=True)
class CacheEntry(EntryLabels):
    """One captured (layer, block, pass): its labels and its tensors (memory-mapped when read from a
    file). Per key token, [B, K] each: ``key_video_frames``, the video frame it came from;
    ``key_rope_frames``, the temporal RoPE position it was attended at (they differ for Deep Sink's
    shifted sink); ``key_roles``, what the cache policy kept it as (``KEY_ROLES``). ``nonfinite``
    counts NaN/Inf logits; ``tensors`` maps 'attn_logits' (full) or SUMMARY_KEYS (summary) to tensors.
    ``sink_updates``: for an EMA sink (key role ``ema_sink``), how many evicted blocks were blended
    into it before this call; 0 otherwise."""

    num_heads: int
    nonfinite: int
    logit_min: float
    logit_max: float
    tensors: dict
    key_video_frames: torch.Tensor
    key_rope_frames: torch.Tensor
    key_roles: torch.Tensor
    sink_updates: int = 0

    @property
    def batch_size(self):
        return self.key_video_frames.shape[0]


# ---------------------------------------------------------------------------------------------
# checks shared by build_cache and open_cache; ``fail(problem)`` raises the caller's error


def _shown(value):
    """A value and its type for an error message, cut to a readable length."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value):
    return isinstance(value, list) and all(_is_int(i) for i in value)


def _field(mapping, key, where, fail):
    if key not in mapping:
        fail(f"{where} lacks '{key}'")
    return mapping[key]


def _check_int(value, name, fail, minimum=0):
    if not _is_int(value) or value < minimum:
        fail(f"{name} is {_shown(value)}, expected an int >= {minimum}")


def _check_float(value, name, fail):
    if not isinstance(value, float):
        fail(f"{name} is {_shown(value)}, expected a float")


def _check_frames(value, name, fail, num_frames):
    """A non-empty, non-decreasing list of video frame indices in [0, num_frames) (a compressed cache
    may hold tokens of one frame in several slots)."""
    if (not _is_int_list(value) or not value
            or any(b < a for a, b in zip(value, value[1:])) or value[0] < 0 or value[-1] >= num_frames):
        fail(f"{name} is {_shown(value)}, expected a non-empty non-decreasing list of ints in [0, {num_frames})")


def _check_metadata(metadata, fail):
    """The format fields, and the types of the open fields this module or the plot reads."""
    if not isinstance(metadata, dict):
        fail(f"metadata is {_shown(metadata)}, expected a dict")
    if not isinstance(metadata.get("format"), str) or metadata["format"] != CACHE_FORMAT:
        fail(f"not a Figure 4 attention cache: metadata.format is {_shown(metadata.get('format'))}, "
             f"expected {CACHE_FORMAT!r}")
    version = _field(metadata, "format_version", "metadata", fail)
    if not _is_int(version) or version not in READABLE_VERSIONS:
        fail(f"metadata.format_version is {_shown(version)}; this reader reads versions "
             f"{', '.join(map(str, READABLE_VERSIONS))} (re-run experiments/run_extraction_figure4.py to write the file again)")
    save_mode = _field(metadata, "save_mode", "metadata", fail)
    if not isinstance(save_mode, str) or save_mode not in SAVE_MODES:
        fail(f"metadata.save_mode is {_shown(save_mode)}, expected one of {SAVE_MODES}")
    bad_keys = [k for k in metadata if not isinstance(k, str)]
    if bad_keys:
        fail(f"metadata has non-string keys {bad_keys}")
    _check_plain(metadata, "metadata", fail)
    for key, kind in METADATA_TYPES.items():
        if key in metadata and not (isinstance(metadata[key], kind) and not isinstance(metadata[key], bool)):
            fail(f"metadata.{key} is {_shown(metadata[key])}, expected a {kind.__name__}")
    config = metadata.get("config", {})
    if not isinstance(config, dict):
        fail(f"metadata.config is {_shown(config)}, expected a dict")
    if not isinstance(config.get("random_init", False), bool):
        fail(f"metadata.config.random_init is {_shown(config['random_init'])}, expected a bool")


def _check_entry(entry, where, top, save_mode, fail):
    """One entry of attention_weights against the top level; returns its CacheEntry."""
    if not isinstance(entry, dict):
        fail(f"{where} is {_shown(entry)}, expected a dict")
    tensor_keys = TENSOR_KEYS[save_mode] + KEY_LABEL_KEYS
    version = top["metadata"]["format_version"]
    label_keys = ENTRY_KEYS + ((SINK_UPDATES_KEY,) if version >= 4 else ()) + (WINDOW_KEYS if version >= 5 else ())
    for key in label_keys + tensor_keys:
        _field(entry, key, where, fail)
    unexpected = sorted(map(str, set(entry) - set(label_keys) - set(tensor_keys)))
    if unexpected:
        fail(f"{where} has unexpected keys {unexpected} (save_mode {save_mode!r})")
    if entry["is_logits"] is not True:
        fail(f"{where}.is_logits is {_shown(entry['is_logits'])}, expected True (pre-softmax logits)")
    for key in ("num_frames", "frame_seq_length"):
        if not _is_int(entry[key]) or entry[key] != top[key]:
            fail(f"{where}.{key} is {_shown(entry[key])}, expected {top[key]} (from the top level)")
    _check_int(entry["layer_idx"], f"{where}.layer_idx", fail)
    if entry["layer_idx"] not in top["layer_indices"]:
        fail(f"{where}.layer_idx is {entry['layer_idx']}, which is not in layer_indices {top['layer_indices']}")
    num_blocks = top["num_frames"] // top["num_frame_per_block"]
    _check_int(entry["block"], f"{where}.block", fail)
    if entry["block"] >= num_blocks:
        fail(f"{where}.block is {entry['block']}, expected < {num_blocks} (num_frames / num_frame_per_block)")
    if not is_pass(entry["pass"]):
        fail(f"{where}.pass is {_shown(entry['pass'])}, expected an int >= 0 or 'cache'")
    for key in ("timestep", "logit_min", "logit_max"):
        _check_float(entry[key], f"{where}.{key}", fail)
    _check_int(entry["num_heads"], f"{where}.num_heads", fail, minimum=1)
    _check_int(entry["nonfinite"], f"{where}.nonfinite", fail)
    sink_updates = entry.get(SINK_UPDATES_KEY, 0)
    _check_int(sink_updates, f"{where}.{SINK_UPDATES_KEY}", fail)
    per_block = top["num_frame_per_block"]
    _check_query_labels(entry, where, per_block, top["num_frames"], fail)
    _check_frames(entry["key_frame_indices"], f"{where}.key_frame_indices", fail, top["num_frames"])
    if not set(entry["query_frames"]) <= set(entry["key_frame_indices"]):
        fail(f"{where}.key_frame_indices {entry['key_frame_indices']} do not include its query frames "
             f"{entry['query_frames']} (a block attends to itself)")
    fq, fk = len(entry["query_frames"]), len(entry["key_frame_indices"])
    for key, value in (("num_query_frames", fq), ("num_key_frames", fk)):
        if not _is_int(entry[key]) or entry[key] != value:
            fail(f"{where}.{key} is {_shown(entry[key])}, expected {value} (the length of its frame list)")
    n, fsl = entry["num_heads"], top["frame_seq_length"]
    if save_mode == "full":
        shapes = {"attn_logits": (n, fq * fsl, fk * fsl)}
        dtype = torch.float16
    else:
        shapes = {"query_mean_logits": (n, fk * fsl), "frame_mean_logits": (n, fq, fk),
                  "frame_attention_mass": (n, fq, fk)}
        dtype = torch.float32
    dtypes = dict.fromkeys(shapes, dtype)
    for key in KEY_LABEL_KEYS:
        shapes[key], dtypes[key] = (fk * fsl,), KEY_LABEL_DTYPES[key]
    batch_sizes = set()
    for key, shape in shapes.items():
        tensor = entry[key]
        if (not isinstance(tensor, torch.Tensor) or tensor.dtype != dtypes[key] or tensor.dim() != len(shape) + 1
                or tuple(tensor.shape[1:]) != shape or tensor.shape[0] < 1):
            found = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else _shown(tensor)
            fail(f"{where}.{key} is {found}, expected a {dtypes[key]} tensor of shape [B, {', '.join(map(str, shape))}]")
        batch_sizes.add(tensor.shape[0])
    if len(batch_sizes) != 1:
        fail(f"{where}: its tensors disagree on the batch size {sorted(batch_sizes)}")
    video, rope = entry["key_video_frames"], entry["key_rope_frames"]
    if video[0, ::fsl].tolist() != entry["key_frame_indices"]:
        fail(f"{where}.key_video_frames does not start each key frame slot with its key_frame_indices")
    if int(video.min()) < 0 or int(video.max()) >= top["num_frames"] or int(rope.min()) < 0:
        fail(f"{where}.key_video_frames / key_rope_frames hold frames outside [0, {top['num_frames']}) / below 0")
    roles = entry["key_roles"]
    if int(roles.min()) < 0 or int(roles.max()) >= len(KEY_ROLES):
        fail(f"{where}.key_roles holds codes outside 0..{len(KEY_ROLES) - 1} ({', '.join(KEY_ROLES)})")
    return CacheEntry(
        layer_idx=entry["layer_idx"], block=entry["block"], pass_=entry["pass"], timestep=entry["timestep"],
        query_frames=entry["query_frames"], key_frame_indices=entry["key_frame_indices"], num_heads=n,
        nonfinite=entry["nonfinite"], logit_min=entry["logit_min"], logit_max=entry["logit_max"],
        tensors={key: entry[key] for key in shapes if key not in KEY_LABEL_KEYS},
        key_video_frames=video, key_rope_frames=rope, key_roles=roles, sink_updates=sink_updates,
        window=entry.get("window"), query_levels=entry.get("query_levels"),
    )


def _check_query_labels(entry, where, per_block, num_frames, fail):
    """The query frames and levels against the block, pass and window: a block-wise entry's queries
    are its block's frames at its pass (no levels stored); a window's are whole blocks that include the block's, each
    frame at a level, the block's at the entry's pass."""
    block, pass_, frames = entry["block"], entry["pass"], entry["query_frames"]
    window, levels = entry.get("window"), entry.get("query_levels")
    block_frames = list(range(block * per_block, (block + 1) * per_block))
    if window is None:
        if not _is_int_list(frames) or frames != block_frames:
            fail(f"{where}.query_frames is {_shown(frames)}, expected {block_frames} (the frames of block {block})")
        if levels is not None:
            fail(f"{where}.query_levels is {_shown(levels)}, expected None (a block-wise call: every query at its pass)")
        return
    _check_int(window, f"{where}.window", fail)
    if (not _is_int_list(frames) or not frames or frames != list(range(frames[0], frames[0] + len(frames)))
            or frames[0] % per_block or len(frames) % per_block or frames[-1] >= num_frames
            or not set(block_frames) <= set(frames)):
        fail(f"{where}.query_frames is {_shown(frames)}, expected the consecutive frames of whole blocks of "
             f"{per_block}, below {num_frames}, that include block {block}'s {block_frames} (window {window})")
    if not isinstance(levels, list) or len(levels) != len(frames) or not all(is_pass(level) for level in levels):
        fail(f"{where}.query_levels is {_shown(levels)}, expected a pass label (an int >= 0 or 'cache') per query frame "
             f"({len(frames)})")
    own = levels[frames.index(block_frames[0]) : frames.index(block_frames[0]) + per_block]
    if own != [pass_] * per_block:
        fail(f"{where}.query_levels gives block {block} the levels {own}, expected its pass {pass_!r}")


def _check_labels(entries, layer_indices, fail):
    """Every layer holds the same (block, pass) labels, once each, and the entries of one label agree
    on their frames and timestep; all entries agree on heads and batch size. Returns the labels in
    the order they first appear."""
    by_layer = {layer: [] for layer in layer_indices}
    for e in entries:
        if e.label in by_layer[e.layer_idx]:
            fail(f"layer {e.layer_idx} has two entries for block {e.block}, pass {e.pass_!r}")
        by_layer[e.layer_idx].append(e.label)
    labels = list(dict.fromkeys(e.label for e in entries))
    for layer, held in by_layer.items():
        if set(held) != set(labels):
            fail(f"layer {layer} holds (block, pass) {held}, but the file holds {labels}: every layer must hold "
                 "the same captured passes")
    for label in labels:
        same = [e for e in entries if e.label == label]
        for e in same[1:]:
            for attr in ("query_frames", "num_key_frames", "timestep", "sink_updates"):
                if getattr(e, attr) != getattr(same[0], attr):
                    fail(f"block {label[0]}, pass {label[1]!r}: layers {same[0].layer_idx} and {e.layer_idx} differ "
                         f"in {attr} ({getattr(same[0], attr)} vs {getattr(e, attr)})")
    for attr in ("num_heads", "batch_size"):
        values = sorted({getattr(e, attr) for e in entries})
        if len(values) != 1:
            fail(f"entries disagree on {attr}: {values}")
    return labels


def _check_cache(data, fail):
    """Check a whole cache dict; returns (its CacheEntry list, its labels)."""
    if not isinstance(data, dict):
        fail(f"not a Figure 4 attention cache: the file holds {type(data).__name__}, expected a dict")
    _check_metadata(_field(data, "metadata", "not a Figure 4 attention cache: the top level", fail), fail)
    for key in TOP_LEVEL_KEYS:
        _field(data, key, "the top level", fail)
    unexpected = sorted(map(str, set(data) - set(TOP_LEVEL_KEYS)))
    if unexpected:
        fail(f"the top level has unexpected keys {unexpected}")
    if not isinstance(data["prompt"], str):
        fail(f"prompt is {_shown(data['prompt'])}, expected a str")
    if data["is_logits"] is not True:
        fail(f"is_logits is {_shown(data['is_logits'])}, expected True (pre-softmax logits)")
    if not isinstance(data["capture_method"], str) or data["capture_method"] != CAPTURE_METHOD:
        fail(f"capture_method is {_shown(data['capture_method'])}, expected {CAPTURE_METHOD!r}")
    for key in ("num_frames", "frame_seq_length", "num_frame_per_block"):
        _check_int(data[key], key, fail, minimum=1)
    if data["num_frames"] % data["num_frame_per_block"]:
        fail(f"num_frames {data['num_frames']} is not a multiple of num_frame_per_block {data['num_frame_per_block']}")
    layers = data["layer_indices"]
    if not _is_int_list(layers) or not layers or min(layers) < 0 or len(set(layers)) != len(layers):
        fail(f"layer_indices is {_shown(layers)}, expected a non-empty list of distinct ints >= 0")
    weights = data["attention_weights"]
    if not isinstance(weights, list) or not weights:
        fail(f"attention_weights is {_shown(weights)}, expected a non-empty list of entries")
    save_mode = data["metadata"]["save_mode"]
    entries = [_check_entry(e, f"attention_weights[{i}]", data, save_mode, fail) for i, e in enumerate(weights)]
    labels = _check_labels(entries, layers, fail)
    last = max(entries, key=lambda e: e.block)
    if not _is_int_list(data["query_frames"]) or data["query_frames"] != last.query_frames:
        fail(f"query_frames is {_shown(data['query_frames'])}, expected {last.query_frames} (the last captured block)")
    key_slots = list(range(last.num_key_frames))
    if not _is_int_list(data["key_frames"]) or data["key_frames"] != key_slots:
        fail(f"key_frames is {_shown(data['key_frames'])}, expected 0..{last.num_key_frames - 1} (the key frames of "
             "the last captured block)")
    return entries, labels


def _check_plain(value, name, fail):
    """Only what ``torch.load(weights_only=True)`` reads back: None, bool, int, float, str and lists,
    tuples and dicts of them."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{name} key", fail)
            _check_plain(item, f"{name}[{key!r}]", fail)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{name}[{i}]", fail)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        fail(f"{name} is {_shown(value)}; metadata may hold only None, bool, int, float, str, lists and dicts")


# ---------------------------------------------------------------------------------------------
# writing


def _programming_error(problem):
    raise ValueError(f"build_cache: {problem}")


def _as_float(value):
    """ints and floats as float; anything else unchanged, for the check to name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _stored(entry, num_frames, frame_seq_length):
    """The dict a ``CacheEntry`` is stored as (the spec's per-entry fields, then the labels and tensors)."""
    query_frames, key_frames = _as_list(entry.query_frames), _as_list(entry.key_frame_indices)
    return {
        "layer_idx": entry.layer_idx, "is_logits": True, "num_frames": num_frames, "frame_seq_length": frame_seq_length,
        "num_heads": entry.num_heads, "num_query_frames": _length(query_frames), "num_key_frames": _length(key_frames),
        "block": entry.block, "pass": entry.pass_, "timestep": _as_float(entry.timestep), "query_frames": query_frames,
        "key_frame_indices": key_frames, "nonfinite": entry.nonfinite, "logit_min": _as_float(entry.logit_min),
        "logit_max": _as_float(entry.logit_max), **entry.tensors, "key_video_frames": entry.key_video_frames,
        "key_rope_frames": entry.key_rope_frames, "key_roles": entry.key_roles, SINK_UPDATES_KEY: entry.sink_updates,
        "window": entry.window, "query_levels": None if entry.query_levels is None else _as_list(entry.query_levels),
    }


def build_cache(*, prompt, num_frames, frame_seq_length, num_frame_per_block, layer_indices, save_mode, entries,
                metadata):
    """The cache dict of captured entries, checked as ``open_cache`` checks a file (ValueError if not).

    entries: ``CacheEntry``s, kept in this order, with the tensors of ``save_mode``: 'attn_logits' fp16
      [B, N, Q, K] for 'full', SUMMARY_KEYS fp32 for 'summary'. Every layer of ``layer_indices`` must
      have an entry for each captured (block, pass).
    layer_indices: kept in the given order. metadata: an open dict of plain values (no tensors), stored
      with 'format', 'format_version' and 'save_mode' added.
    The top-level query_frames / key_frames describe the last captured block."""
    if not isinstance(metadata, dict):
        _programming_error(f"metadata is {_shown(metadata)}, expected a dict")
    reserved = [key for key in RESERVED_METADATA if key in metadata]
    if reserved:
        _programming_error(f"metadata may not set {reserved}; build_cache writes them")
    _check_plain(metadata, "metadata", _programming_error)
    if save_mode not in SAVE_MODES:
        _programming_error(f"save_mode is {_shown(save_mode)}, expected one of {SAVE_MODES}")
    if not isinstance(entries, (list, tuple)):
        _programming_error(f"entries is {_shown(entries)}, expected a list of CacheEntry")
    for i, entry in enumerate(entries):
        if not isinstance(entry, CacheEntry):
            _programming_error(f"entries[{i}] is {_shown(entry)}, expected a CacheEntry")
    stored = [_stored(entry, num_frames, frame_seq_length) for entry in entries]
    no_entry = {"query_frames": [], "num_key_frames": 0}  # the check below names the empty list
    last = max(stored, key=lambda e: e["block"] if _is_int(e["block"]) else -1, default=no_entry)
    data = {
        "attention_weights": stored,
        "prompt": prompt,
        "num_frames": num_frames,
        "frame_seq_length": frame_seq_length,
        "num_frame_per_block": num_frame_per_block,
        "layer_indices": list(layer_indices),
        "is_logits": True,
        "capture_method": CAPTURE_METHOD,
        "query_frames": last["query_frames"],
        "key_frames": list(range(last["num_key_frames"])),
        "metadata": {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "save_mode": save_mode,
                     **metadata},
    }
    _check_cache(data, _programming_error)
    return data


def _as_list(value):
    """Tuples and ranges as lists; anything else unchanged, for the check to name."""
    return list(value) if isinstance(value, (list, tuple, range)) else value


def _length(value):
    return len(value) if isinstance(value, list) else None


def _tensor_bytes(data):
    return sum(t.numel() * t.element_size() for e in data["attention_weights"] for t in e.values()
               if isinstance(t, torch.Tensor))


def save_cache(path, data):
    """Write a ``build_cache`` dict with ``utils.output.write_atomically`` (symlinks followed, devices,
    FIFOs and folders refused, the old file intact on any error or signal); returns the bytes written."""
    _check_cache(data, _programming_error)
    write_atomically(path, lambda handle: torch.save(data, handle), expected_bytes=_tensor_bytes(data))
    return Path(path).stat().st_size


# ---------------------------------------------------------------------------------------------
# reading


def _load(path):
    """The raw dict of a cache file, memory-mapped; errors name the file and what is wrong."""
    if not path.is_file():
        raise CacheFileError(f"{path}: file not found (expected a Figure 4 attention cache .pt file)")
    with open(path, "rb") as f:
        magic = f.read(len(ZIP_MAGIC))
    if magic != ZIP_MAGIC:
        raise CacheFileError(f"{path}: not a torch file (expected a Figure 4 attention cache written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CacheFileError(f"{path}: not a Figure 4 attention cache: it holds objects beyond tensors and plain "
                             f"containers, which weights_only loading refuses ({one_line(err)})") from err
    except Exception as err:
        raise CacheFileError(f"{path}: unreadable torch file, truncated or corrupt? ({one_line(err)})") from err


class AttentionCache:
    """One checked cache file; opening it reads no tensor data.

    Attributes: path, prompt, metadata (dict), save_mode ('full' | 'summary'), num_frames,
    frame_seq_length, num_frame_per_block, layer_indices (in the order the run was given them),
    num_heads, batch_size, random_init (bool: metadata.config.random_init), entries (CacheEntry list, in
    file order), labels ((block, pass) pairs, in file order), query_frames and key_frames (the top
    level's: the last captured block).
    """

    def __init__(self, path):
        self.path = Path(path)
        data = _load(self.path)
        self.entries, self.labels = _check_cache(data, self._fail)
        self.prompt = data["prompt"]
        self.metadata = data["metadata"]
        self.save_mode = self.metadata["save_mode"]
        self.num_frames = data["num_frames"]
        self.frame_seq_length = data["frame_seq_length"]
        self.num_frame_per_block = data["num_frame_per_block"]
        self.layer_indices = list(data["layer_indices"])
        self.query_frames = list(data["query_frames"])
        self.key_frames = list(data["key_frames"])
        self.num_heads = self.entries[0].num_heads
        self.batch_size = self.entries[0].batch_size
        self.random_init = self.metadata.get("config", {}).get("random_init", False)
        self._summaries = {}

    def _fail(self, problem):
        raise CacheFileError(f"{self.path}: {problem}")

    def label(self, pass_=None, block=None):
        """The one (block, pass) matching the given pass and block (None: any); ValueError listing the
        labels held when none or several match."""
        matches = [(b, p) for b, p in self.labels if (pass_ is None or p == pass_) and (block is None or b == block)]
        if len(matches) != 1:
            held = ", ".join(f"block {b} pass {pass_name(p)}" for b, p in self.labels)
            wanted = ", ".join(f"{name} {value!r}" for name, value in (("block", block), ("pass", pass_))
                               if value is not None) or "no block or pass given"
            problem = "holds no such entry" if not matches else "holds several; choose a block and pass"
            raise ValueError(f"{self.path}: {wanted}: the file {problem}; it holds {held}")
        return matches[0]

    def entry(self, layer_idx, pass_=None, block=None):
        """The CacheEntry of a layer and a (block, pass) chosen as in ``label``."""
        if layer_idx not in self.layer_indices:
            raise ValueError(f"{self.path}: no layer {layer_idx}; layers stored: {self.layer_indices}")
        label = self.label(pass_, block)
        return next(e for e in self.entries if e.layer_idx == layer_idx and e.label == label)

    def summary(self, layer_idx, pass_=None, block=None):
        """The reductions of one entry (chosen as in ``entry``), fp32 on the CPU:
          query_mean_logits     [B, N, K]       K = num_key_frames * frame_seq_length
          frame_mean_logits     [B, N, Fq, Fk]
          frame_attention_mass  [B, N, Fq, Fk]
        A full cache is reduced here (once per entry, then remembered); a summary cache is read as stored.
        """
        entry = self.entry(layer_idx, pass_, block)
        key = (layer_idx, entry.label)
        if key not in self._summaries:
            if self.save_mode == "full":
                tiles = stored_tiles(entry.tensors["attn_logits"], self.frame_seq_length)
                result = summarize_logits(tiles, entry.num_heads, entry.num_query_frames, self.frame_seq_length)
            else:
                result = {name: entry.tensors[name].float() for name in SUMMARY_KEYS}
            self._summaries[key] = result
        return self._summaries[key]


def open_cache(path):
    """Open and check a Figure 4 attention cache; raises CacheFileError naming the file and the problem."""
    return AttentionCache(path)


def describe(path):
    """What a cache file holds, checked, without reading its tensor data (cheap even for full caches):
    a dict of prompt, num_frames, frame_seq_length, num_frame_per_block, layer_indices, save_mode,
    labels ((block, pass) pairs), num_heads, batch_size and metadata. CacheFileError as ``open_cache``."""
    cache = open_cache(path)
    return {name: getattr(cache, name) for name in (
        "prompt", "num_frames", "frame_seq_length", "num_frame_per_block", "layer_indices", "save_mode", "labels",
        "num_heads", "batch_size", "metadata")}
