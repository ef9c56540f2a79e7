"""EK-FAC eigenvalue accumulation: Λ += Σ_d (Q_Sᵀ G_d Q_A)^∘2, tile by tile."""

from __future__ import annotations

import torch

from .._inputs import check_float, check_shape
from ..dispatch import select

__all__ = ["eigval_accumulate"]


def eigval_accumulate(
    act: torch.Tensor,
    grad: torch.Tensor,
    eigvecs_act: torch.Tensor,
    eigvecs_grad: torch.Tensor,
    out: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Add Σ_d (Q_Sᵀ G_d Q_A)^∘2 to ``out`` in place (DESIGN.md §1, "EK-FAC").

    G_d = Σ_r grad[d, r] ⊗ act[d, r] is the layer gradient of draw d; dividing the final
    sum by the number of draws gives the corrected eigenvalues Λ.

    Args:
        act: [D, R, d_in] layer inputs of D draws with R positions each.
        grad: [D, R, d_out] output gradients of the same rows.
        eigvecs_act: [d_in, d_in] Q_A, eigenvectors in columns.
        eigvecs_grad: [d_out, d_out] Q_S, eigenvectors in columns.
        out: [d_out, d_in] float32 or float64 running sum, updated in place.
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``None``
            (see :mod:`fastinf.kernels.dispatch`). ``out`` does not count towards the
            float64 rule: a float64 accumulator with float32 inputs may run on Triton.

    Returns:
        ``out``.
    """
    check_shape("act", act, (None, None, None))
    n_d, n_r, d_in = act.shape
    check_shape("grad", grad, (n_d, n_r, None))
    d_out = grad.shape[2]
    check_shape("eigvecs_act", eigvecs_act, (d_in, d_in))
    check_shape("eigvecs_grad", eigvecs_grad, (d_out, d_out))
    check_shape("out", out, (d_out, d_in))
    inputs = {"act": act, "grad": grad, "eigvecs_act": eigvecs_act, "eigvecs_grad": eigvecs_grad}
    for name, tensor in inputs.items():
        check_float(name, tensor)
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"out must be float32 or float64, got {out.dtype}")
    impl = select("eigval_accumulate", backend, tuple(inputs.values()))
    return impl(act, grad, eigvecs_act, eigvecs_grad, out)
