"""Triton scoring against cached queries, tile by tile, by one kernel: in the eigenbasis,
scores = Σ_{o,i} (Q_Sᵀ G_b Q_A) ∘ W ∘ Q̂_q, and in parameter space, scores = Σ_{o,i} G_b ∘ V_q.

Plan (one kernel, at most two cheap cuBLAS-side preparations):

* Every op reduces to a per-example bilinear form P̂_b[o, i] = Σ_k L_b[k, o] · R_b[k, i]:
  - ``rows``: L_b = grad_b Q_S [M, d_out], R_b = act_b Q_A [M, d_in], K = M;
  - ``summed`` / dense: with G_b formed (bmm), the larger projection is done by a GEMM and
    the smaller one in the kernel: L = Q_S shared (batch stride 0), R_b = G_b Q_A, K = d_out
    when d_out ≤ d_in; else L_b = (Q_Sᵀ G_b)ᵀ, R = Q_A shared, K = d_in.
  - ``score_params``: the raw rows, L_b = grad_b, R_b = act_b, K = M, and no W (the
    queries V_q = Q_S (Q̂_q ∘ W) Q_Aᵀ already carry the curvature): P̂_b = G_b, formed in
    registers and never written, with no projection GEMM at all.
  The row projections and G_b Q_A are input-sized ([B, M, d] or [B, d_out, d_in]); the
  projected gradient P̂_b never reaches global memory. Projecting rows inside every tile
  instead would redo act_b Q_A once per d_out block (d_out / BLOCK_O times), the dominant
  cost for conv layers, so the projections are left to one GEMM each.
* ``_bilinear_score_kernel``: program (example block, split) walks the (d_out, d_in) tiles
  t ≡ split (mod n_split). For each tile it forms P̂ ∘ W (P̂ alone when the constexpr
  ``HAS_WEIGHT`` is off) for BLOCK_B examples in registers (one 2-D ``tl.dot`` chain per
  example, scattered into a [BLOCK_B, BLOCK_O, BLOCK_I] tile), flattens it to
  [BLOCK_B, BLOCK_O·BLOCK_I] and contracts it with every query block by a second
  ``tl.dot`` against the matching Q̂ tile. P̂ ∘ W is built once per example and tile and
  reused by all queries.
* Accumulation: each program owns rows [split, example block, :] of a zeroed float32
  buffer partial[n_split, B, Q] (read-modify-write by that program only), and the launcher
  sums over splits in a fixed order. No atomics: scores are bitwise reproducible run to run
  on one device, and n_split stays small (≈ 4 programs per SM in all).
* Precision: operands are float32 (fp16/bf16 inputs, raw rows included, are upcast on
  load, which also avoids the interpreter's wrong bf16 ``tl.dot``); ``tl.dot`` uses
  :func:`~fastinf.kernels.dispatch.dot_precision` (default "tf32x3", ≈ float32) on GPU,
  exact float32 under the interpreter. Offsets along example and query dimensions are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, split_count
from ..dispatch import dot_precision
from .naive import Route, choose_route

__all__ = ["project_score", "project_score_dense", "score_params"]

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
def _bilinear_score_kernel(
    lhs_ptr,
    rhs_ptr,
    w_ptr,
    q_ptr,
    partial_ptr,
    n_b,
    n_k,
    d_out,
    d_in,
    n_q,
    s_lb,
    s_lk,
    s_lo,
    s_rb,
    s_rk,
    s_ri,
    s_wo,
    s_wi,
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
    HAS_WEIGHT: tl.constexpr,
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
        if HAS_WEIGHT:
            # [BLOCK_O, BLOCK_I]
            b_w = tl.load(
                w_ptr + o_o[:, None] * s_wo + o_i[None, :] * s_wi,
                mask=m_o[:, None] & m_i[None, :],
                other=0.0,
            ).to(tl.float32)

        # [BLOCK_B, BLOCK_O, BLOCK_I]: P̂_b (∘ W) for the examples of this block; padded
        # entries are zero because the L and R loads are masked
        b_a = tl.zeros([BLOCK_B, BLOCK_O, BLOCK_I], dtype=tl.float32)
        p_l = lhs_ptr + b0.to(tl.int64) * s_lb
        p_r = rhs_ptr + b0.to(tl.int64) * s_rb
        for j in range(0, n_j):
            b_p = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
            for k0 in range(0, n_k, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < n_k
                # [BLOCK_O, BLOCK_K]
                b_l = tl.load(
                    p_l + o_k[None, :].to(tl.int64) * s_lk + o_o[:, None] * s_lo,
                    mask=m_o[:, None] & m_k[None, :],
                    other=0.0,
                ).to(tl.float32)
                # [BLOCK_K, BLOCK_I]
                b_r = tl.load(
                    p_r + o_k[:, None].to(tl.int64) * s_rk + o_i[None, :] * s_ri,
                    mask=m_k[:, None] & m_i[None, :],
                    other=0.0,
                ).to(tl.float32)
                b_p = tl.dot(b_l, b_r, b_p, input_precision=DOT_PRECISION)
            if HAS_WEIGHT:
                b_p = b_p * b_w
            b_a = tl.where(o_bl[:, None, None] == j, b_p[None, :, :], b_a)
            p_l += s_lb
            p_r += s_rb
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
            b_prev = tl.load(p_out, mask=m_out, other=0.0)
            tl.store(p_out, b_prev + b_s, mask=m_out)


def _bilinear_score(
    lhs: torch.Tensor,
    lhs_strides: tuple[int, int, int],
    rhs: torch.Tensor,
    rhs_strides: tuple[int, int, int],
    n_b: int,
    n_k: int,
    inv_damped: torch.Tensor | None,
    queries: torch.Tensor,
) -> torch.Tensor:
    """scores[b, q] = Σ_{o,i} (Σ_k L_b[k,o] R_b[k,i]) · W[o,i] · Q̂[q,o,i].

    Args:
        lhs, rhs: storage of L and R (float32, float16 or bfloat16; upcast on load);
            ``*_strides`` are their (batch, k, o|i) element strides (batch stride 0 for an
            operand shared by all examples).
        n_b: B; n_k: K.
        inv_damped: [d_out, d_in] W, or None for W = 1 (the kernel skips the multiply).
        queries: [Q, d_out, d_in] Q̂ (or V for parameter-space queries).

    Returns:
        [B, Q] float32 scores.
    """
    n_q, d_out, d_in = queries.shape
    if n_b == 0 or n_q == 0:
        return torch.zeros(n_b, n_q, dtype=torch.float32, device=queries.device)
    n_bblocks = cdiv(n_b, BLOCK_B)
    n_tiles = cdiv(d_out, BLOCK_O) * cdiv(d_in, BLOCK_I)
    n_split = split_count(queries.device, n_bblocks, n_tiles)
    partial = torch.zeros(n_split, n_b, n_q, dtype=torch.float32, device=queries.device)
    _bilinear_score_kernel[(n_bblocks, n_split)](
        lhs,
        rhs,
        inv_damped,
        queries,
        partial,
        n_b,
        n_k,
        d_out,
        d_in,
        n_q,
        *lhs_strides,
        *rhs_strides,
        *(inv_damped.stride() if inv_damped is not None else (0, 0)),
        *queries.stride(),
        *partial.stride(),
        BLOCK_B=BLOCK_B,
        BLOCK_O=BLOCK_O,
        BLOCK_I=BLOCK_I,
        BLOCK_K=BLOCK_K,
        BLOCK_Q=BLOCK_Q,
        HAS_WEIGHT=inv_damped is not None,
        DOT_PRECISION=dot_precision(),
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return partial[0] if n_split == 1 else partial.sum(dim=0)


def project_score(
    act: torch.Tensor,
    grad: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    inv_damped: torch.Tensor,
    queries: torch.Tensor,
    *,
    route: Route | None = None,
) -> torch.Tensor:
    """Triton version of :func:`fastinf.kernels.score.naive.project_score` (same contract).

    Returns float32 scores [B, Q].
    """
    n_b, n_rows, d_in = act.shape
    d_out = grad.shape[2]
    route = route or choose_route(n_rows, d_in, d_out)
    act, grad = act.to(torch.float32), grad.to(torch.float32)
    if route == "summed":
        grads = grad.transpose(1, 2) @ act  # [B, d_out, d_in]
        return project_score_dense(grads, eigvecs_act, eigvecs_grad, inv_damped, queries)
    act_hat = act @ eigvecs_act.to(torch.float32)  # [B, M, d_in]
    grad_hat = grad @ eigvecs_grad.to(torch.float32)  # [B, M, d_out]
    return _bilinear_score(
        grad_hat,
        grad_hat.stride(),
        act_hat,
        act_hat.stride(),
        n_b,
        n_rows,
        inv_damped,
        queries,
    )


def project_score_dense(
    grads: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    inv_damped: torch.Tensor,
    queries: torch.Tensor,
) -> torch.Tensor:
    """Triton version of :func:`fastinf.kernels.score.naive.project_score_dense`.

    Returns float32 scores [B, Q].
    """
    n_b, d_out, d_in = grads.shape
    grads = grads.to(torch.float32)
    eigvecs_act = eigvecs_act.to(torch.float32)
    eigvecs_grad = eigvecs_grad.to(torch.float32)
    if d_out <= d_in:
        # kernel K = d_out: P̂_b[o, i] = Σ_k Q_S[k, o] (G_b Q_A)[k, i]
        half = grads @ eigvecs_act
        lhs, lhs_strides = eigvecs_grad, (0, *eigvecs_grad.stride())
        rhs, rhs_strides = half, half.stride()
        n_k = d_out
    else:
        # kernel K = d_in: P̂_b[o, i] = Σ_k (Q_Sᵀ G_b)[o, k] Q_A[k, i]
        half = eigvecs_grad.T @ grads
        lhs, lhs_strides = half, (half.stride(0), half.stride(2), half.stride(1))
        rhs, rhs_strides = eigvecs_act, (0, *eigvecs_act.stride())
        n_k = d_in
    return _bilinear_score(lhs, lhs_strides, rhs, rhs_strides, n_b, n_k, inv_damped, queries)


def score_params(act: torch.Tensor, grad: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`fastinf.kernels.score.naive.score_params` (same contract).

    The raw rows go to the kernel as they are (any strides, float32/16 or bfloat16), with
    L_b = grad_b, R_b = act_b, K = M and the W multiply switched off.

    Returns float32 scores [B, Q].
    """
    n_b, n_rows, _ = act.shape
    return _bilinear_score(grad, grad.stride(), act, act.stride(), n_b, n_rows, None, queries)
