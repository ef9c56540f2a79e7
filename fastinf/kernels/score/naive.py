"""PyTorch reference for scoring against parameter-space queries (DESIGN.md §1,
"Identities that make it fast").

scores[b, q] = Σ_{o,i} G_b[o, i] · V[q, o, i],  G_b = Σ_m grad[b, m] ⊗ act[b, m],
with V_q = Q_S (Q̂_q ∘ W) Q_Aᵀ = (G + λI)⁻¹ ∇m_q.

This module is the reference imported by tests, benchmarks and the CPU path. It computes in
float32, or float64 when any input is float64, and materialises every G_b.
"""

from __future__ import annotations

import torch

from .._inputs import compute_dtype

__all__ = ["score_params"]


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
