"""The Triton kernels of Kitsune's flash attention (kitsune.ops.flash_attention
launches them; its module docstring says what they compute).

The head dims D and Dv are compile-time constants (a kernel per head dim, as with
the block sizes): a mask `d < D` with D known folds away where D is the block's
width, and the loads along the head dim stay vectorised.

All tensors arrive as 4-D [Z, H, L, D] views with their own strides (GQA: k and
v have HKV heads, query head h reads kv head h // GROUP); bias and mask arrive
expanded to the score shape [Z, H, LQ, LK], so a broadcast dimension has
stride 0 and nothing dense is ever made. Scores are computed in natural units
(s = q.k * scale + bias) and exponentiated as exp2((s - m) * LOG2E): scaling
the scores themselves by log2(e) would overflow a finite float32 `mask_fill`
(finfo(float32).min) to -inf and change its meaning.

Forward: one program per (query tile, batch x head); keys in tiles with the
online softmax (running max m, running sum l, float32 accumulator), the row's
(m, log2(l)) kept for the backward. Backward (FlashAttention-2): a
preprocess for delta = rowsum(dO * O); one program per (key tile, batch x kv
head) for dk and dv, looping over every query head of its group and every
query tile, so the GQA sum happens in registers without atomics (and d-bias,
when asked, is written once per score with no atomics either); one program per
(query tile, batch x head) for dq. Dropout keeps p where Philox's number for the
score's place is >= dropout_p (tl.rand, seeded per call: the same seed gives the
same dropout). Atomics would let dq share the dk/dv pass,
but float atomics make the gradients non-deterministic.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Triton's interpreter multiplies bfloat16 blocks wrongly (their raw bits; 3.9): there
# they are widened to float32 first, which is exact. A GPU never takes that branch.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(q, k_t, rows, cols, bias_ptrs, mask_ptrs, LQ, LK, scale, mask_fill,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile of scores, in the order of the formula: q.k * scale,
    + bias, causal -inf, mask's fill (a `where`, so a finite fill replaces even -inf),
    then -inf past the last key (a padded key is never a key, whatever the fill)."""
    s = _dot(q, k_t, PRECISION) * scale
    inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=inside, other=0.0).to(tl.float32)
    if CAUSAL:
        s = tl.where(cols[None, :] > rows[:, None], float("-inf"), s)
    if HAS_MASK:
        keep = tl.load(mask_ptrs, mask=inside, other=1) != 0
        s = tl.where(keep, s, mask_fill)
    return tl.where(cols[None, :] < LK, s, float("-inf"))


@triton.jit
def _dropout_keep(Seed, zh, rows, cols, LK, dropout_p):
    """Which probabilities dropout keeps: Philox (tl.rand) keyed by the call's seed and the
    (batch x head), counted by the score's place (i * Lk + j), so the forward and both
    backward programs draw the same numbers whatever their tiles."""
    seed = tl.load(Seed) + zh
    return tl.rand(seed, rows[:, None] * LK + cols[None, :]) >= dropout_p


@triton.jit
def _kept_grad(ds, mask_ptrs, rows, cols, LQ, LK, HAS_MASK: tl.constexpr):
    """ds with the masked scores' gradient zeroed: a filled score does not depend on q, k or bias."""
    if HAS_MASK:
        inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
        keep = tl.load(mask_ptrs, mask=inside, other=1) != 0
        ds = tl.where(keep, ds, 0.0)
    return ds


@triton.jit
def _forward_tiles(acc, m_i, l_i, q, start_n0, end_n, rows, k_base, v_base, bias_base, mask_base,
                   skn, skd, svn, svd, sbn, smn, LQ, LK, D: tl.constexpr, DV: tl.constexpr, scale, mask_fill,
                   dropout_p, Seed, zh,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online softmax over the key tiles start_n0.. end_n of one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start_n0, end_n, BLOCK_N):
        cols = start_n + offs_n
        k_t = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                      mask=(cols[None, :] < LK) & (offs_d[:, None] < D), other=0.0)
        s = _scores(q, k_t, rows, cols, bias_base + cols[None, :] * sbn, mask_base + cols[None, :] * smn,
                    LQ, LK, scale, mask_fill, HAS_BIAS, HAS_MASK, CAUSAL, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no finite score yet subtracts 0, not -inf (-inf - -inf is NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's sum is of the probabilities before dropout
        if DROPOUT:
            p = tl.where(_dropout_keep(Seed, zh, rows, cols, LK, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(cols[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_forward_kernel(
        Q, K, V, Bias, Mask, Out, Stats, Seed,
        sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd, soz, soh, som, sod,
        sbz, sbh, sbm, sbn, smz, smh, smm, smn,
        H, GROUP, LQ, LK, D: tl.constexpr, DV: tl.constexpr, scale, mask_fill, dropout_p,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SKIP_FUTURE: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    z, h = zh // H, zh % H
    kvh = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + z * sqz + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(rows[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
    k_base = K + z * skz + kvh * skh
    v_base = V + z * svz + kvh * svh
    bias_base = Bias + z * sbz + h * sbh + rows[:, None] * sbm
    mask_base = Mask + z * smz + h * smh + rows[:, None] * smm
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if SKIP_FUTURE:
        # key tiles wholly before the tile's first query need no causal test, the diagonal ones
        # do, and keys past its last query are all masked: never loaded
        past = tl.minimum(LK, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        acc, m_i, l_i = _forward_tiles(
            acc, m_i, l_i, q, 0, past, rows, k_base, v_base, bias_base, mask_base, skn, skd, svn, svd, sbn, smn,
            LQ, LK, D, DV, scale, mask_fill, dropout_p, Seed, zh, HAS_BIAS, HAS_MASK, False, DROPOUT, PRECISION,
            BLOCK_N, BLOCK_D, BLOCK_DV)
        acc, m_i, l_i = _forward_tiles(
            acc, m_i, l_i, q, past, tl.minimum(LK, (pid_m + 1) * BLOCK_M), rows, k_base, v_base, bias_base,
            mask_base, skn, skd, svn, svd, sbn, smn, LQ, LK, D, DV, scale, mask_fill, dropout_p, Seed, zh,
            HAS_BIAS, HAS_MASK, True, DROPOUT, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        acc, m_i, l_i = _forward_tiles(
            acc, m_i, l_i, q, 0, LK, rows, k_base, v_base, bias_base, mask_base, skn, skd, svn, svd, sbn, smn,
            LQ, LK, D, DV, scale, mask_fill, dropout_p, Seed, zh, HAS_BIAS, HAS_MASK, CAUSAL, DROPOUT, PRECISION,
            BLOCK_N, BLOCK_D, BLOCK_DV)
    out = acc / l_i[:, None]  # 0 / 0: a row with every score -inf is NaN, as eager's softmax
    tl.store(Out + z * soz + h * soh + rows[:, None] * som + offs_dv[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < LQ) & (offs_dv[None, :] < DV))
    # (max, log2 of the sum) rather than their sum, the log-sum-exp: a finite fill of
    # finfo.min as max would swallow log(sum) (a fully masked row would lose its 1 / Lk)
    tl.store(Stats + (zh * LQ + rows) * 2, m_i, mask=rows < LQ)
    tl.store(Stats + (zh * LQ + rows) * 2 + 1, tl.log2(l_i), mask=rows < LQ)


@triton.jit
def attention_delta_kernel(Out, Grad, Delta, H, LQ, DV: tl.constexpr,
                           soz, soh, som, sod, sgz, sgh, sgm, sgd,
                           BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[z, h, i] = sum_d dO * O (float32): the softmax backward's row term."""
    pid_m = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    z, h = zh // H, zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (rows[:, None] < LQ) & (offs_dv[None, :] < DV)
    o = tl.load(Out + z * soz + h * soh + rows[:, None] * som + offs_dv[None, :] * sod, mask=inside, other=0.0)
    g = tl.load(Grad + z * sgz + h * sgh + rows[:, None] * sgm + offs_dv[None, :] * sgd, mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    tl.store(Delta + zh * LQ + rows, delta, mask=rows < LQ)


@triton.jit
def _dkdv_tiles(dk, dv, k_t, v_t, start_m0, end_m, cols, zh, q_base, grad_base, bias_base, mask_base,
                Stats, Delta, Seed, DBias, sqm, sqd, sgm, sgd, sbm, smm, LQ, LK, D: tl.constexpr, DV: tl.constexpr,
                scale, mask_fill, dropout_p,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                STORE_DBIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk's and dv's sums over the query tiles start_m0.. end_m of one query head, for one key tile."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(start_m0, end_m, BLOCK_M):
        rows = start + offs_m
        q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=(rows[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
        do = tl.load(grad_base + rows[:, None] * sgm + offs_dv[None, :] * sgd,
                     mask=(rows[:, None] < LQ) & (offs_dv[None, :] < DV), other=0.0)
        row_max = tl.load(Stats + (zh * LQ + rows) * 2, mask=rows < LQ, other=0.0)
        log2_sum = tl.load(Stats + (zh * LQ + rows) * 2 + 1, mask=rows < LQ, other=0.0)
        delta = tl.load(Delta + zh * LQ + rows, mask=rows < LQ, other=0.0)
        mask_ptrs = mask_base + rows[:, None] * smm
        s = _scores(q, k_t, rows, cols, bias_base + rows[:, None] * sbm, mask_ptrs, LQ, LK, scale, mask_fill,
                    HAS_BIAS, HAS_MASK, CAUSAL, PRECISION)
        # -inf - -inf: a fully masked row stays NaN, as eager's
        p = tl.exp2((s - row_max[:, None]) * LOG2E - log2_sum[:, None])
        if DROPOUT:  # out = dropout(p) @ v: dv sees the kept, rescaled p; dp flows back through the same
            keep = _dropout_keep(Seed, zh, rows, cols, LK, dropout_p)
            dv += _dot(tl.trans(tl.where(keep, p / (1.0 - dropout_p), 0.0).to(do.dtype)), do, PRECISION)
            dp = tl.where(keep, _dot(do, v_t, PRECISION) / (1.0 - dropout_p), 0.0)
        else:
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
            dp = _dot(do, v_t, PRECISION)
        ds = _kept_grad(p * (dp - delta[:, None]), mask_ptrs, rows, cols, LQ, LK, HAS_MASK)
        if STORE_DBIAS:
            tl.store(DBias + (zh * LQ + rows[:, None]) * LK + cols[None, :], ds,
                     mask=(rows[:, None] < LQ) & (cols[None, :] < LK))
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    return dk, dv


@triton.jit
def attention_dkdv_kernel(
        Q, K, V, Bias, Mask, Grad, Stats, Delta, Seed, DK, DV_, DBias,
        sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd, sgz, sgh, sgm, sgd,
        sbz, sbh, sbm, sbn, smz, smh, smm, smn, sdkz, sdkh, sdkn, sdkd, sdvz, sdvh, sdvn, sdvd,
        H, HKV, GROUP, LQ, LK, D: tl.constexpr, DV: tl.constexpr, scale, mask_fill, dropout_p,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SKIP_FUTURE: tl.constexpr,
        DROPOUT: tl.constexpr, STORE_DBIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    zkh = tl.program_id(1).to(tl.int64)
    z, kvh = zkh // HKV, zkh % HKV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + z * skz + kvh * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                mask=(cols[:, None] < LK) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + z * svz + kvh * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                mask=(cols[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
    k_t = tl.trans(k)
    v_t = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(GROUP):  # the query heads reading this kv head: GQA's sum, in registers
        h = kvh * GROUP + g
        zh = z * H + h
        q_base = Q + z * sqz + h * sqh
        grad_base = Grad + z * sgz + h * sgh
        bias_base = Bias + z * sbz + h * sbh + cols[None, :] * sbn
        mask_base = Mask + z * smz + h * smh + cols[None, :] * smn
        if SKIP_FUTURE:
            # queries before the tile's first key see none of its keys: skipped; query tiles
            # crossing the diagonal need the causal test, those wholly after it do not
            start_m = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
            after = start_m + tl.cdiv((pid_n + 1) * BLOCK_N - start_m, BLOCK_M) * BLOCK_M
            dk, dv = _dkdv_tiles(
                dk, dv, k_t, v_t, start_m, tl.minimum(after, LQ), cols, zh, q_base, grad_base, bias_base, mask_base,
                Stats, Delta, Seed, DBias, sqm, sqd, sgm, sgd, sbm, smm, LQ, LK, D, DV, scale, mask_fill, dropout_p,
                HAS_BIAS, HAS_MASK, True, DROPOUT, STORE_DBIAS, PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV)
            dk, dv = _dkdv_tiles(
                dk, dv, k_t, v_t, after, LQ, cols, zh, q_base, grad_base, bias_base, mask_base,
                Stats, Delta, Seed, DBias, sqm, sqd, sgm, sgd, sbm, smm, LQ, LK, D, DV, scale, mask_fill, dropout_p,
                HAS_BIAS, HAS_MASK, False, DROPOUT, STORE_DBIAS, PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV)
        else:
            dk, dv = _dkdv_tiles(
                dk, dv, k_t, v_t, 0, LQ, cols, zh, q_base, grad_base, bias_base, mask_base,
                Stats, Delta, Seed, DBias, sqm, sqd, sgm, sgd, sbm, smm, LQ, LK, D, DV, scale, mask_fill, dropout_p,
                HAS_BIAS, HAS_MASK, CAUSAL, DROPOUT, STORE_DBIAS, PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV)
    tl.store(DK + z * sdkz + kvh * sdkh + cols[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=(cols[:, None] < LK) & (offs_d[None, :] < D))
    tl.store(DV_ + z * sdvz + kvh * sdvh + cols[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=(cols[:, None] < LK) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tiles(dq, q, do, row_max, log2_sum, delta, start_n0, end_n, rows, k_base, v_base, bias_base, mask_base,
              skn, skd, svn, svd, sbn, smn, LQ, LK, D: tl.constexpr, DV: tl.constexpr, scale, mask_fill,
              dropout_p, Seed, zh,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq's sum over the key tiles start_n0.. end_n of one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start_n0, end_n, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                    mask=(cols[:, None] < LK) & (offs_d[None, :] < D), other=0.0)
        v_t = tl.load(v_base + cols[None, :] * svn + offs_dv[:, None] * svd,
                      mask=(cols[None, :] < LK) & (offs_dv[:, None] < DV), other=0.0)
        mask_ptrs = mask_base + cols[None, :] * smn
        s = _scores(q, tl.trans(k), rows, cols, bias_base + cols[None, :] * sbn, mask_ptrs,
                    LQ, LK, scale, mask_fill, HAS_BIAS, HAS_MASK, CAUSAL, PRECISION)
        p = tl.exp2((s - row_max[:, None]) * LOG2E - log2_sum[:, None])
        dp = _dot(do, v_t, PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(Seed, zh, rows, cols, LK, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = _kept_grad(p * (dp - delta[:, None]), mask_ptrs, rows, cols, LQ, LK, HAS_MASK)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def attention_dq_kernel(
        Q, K, V, Bias, Mask, Grad, Stats, Delta, Seed, DQ,
        sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd, sgz, sgh, sgm, sgd,
        sbz, sbh, sbm, sbn, smz, smh, smm, smn, sdqz, sdqh, sdqm, sdqd,
        H, GROUP, LQ, LK, D: tl.constexpr, DV: tl.constexpr, scale, mask_fill, dropout_p,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SKIP_FUTURE: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    z, h = zh // H, zh % H
    kvh = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + z * sqz + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(rows[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(Grad + z * sgz + h * sgh + rows[:, None] * sgm + offs_dv[None, :] * sgd,
                 mask=(rows[:, None] < LQ) & (offs_dv[None, :] < DV), other=0.0)
    row_max = tl.load(Stats + (zh * LQ + rows) * 2, mask=rows < LQ, other=0.0)
    log2_sum = tl.load(Stats + (zh * LQ + rows) * 2 + 1, mask=rows < LQ, other=0.0)
    delta = tl.load(Delta + zh * LQ + rows, mask=rows < LQ, other=0.0)
    k_base = K + z * skz + kvh * skh
    v_base = V + z * svz + kvh * svh
    bias_base = Bias + z * sbz + h * sbh + rows[:, None] * sbm
    mask_base = Mask + z * smz + h * smh + rows[:, None] * smm
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SKIP_FUTURE:  # as the forward: past tiles without the causal test, diagonal ones with it, no future
        past = tl.minimum(LK, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        dq = _dq_tiles(dq, q, do, row_max, log2_sum, delta, 0, past, rows, k_base, v_base, bias_base, mask_base,
                       skn, skd, svn, svd, sbn, smn, LQ, LK, D, DV, scale, mask_fill, dropout_p, Seed, zh,
                       HAS_BIAS, HAS_MASK, False, DROPOUT, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
        dq = _dq_tiles(dq, q, do, row_max, log2_sum, delta, past, tl.minimum(LK, (pid_m + 1) * BLOCK_M), rows,
                       k_base, v_base, bias_base, mask_base, skn, skd, svn, svd, sbn, smn, LQ, LK, D, DV, scale,
                       mask_fill, dropout_p, Seed, zh, HAS_BIAS, HAS_MASK, True, DROPOUT, PRECISION,
                       BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        dq = _dq_tiles(dq, q, do, row_max, log2_sum, delta, 0, LK, rows, k_base, v_base, bias_base, mask_base,
                       skn, skd, svn, svd, sbn, smn, LQ, LK, D, DV, scale, mask_fill, dropout_p, Seed, zh,
                       HAS_BIAS, HAS_MASK, CAUSAL, DROPOUT, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
    tl.store(DQ + z * sdqz + h * sdqh + rows[:, None] * sdqm + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < LQ) & (offs_d[None, :] < D))
