"""Triton EK-FAC eigenvalue pass: out += Σ_d (Q_Sᵀ G_d Q_A)^∘2 without forming any G_d.

Plan:

* The rows of every draw are projected first by two GEMMs, act Q_A [D, R, d_in] and
  grad Q_S [D, R, d_out] (input-sized); then (Q_Sᵀ G_d Q_A)[o, i] = Σ_r (grad_d Q_S)[r, o] ·
  (act_d Q_A)[r, i]. Forming G_d and projecting it is cheaper when R is large, but needs
  G_d whole before any tile of its projection exists, so the rows route is the only one
  that never materialises G_d.
* ``_eigval_kernel``: program (tile, split) owns a [BLOCK_O, BLOCK_I] tile of Λ and a
  contiguous range of draws; per draw it forms the projected tile by a ``tl.dot`` chain
  over R and adds its square to a register accumulator.
* Accumulation: every program writes its tile once into partial[n_split, d_out, d_in]
  (float32); the launcher adds the fixed-order sum over splits to ``out`` in out's dtype.
  No atomics, so the pass is bitwise reproducible run to run on one device.
* Precision: as in :mod:`fastinf.kernels.score.triton_impl` (float32 operands,
  ``dot_precision()`` on GPU, int64 offsets along draws).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, split_count
from ..dispatch import dot_precision

__all__ = ["eigval_accumulate"]

BLOCK_O = 32
BLOCK_I = 32
BLOCK_K = 32
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _eigval_kernel(
    lhs_ptr,
    rhs_ptr,
    partial_ptr,
    n_d,
    n_r,
    d_out,
    d_in,
    draws_per_split,
    s_ld,
    s_lr,
    s_lo,
    s_rd,
    s_rr,
    s_ri,
    s_ps,
    s_po,
    s_pi,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    n_ti = tl.cdiv(d_in, BLOCK_I)
    i_o = i_t // n_ti
    i_i = i_t % n_ti
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_o = o_o < d_out
    m_i = o_i < d_in

    d_lo = i_s * draws_per_split
    d_hi = tl.minimum(d_lo + draws_per_split, n_d)
    # [BLOCK_O, BLOCK_I]
    b_acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    p_l = lhs_ptr + d_lo.to(tl.int64) * s_ld
    p_r = rhs_ptr + d_lo.to(tl.int64) * s_rd
    for _ in range(d_lo, d_hi):
        b_p = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, n_r, BLOCK_K):
            o_r = r0 + tl.arange(0, BLOCK_K)
            m_r = o_r < n_r
            # [BLOCK_O, BLOCK_K]
            b_l = tl.load(
                p_l + o_r[None, :].to(tl.int64) * s_lr + o_o[:, None] * s_lo,
                mask=m_o[:, None] & m_r[None, :],
                other=0.0,
            )
            # [BLOCK_K, BLOCK_I]
            b_r = tl.load(
                p_r + o_r[:, None].to(tl.int64) * s_rr + o_i[None, :] * s_ri,
                mask=m_r[:, None] & m_i[None, :],
                other=0.0,
            )
            b_p = tl.dot(b_l, b_r, b_p, input_precision=DOT_PRECISION)
        b_acc += b_p * b_p
        p_l += s_ld
        p_r += s_rd

    p_out = partial_ptr + i_s.to(tl.int64) * s_ps + o_o[:, None] * s_po + o_i[None, :] * s_pi
    tl.store(p_out, b_acc, mask=m_o[:, None] & m_i[None, :])


def eigval_accumulate(
    act: torch.Tensor,
    grad: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Triton version of :func:`fastinf.kernels.eigval.naive.eigval_accumulate`.

    Squares are computed and summed in float32; the sum is added to ``out`` in out's dtype.
    """
    n_d, n_r, d_in = act.shape
    d_out = grad.shape[2]
    if n_d == 0 or out.numel() == 0:
        return out
    act_hat = act.to(torch.float32) @ eigvecs_act.to(torch.float32)  # [D, R, d_in]
    grad_hat = grad.to(torch.float32) @ eigvecs_grad.to(torch.float32)  # [D, R, d_out]
    n_tiles = cdiv(d_out, BLOCK_O) * cdiv(d_in, BLOCK_I)
    n_split = split_count(out.device, n_tiles, n_d)
    draws_per_split = cdiv(n_d, n_split)
    n_split = cdiv(n_d, draws_per_split)  # no split without draws
    partial = torch.empty(n_split, d_out, d_in, dtype=torch.float32, device=out.device)
    _eigval_kernel[(n_tiles, n_split)](
        grad_hat,
        act_hat,
        partial,
        n_d,
        n_r,
        d_out,
        d_in,
        draws_per_split,
        *grad_hat.stride(),
        *act_hat.stride(),
        *partial.stride(),
        BLOCK_O=BLOCK_O,
        BLOCK_I=BLOCK_I,
        BLOCK_K=BLOCK_K,
        DOT_PRECISION=dot_precision(),
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    out += partial.sum(dim=0, dtype=out.dtype)
    return out
