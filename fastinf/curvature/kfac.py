"""K-FAC: Λ = λ_S λ_Aᵀ, the eigenvalues of the Kronecker product of the factors."""

from __future__ import annotations

import dataclasses

import torch

from ..config import CurvatureConfig
from ..source import GradientSource
from .base import EigenbasisCurvature, LayerCurvature
from .factors import fit_factors
from .passes import FitPasses

__all__ = ["as_kfac", "fit"]


def fit(
    source: GradientSource, config: CurvatureConfig, passes: FitPasses | None = None
) -> EigenbasisCurvature:
    """Fit the K-FAC factors over `passes`' examples (default: every example, without
    checkpoints)."""
    passes = passes if passes is not None else FitPasses(source, config)
    return EigenbasisCurvature(fit_factors(source, config, passes), config, dict(source.provenance))


def as_kfac(curvature: EigenbasisCurvature) -> EigenbasisCurvature:
    """The K-FAC curvature (Λ = λ_S λ_Aᵀ) sharing an EK-FAC fit's factors and eigenbases."""
    layers = {}
    for name, layer in curvature.layers.items():
        fields = dict(vars(layer))
        fields["eigvals_weight"] = torch.outer(layer.eigvals_grad, layer.eigvals_act)
        if layer.eigvals_bias is not None:
            fields["eigvals_bias"] = layer.eigvals_grad.clone()
        layers[name] = LayerCurvature(**fields)
    config = dataclasses.replace(curvature.config, strategy="kfac")
    return EigenbasisCurvature(layers, config, dict(curvature.provenance))
