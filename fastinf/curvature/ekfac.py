"""EK-FAC: K-FAC's eigenbasis with eigenvalues re-estimated from fresh draws (DESIGN §1).

Λ = mean_d (Q_Sᵀ G_d Q_A)^∘2 over per-draw layer gradients G_d, and the bias analogue.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import CurvatureConfig
from ..diffusion import Purpose
from ..kernels import eigval_accumulate
from ..layers import LayerCall, LayerInfo
from ..source import GradientSource
from .base import EigenbasisCurvature, LayerCurvature
from .factors import check_finite, fit_factors, upcast
from .passes import FitPasses

__all__ = ["fit"]


class _EigvalSums:
    """Layer consumer accumulating Σ_d (Q_Sᵀ G_d Q_A)^∘2 (and the bias analogue)."""

    _CHUNK = 64  # draws per kernel call: bounds the reference path's [D, d_out, d_in] memory

    def __init__(self, layers: dict[str, LayerInfo], curvature: dict[str, LayerCurvature]):
        self.layers = layers
        self.eigvecs = {n: (c.eigvecs_act, c.eigvecs_grad) for n, c in curvature.items()}
        self.weight = {n: torch.zeros_like(c.eigvals_weight) for n, c in curvature.items()}
        self.bias = {n: torch.zeros_like(c.eigvals_grad) for n, c in curvature.items()}

    def __call__(self, name: str, call: LayerCall) -> None:
        act, grad = (upcast(rows) for rows in call.rows())
        eigvecs_act, eigvecs_grad = (q.to(act.dtype) for q in self.eigvecs[name])
        # A pass's sum is formed in the rows' precision (float64 accumulation inside the
        # kernel costs ~3×); the running sum over passes stays float64.
        pass_sum = torch.zeros_like(self.weight[name], dtype=act.dtype)
        for start in range(0, act.shape[0], self._CHUNK):
            chunk = slice(start, start + self._CHUNK)
            eigval_accumulate(act[chunk], grad[chunk], eigvecs_act, eigvecs_grad, pass_sum)
        self.weight[name] += pass_sum.double()
        if self.layers[name].has_bias:
            self.bias[name] += (grad.sum(1) @ eigvecs_grad).double().square().sum(0)

    def state(self) -> dict[str, Tensor]:
        """Every sum, by key (the tensors themselves: `FitPasses.run` reduces them)."""
        parts = {"weight": self.weight, "bias": self.bias}
        return {f"{n}::{part}": sums[n] for part, sums in parts.items() for n in self.weight}


def fit(
    source: GradientSource, config: CurvatureConfig, passes: FitPasses | None = None
) -> EigenbasisCurvature:
    """Fit the K-FAC factors, then the eigenvalues in their eigenbasis with fresh draws
    (over `passes`' examples; default: every example, without checkpoints)."""
    passes = passes if passes is not None else FitPasses(source, config)
    fitted = fit_factors(source, config, passes)
    sums = _EigvalSums(source.layers, fitted)
    passes.run(
        "eigenvalues",
        sums.state(),
        lambda chunks: source.curvature_seeds(
            sums, config, Purpose.FIT_EIGVALS, config.eigval_draws, chunks, desc="fit eigenvalues"
        ),
    )
    num_draws = passes.num_examples * config.eigval_draws
    for name, layer in fitted.items():
        layer.eigvals_weight = sums.weight[name] / num_draws
        check_finite(name, "EK-FAC eigenvalues", layer.eigvals_weight)
        if layer.eigvals_bias is not None:
            layer.eigvals_bias = sums.bias[name] / num_draws
    return EigenbasisCurvature(fitted, config, dict(source.provenance))
