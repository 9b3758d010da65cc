"""Reading Figure 4 attention caches written by experiments/run_extraction_figure4.py.

A cache is a ``torch.save`` dict holding, per captured layer, either the full pre-softmax logit
matrix of the last temporal block against every key (save_mode 'full', fp16 [B, N, Q, K]) or its
reductions (save_mode 'summary', fp32). ``open_cache`` checks that a file is such a cache and
``AttentionCache.summary`` gives the same three reductions for both modes, through the one code path
in ``utils.attention_stats``.

Full caches are memory-mapped: a real layer is 3.7 GB, so a summary reads its layer one
(head, query frame) tile at a time and nothing else of the file is paged in.
"""
import pickle
from pathlib import Path

import torch

from utils.attention_stats import stored_tiles, summarize_logits

CACHE_FORMAT = "figure4-attention-cache"
CACHE_FORMAT_VERSION = 1
SAVE_MODES = ("full", "summary")
SUMMARY_KEYS = ("query_mean_logits", "frame_mean_logits", "frame_attention_mass")
TOP_LEVEL_KEYS = (
    "attention_weights", "prompt", "num_frames", "frame_seq_length", "num_frame_per_block",
    "layer_indices", "is_logits", "capture_method", "query_frames", "key_frames", "metadata",
)
ENTRY_KEYS = (
    "layer_idx", "is_logits", "num_frames", "frame_seq_length", "num_heads",
    "num_query_frames", "num_key_frames",
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format starts with a zip local-file header


class CacheFileError(ValueError):
    """A file is missing, unreadable, or not a Figure 4 attention cache of a supported version."""


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
                             f"containers, which weights_only loading refuses ({err})") from err
    except Exception as err:
        raise CacheFileError(f"{path}: unreadable torch file, truncated or corrupt? ({err})") from err


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(mapping, keys, where, path):
    """Raise CacheFileError naming ``path`` and ``where`` unless ``mapping`` has every key of ``keys``."""
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise CacheFileError(f"{path}: not a complete Figure 4 attention cache: {where} lacks {', '.join(missing)}")


class AttentionCache:
    """One checked cache file.

    Attributes: path, prompt, metadata (dict), save_mode ('full' | 'summary'), num_frames,
    frame_seq_length, num_frame_per_block, layer_indices (sorted list), num_heads, batch_size,
    query_frames, key_frames (list[int], key_frames == 0..num_key_frames-1), num_query_frames,
    num_key_frames.
    """

    def __init__(self, path):
        self.path = Path(path)
        data = _load(self.path)
        self._check_top_level(data)
        self.prompt = data["prompt"]
        self.metadata = data["metadata"]
        self.save_mode = self.metadata["save_mode"]
        self.num_frames = data["num_frames"]
        self.frame_seq_length = data["frame_seq_length"]
        self.num_frame_per_block = data["num_frame_per_block"]
        self.query_frames = list(data["query_frames"])
        self.key_frames = list(data["key_frames"])
        self.num_query_frames = len(self.query_frames)
        self.num_key_frames = len(self.key_frames)
        self._entries = self._index_entries(data)
        self.layer_indices = sorted(self._entries)
        self.num_heads, self.batch_size = self._check_entries()
        self._summaries = {}

    def _fail(self, problem):
        raise CacheFileError(f"{self.path}: {problem}")

    def _check_top_level(self, data):
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
            self._fail("not a Figure 4 attention cache (expected a dict with a 'metadata' dict)")
        fmt = data["metadata"].get("format")
        if fmt != CACHE_FORMAT:
            self._fail(f"not a Figure 4 attention cache: metadata.format is {fmt!r}, expected {CACHE_FORMAT!r}")
        _require(data["metadata"], ("format_version", "save_mode"), "metadata", self.path)
        version = data["metadata"]["format_version"]
        if version != CACHE_FORMAT_VERSION:
            self._fail(f"metadata.format_version is {version!r}; this reader reads version {CACHE_FORMAT_VERSION}")
        if data["metadata"]["save_mode"] not in SAVE_MODES:
            self._fail(f"metadata.save_mode is {data['metadata']['save_mode']!r}, expected one of {SAVE_MODES}")
        _require(data, TOP_LEVEL_KEYS, "the top level", self.path)
        if not isinstance(data["prompt"], str):
            self._fail(f"prompt is {type(data['prompt']).__name__}, expected str")
        if data["is_logits"] is not True:
            self._fail("is_logits is not True: this reader expects pre-softmax logits")
        for key in ("num_frames", "frame_seq_length", "num_frame_per_block"):
            if not _is_int(data[key]) or data[key] < 1:
                self._fail(f"{key} is {data[key]!r}, expected a positive int")
        for key in ("query_frames", "key_frames", "layer_indices"):
            if not isinstance(data[key], list) or not data[key] or not all(_is_int(i) for i in data[key]):
                self._fail(f"{key} is {data[key]!r}, expected a non-empty list of ints")
        if data["key_frames"] != list(range(len(data["key_frames"]))):
            self._fail(f"key_frames is {data['key_frames']}, expected 0..num_key_frames-1")

    def _index_entries(self, data):
        """The layer entries by layer_idx, checked to be exactly the layers of layer_indices."""
        entries = data["attention_weights"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "layer_idx" in e for e in entries):
            self._fail("attention_weights is not a list of per-layer dicts with a 'layer_idx'")
        stored = [e["layer_idx"] for e in entries]
        if sorted(stored) != sorted(data["layer_indices"]) or len(set(stored)) != len(stored):
            self._fail(f"layer_indices {data['layer_indices']} do not match the layers stored in attention_weights {stored}")
        return {e["layer_idx"]: e for e in entries}

    def _check_entries(self):
        """Check every layer entry against the top level; return (num_heads, batch_size)."""
        heads, batches = set(), set()
        fsl, fq, fk = self.frame_seq_length, self.num_query_frames, self.num_key_frames
        for layer, entry in self._entries.items():
            where = f"attention_weights entry of layer {layer}"
            _require(entry, ENTRY_KEYS, where, self.path)
            expected = {"is_logits": True, "num_frames": self.num_frames, "frame_seq_length": fsl,
                        "num_query_frames": fq, "num_key_frames": fk}
            for key, value in expected.items():
                if entry[key] != value:
                    self._fail(f"{where}: {key} is {entry[key]!r}, expected {value!r} (from the top level)")
            n = entry["num_heads"]
            if self.save_mode == "full":
                shapes = {"attn_logits": ("B", n, fq * fsl, fk * fsl)}
            else:
                shapes = {"query_mean_logits": ("B", n, fk * fsl),
                          "frame_mean_logits": ("B", n, fq, fk),
                          "frame_attention_mass": ("B", n, fq, fk)}
            _require(entry, shapes, f"{where} (save_mode {self.save_mode!r})", self.path)
            for key, shape in shapes.items():
                tensor = entry[key]
                if (not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point()
                        or tensor.dim() != len(shape) or tuple(tensor.shape[1:]) != shape[1:]):
                    found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    self._fail(f"{where}: {key} is {found}, expected a float tensor of shape {shape}")
                batches.add(tensor.shape[0])
            heads.add(n)
        if len(heads) != 1 or len(batches) != 1:
            self._fail(f"layers disagree on num_heads {sorted(heads)} or batch size {sorted(batches)}")
        return heads.pop(), batches.pop()

    def summary(self, layer_idx):
        """The reductions of one layer, fp32 on the CPU:
          query_mean_logits     [B, N, K]       K = num_key_frames * frame_seq_length
          frame_mean_logits     [B, N, Fq, Fk]
          frame_attention_mass  [B, N, Fq, Fk]
        A full cache is reduced here (once per layer, then remembered); a summary cache is read as stored.
        """
        if layer_idx not in self._entries:
            raise ValueError(f"{self.path}: no layer {layer_idx}; layers stored: {self.layer_indices}")
        if layer_idx not in self._summaries:
            entry = self._entries[layer_idx]
            if self.save_mode == "full":
                tiles = stored_tiles(entry["attn_logits"], self.frame_seq_length)
                result = summarize_logits(tiles, self.num_heads, self.num_query_frames, self.frame_seq_length)
            else:
                result = {key: entry[key].float() for key in SUMMARY_KEYS}
            self._summaries[layer_idx] = result
        return self._summaries[layer_idx]


def open_cache(path):
    """Open and check a Figure 4 attention cache; raises CacheFileError naming the file and the problem."""
    return AttentionCache(path)
