"""Pre-flight estimate: will the run fit in device memory, host memory and on disk?

``estimate`` computes, from the model sizes (``utils.config.model_sizes``) and the run's options, the
bytes each part of a capture run needs; ``check_fits`` compares them with what is free and raises a
one-line ``PreflightError`` saying what to change. Standard library only: it runs before torch is
imported and before any weight is read.
"""
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from utils.output import format_bytes
from utils.wan21 import frame_seq_length as tokens_per_frame

GB = 1e9


class PreflightError(ValueError):
    """The run would not fit in the memory or disk space available."""


@dataclass(frozen=True)
class Estimate:
    """Bytes a capture run needs; see ``estimate`` for how each is computed."""

    frame_seq_length: int
    query_tokens: int  # Lq: tokens of one block
    key_tokens: int  # Lk: tokens of the cached frames a last-block query attends to
    weights: int
    kv_cache: int
    activations: int
    capture_device: int
    output_file: int
    host_peak: int

    @property
    def device_total(self):
        return self.weights + self.kv_cache + self.activations + self.capture_device


def parameter_count(sizes):
    """Number of parameters of a CausalWanModel of ``sizes`` (its constructor arguments)."""
    dim, ffn, heads_out = sizes["dim"], sizes["ffn_dim"], sizes["out_dim"] * math.prod(sizes["patch_size"])
    attention = 4 * (dim * dim + dim) + (2 * dim if sizes.get("qk_norm", True) else 0)  # q, k, v, o, q/k RMSNorm
    block = (
        2 * attention  # self- and cross-attention
        + (2 * dim if sizes.get("cross_attn_norm", True) else 0)  # norm3, affine LayerNorm
        + dim * ffn + ffn + ffn * dim + dim  # FFN
        + 6 * dim  # modulation
    )
    return (
        sizes["in_dim"] * dim * math.prod(sizes["patch_size"]) + dim  # patch embedding
        + sizes["text_dim"] * dim + dim + dim * dim + dim  # text embedding
        + sizes["freq_dim"] * dim + dim + dim * dim + dim  # time embedding
        + dim * 6 * dim + 6 * dim  # time projection
        + sizes["num_layers"] * block
        + dim * heads_out + heads_out + 2 * dim  # head and its modulation
    )


def umt5_parameter_count(sizes):
    """Number of parameters of a UMT5 encoder of ``sizes`` (UMT5Config fields, gated FFN): the token
    embedding, then per layer q, k, v, o, its own relative-position bias, the gated FFN and two norms,
    and the final norm."""
    d, inner = sizes["d_model"], sizes["num_heads"] * sizes["d_kv"]
    gated = str(sizes.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    layer = (4 * d * inner + sizes["relative_attention_num_buckets"] * sizes["num_heads"]
             + (3 if gated else 2) * d * sizes["d_ff"] + 2 * d)
    return sizes["vocab_size"] * d + sizes["num_layers"] * layer + d


def estimate(sizes, *, num_frames, num_frame_per_block, height, width, cache_frames, num_captured_layers,
             num_kept_passes, save_mode, dtype_bytes, batch=1, text_encoder_bytes=0) -> Estimate:
    """Bytes of a run of ``num_frames`` latent frames at ``height`` x ``width`` pixels that keeps
    ``num_kept_passes`` self-attention calls for each of ``num_captured_layers`` layers.

    - weights: the transformer's parameters in the run's dtype, plus ``text_encoder_bytes``;
    - kv_cache: per layer, K and V of the ``cache_frames`` frames the cache policy keeps (its
      ``cache_frames(num_frames)``): cache_frames * frame_seq_length * dim * dtype_bytes * 2, x batch;
    - activations: a rough upper bound for one block's forward over the Lq tokens of a block: ten
      [Lq, dim] tensors (input, norms, q, k, v, attention output, residuals, modulated input) and
      two [Lq, ffn_dim] FFN hiddens, in the run's dtype;
    - capture_device: per kept pass and layer, the kept q [Lq, dim] and a copy of the keys [Lk, dim]
      in the run's dtype, plus one fp32 tile [frame_seq_length, Lk] for the reductions (one at a time);
    - output_file: ``full``: fp16 [B, N, Lq, Lk] per kept entry; ``summary``: fp32 [B, N, Lk] plus two
      fp32 [B, N, Fq, Fk] per entry (Fq = num_frame_per_block, Fk = cache_frames);
    - host_peak: the output, held whole in host memory before it is written.
    """
    frame_seq_length = tokens_per_frame(height, width, sizes["patch_size"])
    lq, lk = num_frame_per_block * frame_seq_length, cache_frames * frame_seq_length
    dim, heads = sizes["dim"], sizes["num_heads"]
    entries = num_captured_layers * num_kept_passes
    if save_mode == "full":
        per_entry = 2 * batch * heads * lq * lk
    elif save_mode == "summary":
        per_entry = 4 * (batch * heads * lk + 2 * batch * heads * num_frame_per_block * cache_frames)
    else:
        raise ValueError(f"save_mode {save_mode!r}; expected 'full' or 'summary'")
    tile = 4 * frame_seq_length * lk if entries else 0
    output_file = entries * per_entry
    return Estimate(
        frame_seq_length=frame_seq_length,
        query_tokens=lq,
        key_tokens=lk,
        weights=parameter_count(sizes) * dtype_bytes + text_encoder_bytes,
        kv_cache=sizes["num_layers"] * 2 * batch * lk * dim * dtype_bytes,
        activations=batch * lq * (10 * dim + 2 * sizes["ffn_dim"]) * dtype_bytes,
        capture_device=entries * batch * (lq + lk) * dim * dtype_bytes + tile,
        output_file=output_file,
        host_peak=output_file,
    )


def host_available_bytes(meminfo="/proc/meminfo"):
    """MemAvailable of ``meminfo`` in bytes; None where the file is absent (not Linux) or lacks it."""
    try:
        lines = Path(meminfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024  # the value is in kB
    return None


def disk_free_bytes(output_dir):
    """Free bytes of the file system that will hold ``output_dir`` (its nearest existing parent)."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def check_fits(estimate, *, device_free_bytes, host_available_bytes, output_dir, output_files=1):
    """Raise ``PreflightError`` if the run needs more device memory than ``device_free_bytes``, more
    host memory than ``host_available_bytes`` or more disk space than is free for ``output_dir``
    (``output_files`` files of the estimated size). A None budget is not checked (unknown)."""
    e = estimate
    if device_free_bytes is not None and e.device_total > device_free_bytes:
        raise PreflightError(
            f"the run needs about {e.device_total / GB:.1f} GB of device memory (weights {e.weights / GB:.1f}, KV cache "
            f"{e.kv_cache / GB:.1f}, activations {e.activations / GB:.1f}, capture {e.capture_device / GB:.1f}) but "
            f"{device_free_bytes / GB:.1f} GB are free; capture fewer layers (--layer_indices) or generate fewer frames (--num_frames)"
        )
    if host_available_bytes is not None and e.host_peak > host_available_bytes:
        raise PreflightError(
            f"the output needs about {e.host_peak / GB:.1f} GB of host memory but {host_available_bytes / GB:.1f} GB are "
            "available; capture fewer layers (--layer_indices) or frames (--num_frames), or use --save_mode summary"
        )
    free = disk_free_bytes(output_dir)
    if e.output_file * output_files > free:
        files = "the output file needs" if output_files == 1 else f"{output_files} output files need"
        raise PreflightError(
            f"{files} about {format_bytes(e.output_file * output_files)} but {format_bytes(free)} are free for {output_dir}; "
            "capture fewer layers (--layer_indices) or frames (--num_frames), or use --save_mode summary"
        )
