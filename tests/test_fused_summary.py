"""The capture's fused summary (utils.attention_stats.summarize_qk: partials of every logit in one pass,
the means by algebra) against the summary computed here from scratch: every head's logits by one
einsum in fp64, torch's softmax over all keys, frame sums by reshaping. On a tiny call and on one
full-width tile ([fsl, K] with K several frames of 1560 tokens), with NaN and infinities planted in
q or k. (On CUDA the partials come from the Triton kernel; the benchmark checks it there.)"""
import pytest
import torch

from utils.attention_stats import exact_means, frame_partials_torch, summarize_qk


def direct_summary(q, k, fsl):
    """The summary's quantities straight from their definition, in fp64."""
    logits = torch.einsum("bqnd,bknd->bnqk", q.double(), k.double()) * q.shape[-1] ** -0.5  # [B, N, Q, K]
    B, N, Q, K = logits.shape
    blocks = logits.view(B, N, Q // fsl, fsl, K // fsl, fsl)
    probs = logits.softmax(dim=-1).view(B, N, Q // fsl, fsl, K // fsl, fsl)
    return {
        "query_mean_logits": logits.mean(dim=2),
        "frame_mean_logits": blocks.mean(dim=(3, 5)),
        "frame_attention_mass": probs.sum(dim=5).mean(dim=3),
        "logit_min": logits.amin(dim=(2, 3)),
        "logit_max": logits.amax(dim=(2, 3)),
        "nonfinite": (~logits.isfinite()).sum(dim=(2, 3)),
    }


def assert_summary(got, want):
    """Masses within 1e-6; logits (means, extremes) within 1e-6 of the largest finite one of their
    tensor (fp32 captures round their products in fp32); counts, NaN and infinities equal."""
    assert set(got) == set(want)
    for name, value in want.items():
        finite = value[value.isfinite()].abs()
        scale = finite.max().item() if finite.numel() else 0.0
        tolerance = 0 if name == "nonfinite" else 1e-6 if name == "frame_attention_mass" else 1e-6 * scale
        torch.testing.assert_close(got[name].double(), value.to(torch.float64), rtol=0, atol=tolerance, equal_nan=True, msg=name)
        assert torch.equal(got[name].isnan(), value.isnan()), name


def plant(q, k, where):
    """NaN or infinities in q or k (cloned)."""
    q, k = q.clone(), k.clone()
    if where == "nan in q":
        q[0, 3, 1, 2] = float("nan")
    elif where == "inf in q":
        q[0, 5, 0, 3] = float("inf")
    elif where == "-inf in k":
        k[0, 7, 1, 1] = float("-inf")
    elif where == "inf in q and k":
        q[0, 2, 0, 0] = float("inf")
        k[0, 9, 0, 4] = float("-inf")
    elif where == "a key row of -inf":  # one key at -inf for every query of head 1 (its queries' dim 0 > 0)
        q[..., 1, 0] = q[..., 1, 0].abs() + 0.1
        k[0, 4, 1] = 0.0
        k[0, 4, 1, 0] = float("-inf")
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", [None, "nan in q", "inf in q", "-inf in k", "inf in q and k", "a key row of -inf"])
def test_tiny_summary_matches_einsum_and_softmax(dtype, where):
    generator = torch.Generator().manual_seed(hash((str(dtype), where)) % 2**31)
    B, fsl, Fq, Fk, N, D = 1, 6, 3, 4, 2, 8
    q = (torch.randn(B, Fq * fsl, N, D, generator=generator) * 2).to(dtype)
    k = torch.randn(B, Fk * fsl, N, D, generator=generator).to(dtype)
    q, k = plant(q, k, where)
    got = exact_means(summarize_qk(q, k, fsl), q, k, fsl)
    want = direct_summary(q, k, fsl)
    assert_summary(got, want)
    if where is not None:
        assert got["nonfinite"].sum() > 0
    if where == "a key row of -inf":  # -inf logits take no mass and poison nothing
        assert got["frame_attention_mass"][0, 1].isfinite().all() and got["nonfinite"][0, 1] == Fq * fsl


@pytest.mark.parametrize("where", [None, "inf in q and k"])
def test_full_width_tile_matches_einsum_and_softmax(where):
    """One query frame of 1560 tokens against 4 key frames (6240 keys), bf16 as the model runs,
    with a sink-like key frame (a large mean logit) so the masses are far from uniform."""
    generator = torch.Generator().manual_seed(7)
    B, fsl, Fq, Fk, N, D = 1, 1560, 1, 4, 1, 128
    q = torch.randn(B, Fq * fsl, N, D, generator=generator) + 0.3
    k = torch.randn(B, Fk * fsl, N, D, generator=generator)
    k[:, :fsl] += 0.5
    q, k = plant(q.bfloat16(), k.bfloat16(), where)
    got = exact_means(summarize_qk(q, k, fsl), q, k, fsl)
    want = direct_summary(q, k, fsl)
    assert_summary(got, want)
    if where is None:
        assert got["frame_attention_mass"][0, 0, 0, 0] > 0.5
    else:  # the row with an infinite q element has NaN masses, and so has its query frame's mean
        assert got["frame_attention_mass"].isnan().all() and got["nonfinite"].item() >= fsl


def test_partials_are_per_row_and_key_frame():
    """The torch partials: per row and key frame, the largest logit and the sum of exp(logit - it)."""
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 8, 2, 4, generator=generator), torch.randn(1, 12, 2, 4, generator=generator)
    hi, lo, total, bad = frame_partials_torch(q, k, 4)
    logits = torch.einsum("bqnd,bknd->bnqk", q, k).view(1, 2, 8, 3, 4) / 2
    torch.testing.assert_close(hi, logits.amax(-1))
    torch.testing.assert_close(lo, logits.amin(-1))
    torch.testing.assert_close(total, (logits - logits.amax(-1, keepdim=True)).exp().sum(-1))
    assert bad.dtype == torch.int32 and not bad.any()


def test_partial_frames_are_refused():
    q, k = torch.randn(1, 8, 1, 4), torch.randn(1, 10, 1, 4)
    with pytest.raises(ValueError, match="whole frames of 4 tokens"):
        summarize_qk(q, k, 4)
