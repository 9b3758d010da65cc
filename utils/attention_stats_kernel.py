"""The Triton kernel of ``utils.attention_stats.frame_partials`` on a CUDA device: every logit of one
captured call computed, reduced and dropped on the chip, all heads in one launch.

One program takes BLOCK_M query rows of one head against one key frame (``fsl`` keys), walking the
frame's keys BLOCK_N at a time with a running maximum and sum (flash attention's online softmax), and
writes per row: the largest and smallest logit (NaN if the frame holds one), the sum of exp(logit -
largest) and the count of non-finite logits. Logits are q . k in fp32 (bf16/fp16 captures: tensor-core
products, exact in fp32, with fp32 accumulation; fp32 captures: fp32 products, no TF32), times the
scale in fp32, exactly as ``utils.attention_stats.query_key_logits`` forms them, and are never stored
or rounded narrower.
"""
import torch
import triton
import triton.language as tl

# Settings timed on an H100 (bf16, one entry of 12 heads, 4680 queries x 32760 keys): 128 x 64 tiles,
# 4 warps, 3 stages 1.44 ms; 8 warps 1.50 ms; 64-key -> 128-key steps 1.70 ms; 3, 7 or 21 key frames per
# program (the q tile loaded once for them) 2.07-2.48 ms. fp32 products (no tensor cores) need 8 warps:
# 51 ms an entry on an H200, against 761 ms with 4 warps on an H100.
BLOCK_M = 128  # query rows per program
BLOCK_N = 64  # keys per step: 1560-token frames leave 24 of the last step's 64 used (2.5% waste)
NUM_WARPS = 4
NUM_WARPS_FP32 = 8
NUM_STAGES = 3
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _step(q, k_ptrs, n0, fsl, scale, hi, lo, total, bad, IEEE: tl.constexpr, MASKED: tl.constexpr,
          BLOCK_N_: tl.constexpr):
    """One step of BLOCK_N keys: the running (hi, lo, total, bad) of each query row updated."""
    cols = n0 + tl.arange(0, BLOCK_N_)
    valid = cols < fsl
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if IEEE:
        logits = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32) * scale
    else:
        logits = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        high = tl.where(valid[None, :], logits, float("-inf"))
        low = tl.where(valid[None, :], logits, float("inf"))
    else:
        high = logits
        low = logits
    step_hi = tl.reduce(high, 1, _max_nan)
    step_lo = tl.reduce(low, 1, _min_nan)
    new_hi = _max_nan(hi, step_hi)
    # rows whose largest logit so far is not finite are poisoned (NaN, +inf) or hold only -inf so
    # far: their sums are not used then, or stay 0 (exp(-inf - 0))
    shift = tl.where((new_hi > float("-inf")) & (new_hi < float("inf")), new_hi, 0.0)
    kept = tl.exp2((hi - shift) * LOG2E)
    total = total * kept + tl.sum(tl.exp2((high - shift[:, None]) * LOG2E), 1)
    if tl.sum(((step_lo > float("-inf")) & (step_hi < float("inf"))).to(tl.int32)) < step_lo.shape[0]:
        nonfinite = (logits - logits) != 0.0  # NaN - NaN, inf - inf: NaN
        if MASKED:
            nonfinite = nonfinite & valid[None, :]
        bad += tl.sum(nonfinite.to(tl.int32), 1)
    return new_hi, _min_nan(lo, step_lo), total, bad


@triton.jit
def _frame_partials_kernel(Q, K, HI, LO, TOTAL, BAD, Lq, fsl, full, scale,
                           sq_b, sq_l, sq_h, sk_b, sk_l, sk_h,
                           NUM_HEADS: tl.constexpr, NUM_KEY_FRAMES: tl.constexpr, D: tl.constexpr,
                           IEEE: tl.constexpr, BLOCK_M_: tl.constexpr, BLOCK_N_: tl.constexpr):
    """Program (query block, key frame, batch x head)."""
    block = tl.program_id(0)
    frame = tl.program_id(1)
    batch_head = tl.program_id(2)
    b = batch_head // NUM_HEADS
    h = batch_head % NUM_HEADS
    rows = block * BLOCK_M_ + tl.arange(0, BLOCK_M_)
    inside = rows < Lq
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :], mask=inside[:, None], other=0.0)
    keys = tl.arange(0, BLOCK_N_)  # the frame's keys: ``full`` (fsl rounded down to BLOCK_N) in full steps, then the rest
    k_base = K + b * sk_b + h * sk_h + (frame * fsl) * sk_l + dims[None, :]

    hi = tl.full([BLOCK_M_], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_M_], float("inf"), tl.float32)
    total = tl.zeros([BLOCK_M_], tl.float32)
    bad = tl.zeros([BLOCK_M_], tl.int32)
    for n0 in range(0, full, BLOCK_N_):
        hi, lo, total, bad = _step(q, k_base + (n0 + keys)[:, None] * sk_l, n0, fsl, scale, hi, lo, total, bad,
                                   IEEE, False, BLOCK_N_)
    if full < fsl:
        hi, lo, total, bad = _step(q, k_base + (full + keys)[:, None] * sk_l, full, fsl, scale, hi, lo, total, bad,
                                   IEEE, True, BLOCK_N_)

    out = (batch_head * Lq + rows) * NUM_KEY_FRAMES + frame  # outputs [B, N, Lq, Fk]
    tl.store(HI + out, hi, mask=inside)
    tl.store(LO + out, lo, mask=inside)
    tl.store(TOTAL + out, total, mask=inside)
    tl.store(BAD + out, bad, mask=inside)


def frame_partials_triton(q, k, frame_seq_length, block_m=BLOCK_M, block_n=BLOCK_N, num_warps=None, num_stages=NUM_STAGES):
    """``utils.attention_stats.frame_partials`` through the kernel: q [B, Lq, N, D], k [B, Lk, N, D] of
    one dtype on one CUDA device, D a power of two >= 16. Returns (hi, lo, total, bad), [B, N, Lq, Fk].
    The tile sizes and launch settings change the speed only: each logit and each row's sums are the
    same whatever they are, up to the order of the fp32 additions."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    B, Lq, N, D = q.shape
    num_key_frames = k.shape[1] // frame_seq_length
    shape = (B, N, Lq, num_key_frames)
    hi, lo, total = (torch.empty(shape, dtype=torch.float32, device=q.device) for _ in range(3))
    bad = torch.empty(shape, dtype=torch.int32, device=q.device)
    ieee = q.dtype == torch.float32
    grid = (triton.cdiv(Lq, block_m), num_key_frames, B * N)
    _frame_partials_kernel[grid](
        q, k, hi, lo, total, bad, Lq, frame_seq_length, frame_seq_length // block_n * block_n, D ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        NUM_HEADS=N, NUM_KEY_FRAMES=num_key_frames, D=D, IEEE=ieee,
        BLOCK_M_=block_m, BLOCK_N_=block_n, num_warps=num_warps or (NUM_WARPS_FP32 if ieee else NUM_WARPS), num_stages=num_stages)
    return hi, lo, total, bad


def supports(q, k):
    """Whether the kernel takes these tensors."""
    D = q.shape[-1]
    return (q.is_cuda and q.dtype == k.dtype and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and D >= 16 and D & (D - 1) == 0)
