"""Triton scoring against parameter-space queries, tile by tile: scores[b, q] =
Σ_{o,i} G_b[o, i] · V[q, o, i] with G_b = Σ_m grad[b, m] ⊗ act[b, m], never written.

Plan:

* ``_score_params_kernel``: program (example block, split) walks the (d_out, d_in) tiles
  t ≡ split (mod n_split). For each tile it forms G_b from the raw rows for BLOCK_B
  examples in registers (one 2-D ``tl.dot`` chain over M per example, scattered into a
  [BLOCK_B, BLOCK_O, BLOCK_I] tile), flattens it to [BLOCK_B, BLOCK_O·BLOCK_I] and
  contracts it with every query block by a second ``tl.dot`` against the matching V
  tile. G_b is built once per example and tile and reused by all queries; the queries
  already carry the curvature (V_q = Q_S (Q̂_q ∘ W) Q_Aᵀ), so no example is projected.
* Accumulation: each program owns rows [split, example block, :] of a float32 buffer
  partial[n_split, B, Q]; its first tile stores, later tiles read-modify-write (that
  program only), so the buffer needs no zeroing and every element of it is written. The
  launcher keeps n_split ≤ the number of tiles (every program has a first tile) and sums
  over splits in a fixed order. No atomics: scores are bitwise reproducible run to run on
  one device, and n_split stays small (≈ 4 programs per SM in all).
* Precision: operands are float32 (fp16/bf16 rows are upcast on load, which also avoids
  the interpreter's wrong bf16 ``tl.dot``); ``tl.dot`` uses
  :func:`~fastinf.kernels.dispatch.dot_precision` (default "tf32x3", ≈ float32) on GPU,
  exact float32 under the interpreter. Offsets along example and query dimensions are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, split_count
from ..dispatch import dot_precision

__all__ = ["score_params"]

# Untuned defaults chosen to stay well inside shared memory (≈ 100 KiB) on Ampere/Hopper;
# every tl.dot dimension is ≥ 16 as the GPU requires.
BLOCK_B = 16
BLOCK_O = 16
BLOCK_I = 16
BLOCK_K = 32
BLOCK_Q = 32
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _score_params_kernel(
    grad_ptr,
    act_ptr,
    q_ptr,
    partial_ptr,
    n_b,
    n_m,
    d_out,
    d_in,
    n_q,
    s_gb,
    s_gm,
    s_go,
    s_ab,
    s_am,
    s_ai,
    s_qq,
    s_qo,
    s_qi,
    s_ps,
    s_pb,
    s_pq,
    BLOCK_B: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    n_ti = tl.cdiv(d_in, BLOCK_I)
    n_tiles = tl.cdiv(d_out, BLOCK_O) * n_ti

    b0 = i_b * BLOCK_B
    n_j = tl.minimum(n_b - b0, BLOCK_B)
    o_bl = tl.arange(0, BLOCK_B)
    o_bg = (b0 + o_bl).to(tl.int64)
    m_b = o_bg < n_b
    o_f = tl.arange(0, BLOCK_O * BLOCK_I)

    for t in range(i_s, n_tiles, n_split):
        i_o = t // n_ti
        i_i = t % n_ti
        o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
        o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
        m_o = o_o < d_out
        m_i = o_i < d_in

        # [BLOCK_B, BLOCK_O, BLOCK_I]: G_b for the examples of this block; padded entries
        # are zero because the grad and act loads are masked
        b_a = tl.zeros([BLOCK_B, BLOCK_O, BLOCK_I], dtype=tl.float32)
        p_g = grad_ptr + b0.to(tl.int64) * s_gb
        p_a = act_ptr + b0.to(tl.int64) * s_ab
        for j in range(0, n_j):
            b_p = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
            for k0 in range(0, n_m, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < n_m
                # [BLOCK_O, BLOCK_K]
                b_g = tl.load(
                    p_g + o_k[None, :].to(tl.int64) * s_gm + o_o[:, None] * s_go,
                    mask=m_o[:, None] & m_k[None, :],
                    other=0.0,
                ).to(tl.float32)
                # [BLOCK_K, BLOCK_I]
                b_x = tl.load(
                    p_a + o_k[:, None].to(tl.int64) * s_am + o_i[None, :] * s_ai,
                    mask=m_k[:, None] & m_i[None, :],
                    other=0.0,
                ).to(tl.float32)
                b_p = tl.dot(b_g, b_x, b_p, input_precision=DOT_PRECISION)
            b_a = tl.where(o_bl[:, None, None] == j, b_p[None, :, :], b_a)
            p_g += s_gb
            p_a += s_ab
        # [BLOCK_B, BLOCK_O * BLOCK_I], row-major over (o, i) like the query offsets below
        b_af = tl.reshape(b_a, [BLOCK_B, BLOCK_O * BLOCK_I])

        o_fo = i_o * BLOCK_O + o_f // BLOCK_I
        o_fi = i_i * BLOCK_I + o_f % BLOCK_I
        m_f = (o_fo < d_out) & (o_fi < d_in)
        o_qf = o_fo.to(tl.int64) * s_qo + o_fi.to(tl.int64) * s_qi
        for q0 in range(0, n_q, BLOCK_Q):
            o_q = q0 + tl.arange(0, BLOCK_Q)
            m_q = o_q < n_q
            # [BLOCK_O * BLOCK_I, BLOCK_Q]
            b_q = tl.load(
                q_ptr + o_qf[:, None] + o_q[None, :].to(tl.int64) * s_qq,
                mask=m_f[:, None] & m_q[None, :],
                other=0.0,
            ).to(tl.float32)
            # [BLOCK_B, BLOCK_Q]
            b_s = tl.dot(b_af, b_q, input_precision=DOT_PRECISION)
            p_out = (
                partial_ptr
                + i_s.to(tl.int64) * s_ps
                + o_bg[:, None] * s_pb
                + o_q[None, :].to(tl.int64) * s_pq
            )
            m_out = m_b[:, None] & m_q[None, :]
            # the program's first tile (t == i_s) starts the sum: nothing to read back
            # (tl.where, not &: the interpreter rejects a block mask and-ed with a scalar)
            m_prev = tl.where(t != i_s, m_out, False)
            b_prev = tl.load(p_out, mask=m_prev, other=0.0)
            tl.store(p_out, b_prev + b_s, mask=m_out)


def score_params(act: torch.Tensor, grad: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`fastinf.kernels.score.naive.score_params` (same contract).

    The raw rows go to the kernel as they are (any strides, float32/16 or bfloat16).

    Returns float32 scores [B, Q].
    """
    n_b, n_m, d_in = act.shape
    n_q, d_out, _ = queries.shape
    if n_b == 0 or n_q == 0:
        return torch.empty(n_b, n_q, dtype=torch.float32, device=queries.device)
    if d_out == 0 or d_in == 0:
        # a layer without parameters: every score is an empty sum
        return torch.empty(n_b, n_q, dtype=torch.float32, device=queries.device).zero_()
    n_bblocks = cdiv(n_b, BLOCK_B)
    n_tiles = cdiv(d_out, BLOCK_O) * cdiv(d_in, BLOCK_I)
    n_split = split_count(queries.device, n_bblocks, n_tiles)
    partial = torch.empty(n_split, n_b, n_q, dtype=torch.float32, device=queries.device)
    _score_params_kernel[(n_bblocks, n_split)](
        grad,
        act,
        queries,
        partial,
        n_b,
        n_m,
        d_out,
        d_in,
        n_q,
        *grad.stride(),
        *act.stride(),
        *queries.stride(),
        *partial.stride(),
        BLOCK_B=BLOCK_B,
        BLOCK_O=BLOCK_O,
        BLOCK_I=BLOCK_I,
        BLOCK_K=BLOCK_K,
        BLOCK_Q=BLOCK_Q,
        DOT_PRECISION=dot_precision(),
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return partial[0] if n_split == 1 else partial.sum(dim=0)
