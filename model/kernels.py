"""Triton kernels for the MoE decode path: fused experts and the skip rule.

Both are written for small batches (decoding): no host synchronisation, no data-dependent
shapes, so a whole decode step can be captured in one CUDA graph.

Fused experts (layout of transformers 5.x: gate_up_proj (E, 2I, H), down_proj (E, H, I)):
one program per (expert, output block). A program first reads the routing of all S = T * K
(token, slot) pairs (a few hundred bytes) and returns at once when no pair is routed to its
expert, so an expert that no token uses costs no weight reads; skipped slots (the "no expert"
sentinel index >= E, or weight 0) match no expert. Otherwise it reads its expert's weight tile
exactly once and multiplies it with every pair routed to that expert (tl.dot over S rows,
padded to >= 16; pairs of other experts are masked to zero). Decoding is memory bound: at S
<= 128 the wasted multiply-adds on masked rows (< S FLOP per weight byte) stay below the
H200's ~165 FLOP/byte ridge, so they cost no time, and nothing needs sorting.

    gate_up kernel: act[s, i]  = act_fn(x[t] . Wg[e, i]) * (x[t] . Wu[e, i])     (+ biases)
    down kernel:    y[s, h]    = w[s] * (act[s] . Wd[e, h])                        (+ bias)
    then out[t] = sum_k y[t * K + k]   (float32, one torch op; deterministic, no atomics)

At batch 1 only one or two experts are active, so the down kernel also splits its reduction
(I) into SPLIT slices, each a program writing a partial sum that the combine adds: otherwise
fewer programs than SMs would run and bandwidth would not scale with the experts read.

The skip kernel applies the paper's rule (Sec. 3.2) to one router output in one launch:
slot j of rank >= 2 (ranked by the router's choice scores) is skipped when w_j < beta_j * w_1;
skipped slots get the sentinel index and weight 0, a renormalising router rescales the kept
weights to its total (routed_scaling_factor), and the per-layer counters (tokens, skipped
slots) are incremented on the device.

`TRITON_INTERPRET=1` runs the same kernels on the CPU (tests do, on small shapes). The
interpreter's tl.dot mishandles bfloat16 tiles (numpy has no bfloat16), so there UPCAST turns
the tiles to float32 first: a product of two bfloat16 numbers is exact in float32 and the
accumulation is float32 either way, so the arithmetic is the GPU's up to summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def gate_up_kernel(
    x_ptr, idx_ptr, w_ptr, gu_ptr, gub_ptr, act_ptr,
    H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    e = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = tl.arange(0, S_PAD)  # slot s = t * K + k
    ids = tl.load(idx_ptr + rows, mask=rows < S, other=E)
    wts = tl.load(w_ptr + rows, mask=rows < S, other=0.0)
    match = (ids == e) & (wts != 0.0)  # (S_PAD,)
    if tl.max(match.to(tl.int32), axis=0) == 0:
        return  # no pair routed here: this expert's weights are never read
    tok = (rows // K).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
    mask_i = offs_i < I
    base = e.to(tl.int64) * (2 * I * H)
    acc_g = tl.zeros((S_PAD, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((S_PAD, BLOCK_I), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        xt = tl.load(x_ptr + tok[:, None] * H + offs_h[None, :], mask=match[:, None] & mask_h[None, :], other=0.0)
        wmask = mask_i[:, None] & mask_h[None, :]
        wg = tl.load(gu_ptr + base + offs_i[:, None] * H + offs_h[None, :], mask=wmask, other=0.0)  # (BLOCK_I, BLOCK_H)
        wu = tl.load(gu_ptr + base + (I + offs_i[:, None]) * H + offs_h[None, :], mask=wmask, other=0.0)
        if UPCAST:
            xt, wg, wu = xt.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        if IEEE:
            acc_g += tl.dot(xt, tl.trans(wg), input_precision="ieee")
            acc_u += tl.dot(xt, tl.trans(wu), input_precision="ieee")
        else:
            acc_g += tl.dot(xt, tl.trans(wg))
            acc_u += tl.dot(xt, tl.trans(wu))
    if HAS_BIAS:
        bg = tl.load(gub_ptr + e.to(tl.int64) * (2 * I) + offs_i, mask=mask_i, other=0.0).to(tl.float32)
        bu = tl.load(gub_ptr + e.to(tl.int64) * (2 * I) + I + offs_i, mask=mask_i, other=0.0).to(tl.float32)
        acc_g += bg[None, :]
        acc_u += bu[None, :]
    act = _silu(acc_g) * acc_u
    tl.store(act_ptr + rows[:, None].to(tl.int64) * I + offs_i[None, :], act.to(act_ptr.dtype.element_ty),
             mask=match[:, None] & mask_i[None, :])


@triton.jit
def down_kernel(
    act_ptr, idx_ptr, w_ptr, d_ptr, db_ptr, y_ptr,
    H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_I: tl.constexpr,
    SPLIT: tl.constexpr,
):
    e = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)  # reduction slice: y holds SPLIT partial sums, added by the combine
    rows = tl.arange(0, S_PAD)
    ids = tl.load(idx_ptr + rows, mask=rows < S, other=E)
    wts = tl.load(w_ptr + rows, mask=rows < S, other=0.0).to(tl.float32)
    match = (ids == e) & (wts != 0.0)
    offs_h = pid_h * BLOCK_HO + tl.arange(0, BLOCK_HO)
    mask_h = offs_h < H
    out_ptrs = y_ptr + (split * S_PAD + rows[:, None]).to(tl.int64) * H + offs_h[None, :]
    if e == 0:  # skipped pairs match no expert: expert 0's programs write their zeros
        skipped = (rows < S) & ((ids >= E) | (ids < 0) | (wts == 0.0))
        tl.store(out_ptrs, tl.zeros((S_PAD, BLOCK_HO), dtype=tl.float32), mask=skipped[:, None] & mask_h[None, :])
    if tl.max(match.to(tl.int32), axis=0) == 0:
        return
    base = e.to(tl.int64) * (H * I)
    acc = tl.zeros((S_PAD, BLOCK_HO), dtype=tl.float32)
    CHUNK: tl.constexpr = tl.cdiv(tl.cdiv(I, SPLIT), BLOCK_I) * BLOCK_I
    for i0 in range(0, CHUNK, BLOCK_I):
        offs_i = split * CHUNK + i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        a = tl.load(act_ptr + rows[:, None].to(tl.int64) * I + offs_i[None, :], mask=match[:, None] & mask_i[None, :],
                    other=0.0)  # (S_PAD, BLOCK_I)
        wd = tl.load(d_ptr + base + offs_h[:, None] * I + offs_i[None, :], mask=mask_h[:, None] & mask_i[None, :],
                     other=0.0)  # (BLOCK_HO, BLOCK_I)
        if UPCAST:
            a, wd = a.to(tl.float32), wd.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, tl.trans(wd), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(wd))
    if HAS_BIAS and split == 0:
        acc += tl.load(db_ptr + e.to(tl.int64) * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    acc = acc * wts[:, None]
    tl.store(out_ptrs, acc, mask=match[:, None] & mask_h[None, :])


@triton.jit
def skip_kernel(
    w_ptr, s_ptr, idx_ptr, betas_ptr, w_out_ptr, idx_out_ptr, counts_ptr, T, scale,
    K: tl.constexpr, K_PAD: tl.constexpr, E: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """weights, choice scores, indices (T, K) -> skipped slots get (sentinel E, weight 0); counts += (tokens, skipped).

    Slots are ranked by the router's choice scores (ties to the lower slot, a stable sort), w_1 is the
    weight of the first choice; a renormalising router's kept weights are rescaled to sum to `scale`.
    """
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    k = tl.arange(0, K_PAD)  # (K_PAD,)
    mt = t < T
    mk = k < K
    m = mt[:, None] & mk[None, :]
    offs = t[:, None].to(tl.int64) * K + k[None, :]
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)  # (BLOCK_T, K_PAD)
    sc = tl.load(s_ptr + offs, mask=m, other=float("-inf")).to(tl.float32)
    ids = tl.load(idx_ptr + offs, mask=m, other=E)
    sj = sc[:, :, None]
    sl = sc[:, None, :]
    before = (sl > sj) | ((sl == sj) & (k[None, None, :] < k[None, :, None]))
    rank = tl.sum(before.to(tl.int32), axis=2)  # (BLOCK_T, K_PAD), 0 = the router's first choice
    w1 = tl.sum(tl.where(m & (rank == 0), w, 0.0), axis=1)  # (BLOCK_T,)
    beta = tl.load(betas_ptr + rank - 1, mask=m & (rank > 0), other=float("-inf"))  # beta of this rank
    skip = m & (rank > 0) & (w < beta * w1[:, None])
    kept = tl.where(skip, 0.0, w)
    if RENORM:
        any_skip = tl.sum(skip.to(tl.int32), axis=1) > 0
        kept = tl.where(any_skip[:, None], kept / tl.sum(kept, axis=1)[:, None] * scale, kept)
    tl.store(w_out_ptr + offs, kept.to(w_out_ptr.dtype.element_ty), mask=m)
    tl.store(idx_out_ptr + offs, tl.where(skip, E, ids).to(idx_out_ptr.dtype.element_ty), mask=m)
    tl.atomic_add(counts_ptr, tl.sum(mt.to(tl.int64), axis=0))
    tl.atomic_add(counts_ptr + 1, tl.sum(tl.sum(skip.to(tl.int64), axis=1), axis=0))
