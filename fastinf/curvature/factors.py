"""The K-FAC factors every Kronecker strategy starts from (DESIGN §1 K-FAC).

For each tracked layer, A = E[a aᵀ] over its input rows and S = E[g gᵀ] over the GGN
seeds back-propagated to its output; both are eigendecomposed in float64. K-FAC's
eigenvalues are Λ = λ_S λ_Aᵀ; EK-FAC re-estimates Λ in the same eigenbasis.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import CurvatureConfig
from ..diffusion import Purpose
from ..layers import LayerCall, LayerInfo
from ..source import GradientSource
from .base import CurvatureError, LayerCurvature
from .passes import FitPasses

__all__ = ["FactorSums", "check_finite", "eigh_psd", "fit_factors", "upcast"]


def upcast(tensor: Tensor) -> Tensor:
    """float64 stays float64 (exact tests); half precisions are summed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


class FactorSums:
    """Layer consumer accumulating Σ a aᵀ and Σ g gᵀ (expand) or the reduced versions, and
    the number of activation rows, all float64."""

    def __init__(self, layers: dict[str, LayerInfo], approx: str, device):
        self.approx = approx
        self.act = {
            n: torch.zeros(i.d_in, i.d_in, dtype=torch.float64, device=device)
            for n, i in layers.items()
        }
        self.grad = {
            n: torch.zeros(i.d_out, i.d_out, dtype=torch.float64, device=device)
            for n, i in layers.items()
        }
        self.act_count = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}

    def __call__(self, name: str, call: LayerCall) -> None:
        act, grad = (upcast(rows) for rows in call.rows())
        if self.approx == "expand":
            rows_act, rows_grad = act.flatten(0, 1), grad.flatten(0, 1)
        else:
            rows_act, rows_grad = act.mean(1), grad.sum(1)
        self.act_count[name] += rows_act.shape[0]
        self.act[name] += (rows_act.T @ rows_act).double()
        self.grad[name] += (rows_grad.T @ rows_grad).double()

    def state(self) -> dict[str, Tensor]:
        """Every sum, by key (the tensors themselves: `FitPasses.run` reduces them)."""
        parts = {"act": self.act, "grad": self.grad, "act_count": self.act_count}
        return {f"{n}::{part}": sums[n] for part, sums in parts.items() for n in self.act}


def check_finite(name: str, what: str, matrix: Tensor) -> None:
    if not torch.isfinite(matrix).all():
        raise CurvatureError(
            f"layer {name!r}: the {what} has NaN/Inf entries. Likely causes: NaN or Inf in the "
            "training images, diverged model weights, or overflow in a low-precision model "
            "(fit in float32)."
        )


def eigh_psd(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0: the matrix is PSD up to rounding) and eigenvectors, float64."""
    eigvals, eigvecs = torch.linalg.eigh(matrix.double())
    return eigvals.clamp_min(0.0), eigvecs


def fit_factors(
    source: GradientSource, config: CurvatureConfig, passes: FitPasses
) -> dict[str, LayerCurvature]:
    """A and S of every tracked layer over the fit's examples, their eigendecompositions
    (the same on every rank), and the K-FAC eigenvalues Λ = λ_S λ_Aᵀ (Λ_bias = λ_S)."""
    sums = FactorSums(source.layers, config.kfac_approx, source.device)
    passes.run(
        "factors",
        sums.state(),
        lambda chunks: source.curvature_seeds(
            sums, config, Purpose.FIT_FACTORS, config.factor_draws, chunks, desc="fit factors"
        ),
    )
    num_draws = passes.num_examples * config.factor_draws
    fitted = {}
    for name, info in source.layers.items():
        act_cov = sums.act[name] / sums.act_count[name]
        grad_cov = sums.grad[name] / num_draws
        check_finite(name, "activation covariance A", act_cov)
        check_finite(name, "output-gradient covariance S", grad_cov)
        eigvals_act, eigvecs_act = eigh_psd(act_cov)
        eigvals_grad, eigvecs_grad = eigh_psd(grad_cov)
        passes.agree([eigvals_act, eigvecs_act, eigvals_grad, eigvecs_grad])
        fitted[name] = LayerCurvature(
            act_cov,
            grad_cov,
            eigvals_act,
            eigvecs_act,
            eigvals_grad,
            eigvecs_grad,
            torch.outer(eigvals_grad, eigvals_act),
            eigvals_grad.clone() if info.has_bias else None,
        )
    return fitted
