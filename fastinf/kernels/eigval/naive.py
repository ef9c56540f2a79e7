"""PyTorch reference for the EK-FAC eigenvalue pass (DESIGN.md §1, "EK-FAC").

out += Σ_d (Q_Sᵀ G_d Q_A)^∘2 with G_d = Σ_r grad[d, r] ⊗ act[d, r].
Rotates rows into the eigenbasis first or materialises every G_d, whichever costs fewer
multiply-adds (:func:`choose_route`); computes in float32, or float64 when ``out`` or an
input is float64.
"""

from __future__ import annotations

from typing import Literal

import torch

from .._inputs import compute_dtype

__all__ = ["choose_route", "eigval_accumulate"]


def choose_route(n_rows: int, d_in: int, d_out: int) -> Literal["rows", "summed"]:
    """Pick the cheaper way to rotate a factored gradient G = Σ_r b_r a_rᵀ.

    ``"rows"`` rotates every row first (a_r Q_A, b_r Q_S): R(d_in² + d_out²) multiply-adds.
    ``"summed"`` forms G and rotates it: d_out²·d_in + d_out·d_in². Both also pay
    R·d_out·d_in to contract over the R rows, so that term does not decide. Ties go to rows.

    Args:
        n_rows: R, rows per draw (positions).
        d_in: layer input dimension.
        d_out: layer output dimension.
    """
    rows_cost = n_rows * (d_in * d_in + d_out * d_out)
    summed_cost = d_out * d_in * (d_in + d_out)
    return "rows" if rows_cost <= summed_cost else "summed"


def eigval_accumulate(
    act: torch.Tensor,
    grad: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Add the squared eigenbasis coordinates of every draw's layer gradient to ``out``.

    Args:
        act: [D, R, d_in] layer inputs of D draws with R positions each.
        grad: [D, R, d_out] output gradients of the same rows.
        eigvecs_act: [d_in, d_in] Q_A, eigenvectors in columns.
        eigvecs_grad: [d_out, d_out] Q_S, eigenvectors in columns.
        out: [d_out, d_in] float32 or float64 running sum, updated in place.

    Returns:
        ``out``.
    """
    dtype = compute_dtype(act, grad, eigvecs_act, eigvecs_grad, out)
    act, grad = act.to(dtype), grad.to(dtype)
    eigvecs_act, eigvecs_grad = eigvecs_act.to(dtype), eigvecs_grad.to(dtype)
    if choose_route(act.shape[1], act.shape[2], grad.shape[2]) == "rows":
        rotated = (grad @ eigvecs_grad).transpose(1, 2) @ (act @ eigvecs_act)
    else:
        grads = grad.transpose(1, 2) @ act  # [D, d_out, d_in]
        rotated = eigvecs_grad.T @ grads @ eigvecs_act
    out += rotated.square().sum(dim=0).to(out.dtype)
    return out
