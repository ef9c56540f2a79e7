"""Scoring per-example layer gradients against cached queries in parameter space:
scores = G_b · V_q, without projecting any example."""

from __future__ import annotations

import torch

from .._inputs import check_float, check_shape
from ..dispatch import select

__all__ = ["score_params"]


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
    product) this is the layer's influence score ⟨Q̂_q ∘ W, Q_Sᵀ G_b Q_A⟩ =
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
    check_shape("act", act, (None, None, None))
    n_b, n_rows, d_in = act.shape
    check_shape("grad", grad, (n_b, n_rows, None))
    d_out = grad.shape[2]
    check_shape("queries", queries, (None, d_out, d_in))
    check_float("act", act)
    check_float("grad", grad)
    check_float("queries", queries)
    tensors = (act, grad, queries)
    return select("score_params", backend, tensors)(*tensors)
