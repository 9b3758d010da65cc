"""Reductions of one attention-logit matrix into the quantities Figure 4 plots.

One definition, ``summarize_logits``: the exact fp32 logits reduced one (head, query frame) tile at a
time (the largest temporary is [B, frame_seq_length, Lk] in fp32). The cache reader applies it to a
saved fp16 matrix. The capture computes the same quantities from q and k with ``summarize_qk``, in a
few kernels instead of hundreds:

- the two means are linear in the logits, so they come from the mean query and key vectors (the mean
  logit over a frame's queries and a frame's keys is the logit of their mean query and mean key),
  in fp64, exact to fp32 rounding while every logit is finite (``nonfinite`` says; ``exact_means``
  then recomputes them the direct way, where NaN and infinities combine as they do in a sum);
- the softmax masses, the extremes and the non-finite count need every logit: ``frame_partials``
  reduces each query row against each key frame in one pass (running maximum and sum, as flash
  attention keeps them), a Triton kernel on CUDA (utils/attention_stats_kernel.py, all heads in one
  launch, the logits never leave the chip) and the same reductions in torch elsewhere;
  ``combine_partials`` merges the key frames of each row in fp64.
"""
from typing import Callable

import torch
from einops import rearrange, reduce


def query_key_logits(q, k, head, rows=slice(None)):
    """Pre-softmax logits (q . k^T) / sqrt(D) of one head in fp32: [B, len(rows), Lk] from q [B, Lq, N, D]
    and k [B, Lk, N, D]."""
    scale = q.shape[-1] ** -0.5
    return torch.einsum("bqd,bkd->bqk", q[:, rows, head].float(), k[:, :, head].float()) * scale


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


def frame_partials_torch(q, k, frame_seq_length):
    """``frame_partials`` one (head, query frame) tile at a time in torch (any device)."""
    B, Lq, N, _ = q.shape
    fsl = frame_seq_length
    parts = []
    for head in range(N):
        for start in range(0, Lq, fsl):
            tile = query_key_logits(q, k, head, slice(start, start + fsl))  # [B, fsl, Lk]
            tile = rearrange(tile, "b q (f k) -> b q f k", k=fsl)
            hi, lo = tile.amax(dim=-1), tile.amin(dim=-1)  # [B, fsl, Fk], NaN where the frame has one
            shift = torch.where(hi.isfinite(), hi, 0.0)
            total = (tile - shift[..., None]).exp().sum(dim=-1)
            bad = (~tile.isfinite()).sum(dim=-1, dtype=torch.int32)
            parts.append((hi, lo, total, bad))
    return tuple(rearrange(torch.cat([p[i] for p in parts], dim=1), "b (n l) f -> b n l f", n=N) for i in range(4))


def frame_partials(q, k, frame_seq_length):
    """Per query row and key frame of the logits of q [B, Lq, N, D] against k [B, Fk * fsl, N, D]:
    (hi, lo, total, bad), each [B, N, Lq, Fk]: the largest and smallest logit (NaN where the frame
    holds a NaN), the sum of exp(logit - hi) (hi taken as 0 where it is infinite; not meaningful where
    hi is NaN or +inf) in fp32, and the count of non-finite logits (int32). Triton on CUDA, else torch."""
    if q.is_cuda:
        from utils import attention_stats_kernel

        if attention_stats_kernel.supports(q, k):
            return attention_stats_kernel.frame_partials_triton(q, k, frame_seq_length)
    return frame_partials_torch(q, k, frame_seq_length)


def combine_partials(hi, lo, total, bad, frame_seq_length):
    """The summary's softmax masses, extremes and non-finite count from ``frame_partials``, in fp64:
    a row's softmax over all keys puts exp(hi_j - max_j hi_j) * total_j / sum_j (the same) on key frame j.
    A row with a NaN or +inf logit, or with every logit -inf, has NaN masses (as torch's softmax)."""
    hi64 = hi.double()
    top = hi64.amax(dim=-1, keepdim=True)  # [B, N, Lq, 1]
    poisoned = ~top.isfinite()
    weights = total.double() * (hi64 - torch.where(poisoned, 0.0, top)).exp()  # [B, N, Lq, Fk]
    mass = torch.where(poisoned, float("nan"), weights / weights.sum(dim=-1, keepdim=True))
    return {
        "frame_attention_mass": reduce(mass, "b n (fq q) fk -> b n fq fk", "mean", q=frame_seq_length).float(),
        "logit_min": lo.amin(dim=(2, 3)),
        "logit_max": hi.amax(dim=(2, 3)),
        "nonfinite": bad.sum(dim=(2, 3), dtype=torch.int64),
    }


def mean_logits(q, k, frame_seq_length):
    """The two means of the summary by linearity, in fp64 then rounded to fp32: the mean over any set of
    queries of q . k is (their mean query) . k, and likewise over keys. Exact to fp32 rounding while
    every logit is finite."""
    scale = q.shape[-1] ** -0.5
    q_frames = reduce(q.double(), "b (f l) n d -> b f n d", "mean", l=frame_seq_length)  # [B, Fq, N, D]
    k64 = k.double()
    k_frames = reduce(k64, "b (f l) n d -> b f n d", "mean", l=frame_seq_length)  # [B, Fk, N, D]
    return {
        "query_mean_logits": (torch.einsum("bnd,bknd->bnk", q_frames.mean(dim=1), k64) * scale).float(),
        "frame_mean_logits": (torch.einsum("bind,bjnd->bnij", q_frames, k_frames) * scale).float(),
    }


def summarize_qk(q, k, frame_seq_length):
    """``summarize_logits``'s dict for the logits of q [B, Fq * fsl, N, D] against k [B, Fk * fsl, N, D]
    in a few kernels, without waiting for the device. Where ``nonfinite`` is not 0, call
    ``exact_means`` before reading the means."""
    if q.shape[1] % frame_seq_length or k.shape[1] % frame_seq_length:
        raise ValueError(f"{q.shape[1]} queries and {k.shape[1]} keys must be whole frames of {frame_seq_length} tokens")
    summary = combine_partials(*frame_partials(q, k, frame_seq_length), frame_seq_length)
    summary.update(mean_logits(q, k, frame_seq_length))
    return summary


def exact_means(summary, q, k, frame_seq_length):
    """``summary`` with its two means recomputed tile by tile from the fp32 logits where it counts
    non-finite logits (where their algebra is not exact: +inf and -inf make NaN in a sum, not in the
    mean vectors). Waits for the device."""
    if not bool(summary["nonfinite"].any()):
        return summary
    num_heads = q.shape[2]
    num_query_frames = q.shape[1] // frame_seq_length

    def tile(head, frame):
        return query_key_logits(q, k, head, slice(frame * frame_seq_length, (frame + 1) * frame_seq_length))

    direct = summarize_logits(tile, num_heads, num_query_frames, frame_seq_length)
    return {**summary, "query_mean_logits": direct["query_mean_logits"], "frame_mean_logits": direct["frame_mean_logits"]}
