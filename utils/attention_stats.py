"""Reductions of one attention-logit matrix into the quantities Figure 4 plots.

The capture (on the GPU, from q and k) and the cache reader (on the CPU, from a saved fp16 matrix)
both call ``summarize_logits``, so a summary cache and a full cache reduce the same way. The work goes
one (head, query frame) tile at a time: the largest temporary is [B, frame_seq_length, Lk] in fp32.
"""
from typing import Callable

import torch
from einops import reduce


def frame_reductions(logits, frame_seq_length):
    """Frame-level views of pre-softmax logits.

    logits: [..., Fq * fsl, Fk * fsl], fp32, the query rows of whole query frames against all keys.
    Returns (frame_mean, frame_mass), both [..., Fq, Fk]:
      frame_mean[i, j]: mean logit over query frame i's tokens and key frame j's tokens;
      frame_mass[i, j]: softmax over *all* keys of each query row, summed over key frame j's tokens,
                        averaged over query frame i's tokens (each row of frame_mass sums to 1).
    """
    fsl = frame_seq_length
    frame_mean = reduce(logits, "... (fq q) (fk k) -> ... fq fk", "mean", q=fsl, k=fsl)
    probs = logits.softmax(dim=-1)
    frame_mass = reduce(probs, "... (fq q) (fk k) -> ... fq fk", "sum", q=fsl, k=fsl) / fsl
    return frame_mean, frame_mass


def summarize_logits(
    query_frame_logits: Callable[[int, int], torch.Tensor],
    num_heads: int,
    num_query_frames: int,
    frame_seq_length: int,
):
    """Summarize a [B, N, Fq * fsl, Lk] logit matrix given tile by tile.

    query_frame_logits(head, query_frame) returns that tile, [B, fsl, Lk], in fp32.
    Returns a dict of fp32 tensors on the tiles' device:
      query_mean_logits     [B, N, Lk]      logits averaged over all query tokens (the Figure 4 curve)
      frame_mean_logits     [B, N, Fq, Fk]  see ``frame_reductions``
      frame_attention_mass  [B, N, Fq, Fk]  see ``frame_reductions``
      logit_min, logit_max  [B, N]          extremes over the whole matrix
      nonfinite             [B, N]          count of NaN and infinite logits (int64)
    """
    query_mean, frame_mean, frame_mass, lows, highs, bad = [], [], [], [], [], []
    for head in range(num_heads):
        row_sum, means, masses, low, high, nonfinite = 0.0, [], [], [], [], 0
        for frame in range(num_query_frames):
            tile = query_frame_logits(head, frame)  # [B, fsl, Lk]
            nonfinite = nonfinite + (~torch.isfinite(tile)).sum(dim=(1, 2))
            row_sum = row_sum + tile.sum(dim=1)
            low.append(tile.amin(dim=(1, 2)))
            high.append(tile.amax(dim=(1, 2)))
            mean, mass = frame_reductions(tile, frame_seq_length)  # [B, 1, Fk] each
            means.append(mean)
            masses.append(mass)
        query_mean.append(row_sum / (num_query_frames * frame_seq_length))
        frame_mean.append(torch.cat(means, dim=1))
        frame_mass.append(torch.cat(masses, dim=1))
        lows.append(torch.stack(low).amin(dim=0))
        highs.append(torch.stack(high).amax(dim=0))
        bad.append(nonfinite)
    return {
        "query_mean_logits": torch.stack(query_mean, dim=1),
        "frame_mean_logits": torch.stack(frame_mean, dim=1),
        "frame_attention_mass": torch.stack(frame_mass, dim=1),
        "logit_min": torch.stack(lows, dim=1),
        "logit_max": torch.stack(highs, dim=1),
        "nonfinite": torch.stack(bad, dim=1),
    }


def stored_tiles(logits, frame_seq_length):
    """``query_frame_logits`` for ``summarize_logits`` over a stored [B, N, Q, K] tensor (any dtype,
    any device, memory-mapped included): each tile is sliced, then cast to fp32."""

    def tile(head, frame):
        rows = slice(frame * frame_seq_length, (frame + 1) * frame_seq_length)
        return logits[:, head, rows].float()

    return tile
