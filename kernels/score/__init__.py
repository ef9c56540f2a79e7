"""Scoring per-example layer gradients against cached queries: project-and-score
(gradients → eigenbasis → ∘W → · Q̂_q) and its parameter-space form (G_b · V_q)."""

from __future__ import annotations

import torch

from .._inputs import check_float, check_shape
from ..dispatch import select
from .naive import ROUTES, Route, choose_route

__all__ = ["Route", "choose_route", "project_score", "project_score_dense", "score_params"]


def _check_rows(act: torch.Tensor, grad: torch.Tensor) -> tuple[int, int]:
    """Validate factored rows act [B, M, d_in], grad [B, M, d_out]; return (d_in, d_out)."""
    check_shape("act", act, (None, None, None))
    n_b, n_rows, d_in = act.shape
    check_shape("grad", grad, (n_b, n_rows, None))
    check_float("act", act)
    check_float("grad", grad)
    return d_in, grad.shape[2]


def _check_curvature(
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    inv_damped: torch.Tensor,
    queries: torch.Tensor,
    d_in: int,
    d_out: int,
) -> None:
    check_shape("eigvecs_act", eigvecs_act, (d_in, d_in))
    check_shape("eigvecs_grad", eigvecs_grad, (d_out, d_out))
    check_shape("inv_damped", inv_damped, (d_out, d_in))
    check_shape("queries", queries, (None, d_out, d_in))
    for name, tensor in (
        ("eigvecs_act", eigvecs_act),
        ("eigvecs_grad", eigvecs_grad),
        ("inv_damped", inv_damped),
        ("queries", queries),
    ):
        check_float(name, tensor)


def project_score(
    act: torch.Tensor,
    grad: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    inv_damped: torch.Tensor,
    queries: torch.Tensor,
    *,
    route: Route | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Score per-example gradients given in factored form against cached queries.

    Implements scores[b, q] = Σ_{o,i} (Q_Sᵀ G_b Q_A)[o,i] · W[o,i] · Q̂[q,o,i] with
    G_b = Σ_m grad[b,m] ⊗ act[b,m] (DESIGN.md §1: τ(q, n) = Σ_layers ⟨Q̂_q ∘ W, Ĝ_n⟩).

    Args:
        act: [B, M, d_in] layer inputs, M = positions × draws of one example.
        grad: [B, M, d_out] output gradients of the same rows.
        eigvecs_act: [d_in, d_in] Q_A, eigenvectors in columns.
        eigvecs_grad: [d_out, d_out] Q_S, eigenvectors in columns.
        inv_damped: [d_out, d_in] W = 1 / (Λ + λ).
        queries: [Q, d_out, d_in] query gradients in the eigenbasis, Q̂ = Q_Sᵀ ∇m Q_A.
        route: ``"rows"`` (project every row, cost M(d_in² + d_out²)), ``"summed"`` (form
            G_b, cost d_out²·d_in + d_out·d_in²) or ``None`` to pick the cheaper one
            (:func:`choose_route`).
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``None``
            (see :mod:`fastinf.kernels.dispatch`).

    Returns:
        [B, Q] scores of this layer; positive means example b is a proponent of query q.
        float32 (float64 from the reference when an input is float64).
    """
    d_in, d_out = _check_rows(act, grad)
    _check_curvature(eigvecs_act, eigvecs_grad, inv_damped, queries, d_in, d_out)
    if route is not None and route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)} or None")
    tensors = (act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries)
    impl = select("project_score", backend, tensors)
    return impl(*tensors, route=route)


def project_score_dense(
    grads: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    inv_damped: torch.Tensor,
    queries: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Score materialised per-example gradients against cached queries.

    Args:
        grads: [B, d_out, d_in] per-example layer gradients G_b.
        eigvecs_act, eigvecs_grad, inv_damped, queries, backend: as for
            :func:`project_score`.

    Returns:
        [B, Q] scores, as for :func:`project_score`.
    """
    check_shape("grads", grads, (None, None, None))
    _, d_out, d_in = grads.shape
    check_float("grads", grads)
    _check_curvature(eigvecs_act, eigvecs_grad, inv_damped, queries, d_in, d_out)
    tensors = (grads, eigvecs_act, eigvecs_grad, inv_damped, queries)
    return select("project_score_dense", backend, tensors)(*tensors)


def score_params(
    act: torch.Tensor,
    grad: torch.Tensor,
    queries: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Score per-example gradients given in factored form against parameter-space queries.

    Implements scores[b, q] = Σ_{o,i} G_b[o,i] · V[q,o,i] with G_b = Σ_m grad[b,m] ⊗ act[b,m].
    With V_q = Q_S (Q̂_q ∘ W) Q_Aᵀ = (G + λI)⁻¹ ∇m_q (DESIGN.md §1, inverse-GGN–vector
    product) this equals :func:`project_score`, since ⟨Q̂_q ∘ W, Q_Sᵀ G_b Q_A⟩ =
    ⟨Q_S (Q̂_q ∘ W) Q_Aᵀ, G_b⟩, without projecting any example.

    Args:
        act: [B, M, d_in] layer inputs, M = positions × draws of one example.
        grad: [B, M, d_out] output gradients of the same rows.
        queries: [Q, d_out, d_in] preconditioned query gradients V_q, laid out like the
            layer's weight (conv kernels flattened to d_in = C_in·kh·kw in the order of
            ``act``).
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``None``
            (see :mod:`fastinf.kernels.dispatch`).

    Returns:
        [B, Q] scores of this layer; positive means example b is a proponent of query q.
        float32 (float64 from the reference when an input is float64).
    """
    d_in, d_out = _check_rows(act, grad)
    check_shape("queries", queries, (None, d_out, d_in))
    check_float("queries", queries)
    tensors = (act, grad, queries)
    return select("score_params", backend, tensors)(*tensors)
