"""PyTorch reference for scoring against cached queries (DESIGN.md §1, "Identities that
make it fast").

scores[b, q] = Σ_{o,i} (Q_Sᵀ G_b Q_A)[o, i] · W[o, i] · Q̂[q, o, i]   (eigenbasis queries)
             = Σ_{o,i} G_b[o, i] · V[q, o, i]                       (parameter space)
with V_q = Q_S (Q̂_q ∘ W) Q_Aᵀ = (G + λI)⁻¹ ∇m_q.

This module is the reference imported by tests, benchmarks and the CPU path. It computes in
float32, or float64 when any input is float64, and materialises every intermediate.
"""

from __future__ import annotations

from typing import Literal

import torch

from .._inputs import compute_dtype

__all__ = [
    "ROUTES",
    "Route",
    "choose_route",
    "project_score",
    "project_score_dense",
    "score_params",
]

Route = Literal["rows", "summed"]
ROUTES: tuple[str, ...] = ("rows", "summed")


def choose_route(n_rows: int, d_in: int, d_out: int) -> Route:
    """Pick the cheaper way to project a factored per-example gradient G = Σ_m b_m a_mᵀ.

    ``"rows"`` projects every row first (a_m Q_A, b_m Q_S): M(d_in² + d_out²) multiply-adds.
    ``"summed"`` forms G and projects it: d_out²·d_in + d_out·d_in². Both also pay
    M·d_out·d_in to contract over the M rows, so that term does not decide. Ties go to rows.

    Args:
        n_rows: M, rows per example (positions × draws).
        d_in: layer input dimension.
        d_out: layer output dimension.
    """
    rows_cost = n_rows * (d_in * d_in + d_out * d_out)
    summed_cost = d_out * d_in * (d_in + d_out)
    return "rows" if rows_cost <= summed_cost else "summed"


def _contract(
    projected: torch.Tensor, inv_damped: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """scores[b, q] = Σ_{o,i} projected[b,o,i] · inv_damped[o,i] · queries[q,o,i]."""
    preconditioned = (projected * inv_damped).flatten(1)  # [B, d_out·d_in]
    return preconditioned @ queries.flatten(1).T


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
    """Score factored per-example gradients against preconditioned queries.

    Args:
        act: [B, M, d_in] layer inputs a_m of each example (M = positions × draws).
        grad: [B, M, d_out] output gradients b_m; G_b = Σ_m grad[b,m] ⊗ act[b,m].
        eigvecs_act: [d_in, d_in] Q_A, eigenvectors in columns.
        eigvecs_grad: [d_out, d_out] Q_S, eigenvectors in columns.
        inv_damped: [d_out, d_in] W = 1 / (Λ + λ).
        queries: [Q, d_out, d_in] query gradients in the eigenbasis, Q̂ = Q_Sᵀ ∇m Q_A.
        route: ``"rows"``, ``"summed"`` or ``None`` (:func:`choose_route`).

    Returns:
        [B, Q] scores τ(q, b) restricted to this layer; positive = proponent.
    """
    dtype = compute_dtype(act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries)
    act, grad = act.to(dtype), grad.to(dtype)
    eigvecs_act, eigvecs_grad = eigvecs_act.to(dtype), eigvecs_grad.to(dtype)
    route = route or choose_route(act.shape[1], act.shape[2], grad.shape[2])
    if route == "rows":
        projected = (grad @ eigvecs_grad).transpose(1, 2) @ (act @ eigvecs_act)
    elif route == "summed":
        grads = grad.transpose(1, 2) @ act  # [B, d_out, d_in]
        projected = eigvecs_grad.T @ grads @ eigvecs_act
    else:
        raise ValueError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)} or None")
    return _contract(projected, inv_damped.to(dtype), queries.to(dtype))


def project_score_dense(
    grads: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    inv_damped: torch.Tensor,
    queries: torch.Tensor,
) -> torch.Tensor:
    """Score materialised per-example gradients against preconditioned queries.

    Args:
        grads: [B, d_out, d_in] per-example layer gradients G_b.
        eigvecs_act, eigvecs_grad, inv_damped, queries: as for :func:`project_score`.

    Returns:
        [B, Q] scores.
    """
    dtype = compute_dtype(grads, eigvecs_act, eigvecs_grad, inv_damped, queries)
    projected = eigvecs_grad.to(dtype).T @ grads.to(dtype) @ eigvecs_act.to(dtype)
    return _contract(projected, inv_damped.to(dtype), queries.to(dtype))


def score_params(act: torch.Tensor, grad: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Score factored per-example gradients against queries preconditioned in parameter space.

    Args:
        act: [B, M, d_in] layer inputs a_m of each example (M = positions × draws).
        grad: [B, M, d_out] output gradients b_m; G_b = Σ_m grad[b,m] ⊗ act[b,m].
        queries: [Q, d_out, d_in] V_q = (G + λI)⁻¹ ∇m_q, laid out like G_b.

    Returns:
        [B, Q] scores τ(q, b) restricted to this layer; positive = proponent.
    """
    dtype = compute_dtype(act, grad, queries)
    grads = grad.to(dtype).transpose(1, 2) @ act.to(dtype)  # [B, d_out, d_in]
    return grads.flatten(1) @ queries.to(dtype).flatten(1).T
