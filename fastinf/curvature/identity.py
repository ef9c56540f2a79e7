"""The identity: G = I, every eigenvalue 1, so τ = ∇m_qᵀ ∇ℓ_n / (1 + λ) — the gradient
dot product baseline, through the same eigenbasis machinery (the basis is the standard one)."""

from __future__ import annotations

import torch

from ..config import CurvatureConfig
from ..source import GradientSource
from .base import EigenbasisCurvature, LayerCurvature
from .passes import FitPasses

__all__ = ["fit"]


def fit(
    source: GradientSource, config: CurvatureConfig, passes: FitPasses | None = None
) -> EigenbasisCurvature:
    """No pass over the data (`passes` is not used): the factors, bases and eigenvalues are
    identities and ones, on every rank alike."""
    fitted = {}
    options = {"dtype": torch.float64, "device": source.device}
    for name, info in source.layers.items():
        eye_act, eye_grad = torch.eye(info.d_in, **options), torch.eye(info.d_out, **options)
        ones_act, ones_grad = torch.ones(info.d_in, **options), torch.ones(info.d_out, **options)
        fitted[name] = LayerCurvature(
            eye_act,
            eye_grad,
            ones_act,
            eye_act.clone(),
            ones_grad,
            eye_grad.clone(),
            torch.outer(ones_grad, ones_act),
            ones_grad.clone() if info.has_bias else None,
        )
    return EigenbasisCurvature(fitted, config, dict(source.provenance))
