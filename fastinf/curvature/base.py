"""What every curvature strategy offers, and what only the Kronecker-eigenbasis ones do.

`Curvature` is the protocol the pipeline needs: precondition query gradients by
(G + λI)⁻¹, move to a device, save. `EigenbasisCurvature` — (E)K-FAC and the identity —
adds the eigenbasis of every layer's block, G = Q diag(Λ) Qᵀ with Q = Q_A ⊗ Q_S
(DESIGN §1 K-FAC, EK-FAC, Damping): `rotate` into it and `inverse_damped` 1/(Λ + λ), which
self-influence and the index need. A strategy without one (TRAK's sketch) is simply not an
`EigenbasisCurvature`; `require_eigenbasis` names what to fit instead.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..artifacts import save_artifact, tensor_fingerprint
from ..config import CurvatureConfig
from ..layers import LayerInfo
from ..source import LayerGrads

__all__ = [
    "NO_CURVATURE",
    "Curvature",
    "CurvatureError",
    "EigenbasisCurvature",
    "LayerCurvature",
    "require_eigenbasis",
]

ARTIFACT = "curvature"


NO_CURVATURE = "no curvature: call engine.fit() or engine.load_curvature(directory) first."


class CurvatureError(ValueError):
    """The fitted curvature is unusable (NaN/Inf factors, wrong layers, no eigenbasis)."""


class Curvature(ABC):
    """A fitted approximation G of the GGN over the tracked layers.

    Attributes:
        config: the `CurvatureConfig` it was fitted with (`config.strategy` names it).
        provenance: fingerprints of the model, dataset and schedule it was fitted on.
    """

    def __init__(self, config: CurvatureConfig, provenance: dict):
        self.config = config
        self.provenance = provenance
        self._fingerprint: str | None = None

    @abstractmethod
    def precondition(self, grads: LayerGrads, damping: float, mode: str = "absolute") -> LayerGrads:
        """(G + λI)⁻¹ V per layer, float64, in parameter space.

        Args:
            grads: name → (weight [n, d_out, d_in], bias [n, d_out] or None).
            damping, mode: λ, 'absolute' or 'relative' (to the mean eigenvalue).
        """

    @abstractmethod
    def to(self, device) -> Curvature:
        """The same curvature with its tensors on `device`."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """What `save` writes, by key; the strategy's `load` reads them back."""

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of what preconditioning reads (computed once: a fitted
        curvature is not changed afterwards)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for key, tensor in self.fingerprinted():
                digest.update(key.encode())
                digest.update(tensor_fingerprint(tensor).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def fingerprinted(self) -> list[tuple[str, Tensor]]:
        """(key, tensor) pairs the fingerprint covers, in a fixed order."""
        return sorted(self.tensors().items())

    def save(self, directory: str | os.PathLike) -> None:
        """Write `curvature.safetensors` + `curvature.json` into `directory`."""
        speed = {"batch_size": self.config.batch_size, "chunk_examples": self.config.chunk_examples}
        meta = {"config": self.config.fingerprint() | speed}
        meta |= {"provenance": self.provenance, "layers": self.layer_names()}
        save_artifact(directory, ARTIFACT, self.tensors(), meta)

    @abstractmethod
    def layer_names(self) -> list[str]:
        """The tracked layers it covers, in the model's order."""


@dataclass
class LayerCurvature:
    """One layer's factors, eigenbases and eigenvalues (float64)."""

    act_cov: Tensor  # A [d_in, d_in]
    grad_cov: Tensor  # S [d_out, d_out]
    eigvals_act: Tensor  # λ_A [d_in]
    eigvecs_act: Tensor  # Q_A [d_in, d_in], eigenvectors in columns
    eigvals_grad: Tensor  # λ_S [d_out]
    eigvecs_grad: Tensor  # Q_S [d_out, d_out]
    eigvals_weight: Tensor  # Λ [d_out, d_in] (corrected for EK-FAC)
    eigvals_bias: Tensor | None  # Λ_bias [d_out]

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def to(self, device) -> LayerCurvature:
        return LayerCurvature(
            **{k: None if v is None else v.to(device) for k, v in vars(self).items()}
        )


class EigenbasisCurvature(Curvature):
    """G block by block in each layer's Kronecker eigenbasis: (E)K-FAC, or the identity.

    A layer's weight block is Q diag(Λ) Qᵀ with Q = Q_A ⊗ Q_S; the bias block uses the same
    Q_S with A = 1. `precondition` applies (G + λI)⁻¹ exactly in that basis.
    """

    def __init__(
        self, layers: dict[str, LayerCurvature], config: CurvatureConfig, provenance: dict
    ):
        super().__init__(config, provenance)
        self.layers = layers

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def fingerprinted(self) -> list[tuple[str, Tensor]]:
        """Each layer's eigenbases and eigenvalues, by layer (what an index records)."""
        keys = ("eigvecs_act", "eigvecs_grad", "eigvals_weight", "eigvals_bias")
        return [
            (name, tensor)
            for name, layer in self.layers.items()
            for tensor in (getattr(layer, key) for key in keys)
            if tensor is not None
        ]

    def damping_value(self, name: str, damping: float, mode: str) -> float:
        """λ for one layer: absolute, or `damping` × mean of the layer's eigenvalues."""
        if mode == "absolute":
            return damping
        layer = self.layers[name]
        values = [layer.eigvals_weight.flatten()]
        if layer.eigvals_bias is not None:
            values.append(layer.eigvals_bias)
        return damping * float(torch.cat(values).mean())

    def inverse_damped(self, name: str, damping: float, mode: str) -> tuple[Tensor, Tensor | None]:
        """W = 1/(Λ + λ) for the weight [d_out, d_in] and bias [d_out] blocks (float64)."""
        layer = self.layers[name]
        value = self.damping_value(name, damping, mode)
        if value <= 0 and bool((layer.eigvals_weight <= 0).any()):
            raise CurvatureError(
                f"layer {name!r} has zero eigenvalues and damping is 0; set a positive damping."
            )
        bias = None if layer.eigvals_bias is None else 1.0 / (layer.eigvals_bias + value)
        return 1.0 / (layer.eigvals_weight + value), bias

    def rotate(self, grads: LayerGrads) -> LayerGrads:
        """Eigenbasis coordinates Q_Sᵀ V Q_A (weight) and Q_Sᵀ v (bias), float64."""
        out = {}
        for name, (weight, bias) in grads.items():
            layer = self.layers[name]
            q_act, q_grad = layer.eigvecs_act, layer.eigvecs_grad
            rotated_w = q_grad.T @ weight.double() @ q_act
            rotated_b = None if bias is None else bias.double() @ q_grad
            out[name] = (rotated_w, rotated_b)
        return out

    def precondition(self, grads: LayerGrads, damping: float, mode: str = "absolute") -> LayerGrads:
        """(G + λI)⁻¹ V per layer: Q_S [(Q_Sᵀ V Q_A) ∘ W] Q_Aᵀ (DESIGN §1), float64."""
        out = {}
        for name, (rotated_w, rotated_b) in self.rotate(grads).items():
            layer = self.layers[name]
            inv_w, inv_b = self.inverse_damped(name, damping, mode)
            weight = layer.eigvecs_grad @ (rotated_w * inv_w) @ layer.eigvecs_act.T
            bias = None if rotated_b is None else (rotated_b * inv_b) @ layer.eigvecs_grad.T
            out[name] = (weight, bias)
        return out

    def to(self, device) -> EigenbasisCurvature:
        moved = {name: layer.to(device) for name, layer in self.layers.items()}
        return type(self)(moved, self.config, self.provenance)

    def tensors(self) -> dict[str, Tensor]:
        return {
            f"{name}::{key}": value
            for name, layer in self.layers.items()
            for key, value in layer.tensors().items()
        }

    @classmethod
    def from_artifact(
        cls,
        tensors: dict[str, Tensor],
        meta: dict,
        config: CurvatureConfig,
        layer_info: dict[str, LayerInfo],
    ) -> EigenbasisCurvature:
        """Rebuild from a saved artifact (`load_curvature` checked checksum and provenance)."""
        names = [f.name for f in fields(LayerCurvature)]
        layers = {
            name: LayerCurvature(**{k: tensors.get(f"{name}::{k}") for k in names})
            for name in meta["layers"]
        }
        return cls(layers, config, meta["provenance"])


def require_eigenbasis(curvature: Curvature, what: str) -> EigenbasisCurvature:
    """`curvature` if it has a Kronecker eigenbasis, else a CurvatureError naming `what`
    needs one and the strategies that have it."""
    if not isinstance(curvature, EigenbasisCurvature):
        raise CurvatureError(
            f"{what} needs a Kronecker eigenbasis, which a {curvature.config.strategy!r} "
            "curvature has not: fit strategy 'ekfac', 'kfac' or 'identity'."
        )
    return curvature
