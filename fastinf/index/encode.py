"""Gradients → index vectors (eigenbasis, W^½, compression) → stored values (fp32 … int4).

Train side: v_n = c(W^½ ∘ Q_Sᵀ ∇ℓ_n Q_A) per layer; query side: the same map applied to
∇m_q, so that ⟨v_q, v_n⟩ ≈ τ(q, n) (DESIGN §1, last identity). A cached preconditioned
query V_q = (G + λI)⁻¹∇m_q maps to the same whitened vector through Q_Sᵀ V_q Q_A ∘ W^-½.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..curvature import EigenbasisCurvature
from ..source import LayerGrads
from .compress import Compressor, CoordinateLayout, whitening_scales
from .config import IndexConfig

__all__ = ["Quantizer", "VectorEncoder", "as_float64"]


def as_float64(grads: LayerGrads) -> LayerGrads:
    """Per-layer tensors in float64: query vectors are encoded at full precision."""
    return {n: (w.double(), None if b is None else b.double()) for n, (w, b) in grads.items()}


class VectorEncoder:
    """Maps per-example layer gradients to index vectors [B, dim].

    The rotation Q_Sᵀ G Q_A runs in the gradients' dtype (float32 for a float32 model,
    float64 for the exact tests); whitening and compression go through the compressor.
    """

    def __init__(
        self,
        curvature: EigenbasisCurvature,
        damping: float,
        damping_mode: str,
        compressor: Compressor,
    ):
        self.curvature = curvature
        self.layout: CoordinateLayout = compressor.layout
        self.compressor = compressor
        self.scales = whitening_scales(curvature, damping, damping_mode)
        self._eigvecs: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.compressor.dim

    def _bases(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (name, dtype)
        if key not in self._eigvecs:
            layer = self.curvature.layers[name]
            self._eigvecs[key] = (layer.eigvecs_grad.to(dtype), layer.eigvecs_act.to(dtype))
        return self._eigvecs[key]

    def rotate(self, grads: LayerGrads) -> dict[str, Tensor]:
        """Eigenbasis coordinates per block key: Q_Sᵀ G Q_A [B, d_out, d_in] (weight) and
        Q_Sᵀ b [B, d_out, 1] (bias), float64 for float64 gradients, else float32.

        Args:
            grads: name → (weight [B, d_out, d_in], bias [B, d_out] or None) of every layer.
        """
        coords = {}
        for block in self.layout:
            weight, bias = grads[block.layer]
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            q_grad, q_act = self._bases(block.layer, dtype)
            if block.part == "weight":
                coords[block.key] = q_grad.T @ weight.to(dtype) @ q_act
            else:
                coords[block.key] = (bias.to(dtype) @ q_grad).unsqueeze(2)
        return coords

    def compress(self, coords: dict[str, Tensor], *, preconditioned: bool = False) -> Tensor:
        """Whiten and compress eigenbasis coordinates into index vectors [B, dim].

        Args:
            preconditioned: the coordinates are those of (G + λI)⁻¹∇m (a `QueryCache`), i.e.
                Q̂∘W: they are multiplied by W^-½ instead of W^½.
        """
        first = next(iter(coords.values()))
        out = first.new_zeros(first.shape[0], self.dim)
        for block in self.layout:
            scale = self.scales[block.key].to(first.device)
            scale = 1.0 / scale if preconditioned else scale
            self.compressor.add(block, coords[block.key], scale, out)
        return out

    def whiten(self, coords: dict[str, Tensor]) -> dict[str, Tensor]:
        """W^½ ∘ coordinates per block key, flattened to [B, block.size]."""
        return {
            block.key: coords[block.key].flatten(1)
            * self.scales[block.key].flatten().to(coords[block.key])
            for block in self.layout
        }

    def compress_whitened(self, whitened: dict[str, Tensor]) -> Tensor:
        """Index vectors [B, dim] from `whiten`'s output (one whitening, many compressions)."""
        first = next(iter(whitened.values()))
        out = first.new_zeros(first.shape[0], self.dim)
        for block in self.layout:
            self.compressor.add_whitened(block, whitened[block.key], out)
        return out

    def encode(self, grads: LayerGrads, *, preconditioned: bool = False) -> Tensor:
        """Index vectors [B, dim] of per-example layer gradients (see `rotate`, `compress`)."""
        return self.compress(self.rotate(grads), preconditioned=preconditioned)


STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int4": np.uint8}
INTEGER_LIMITS = {"int8": 127, "int4": 7}


class Quantizer:
    """Stored values of index vectors, and what the search sees of them.

    fp32/fp16: stored = v. int8/int4: stored = round(v / s) clipped to ±L (L = 127 / 7) with
    one scale s_j per dimension (the calibration vectors' largest |v_j| / L); int4 packs two
    values per byte (value + 8 in each nibble, even positions in the low nibble; an odd
    vector is padded with one 0). The search
    sees stored × s, so ⟨q, stored × s⟩ ≈ ⟨q, v⟩; the sketch noise of the compressions is far
    above this rounding (`bench/index_recall.py` measures both).
    """

    def __init__(self, storage: str, scale: Tensor | None = None):
        if storage in INTEGER_LIMITS and scale is None:
            raise ValueError(f"{storage} storage needs per-dimension scales (from calibration).")
        self.storage = storage
        self.scale = None if scale is None else scale.float()

    @classmethod
    def calibrate(cls, config: IndexConfig, vectors: Tensor) -> Quantizer:
        """Per-dimension scales from calibration vectors [M, dim] (integer storage)."""
        if config.storage not in INTEGER_LIMITS:
            return cls(config.storage)
        largest = vectors.abs().amax(0).float()
        floor = float(largest.max()) * 1e-6 + 1e-30
        return cls(config.storage, largest.clamp_min(floor) / INTEGER_LIMITS[config.storage])

    @property
    def dtype(self):
        return STORAGE_DTYPES[self.storage]

    def width(self, dim: int) -> int:
        """Stored columns of a `dim`-value vector."""
        return (dim + 1) // 2 if self.storage == "int4" else dim

    def store(self, vectors: Tensor) -> np.ndarray:
        """[B, dim] float vectors → stored values [B, width(dim)] (numpy, storage dtype)."""
        values = vectors.detach().float().cpu()
        if self.storage in INTEGER_LIMITS:
            limit = INTEGER_LIMITS[self.storage]
            codes = torch.round(values / self.scale).clamp_(-limit, limit).to(torch.int8)
            if self.storage == "int8":
                return codes.numpy()
            nibbles = (codes + 8).to(torch.uint8)
            if nibbles.shape[1] % 2:
                nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=8)
            return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).numpy()
        with np.errstate(over="ignore"):
            array = values.numpy().astype(self.dtype)
        if not np.isfinite(array).all():
            largest = float(values.abs().max())
            raise ValueError(
                f"index vectors overflow {self.storage} (|v| up to {largest:.3g}); "
                "use storage='fp32', 'int8' or 'int4'."
            )
        return array

    def query(self, vectors: Tensor) -> np.ndarray:
        """[Q, dim] query vectors as the search takes them (float32)."""
        return np.ascontiguousarray(vectors.detach().cpu().float().numpy())

    def values(self, stored: np.ndarray) -> np.ndarray:
        """Stored values → [rows, dim] float32 as the search sees them (integers: code × s)."""
        if self.storage == "int4":
            packed = np.asarray(stored)
            codes = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.float32)
            codes[:, 0::2] = (packed & 0x0F).astype(np.float32) - 8
            codes[:, 1::2] = (packed >> 4).astype(np.float32) - 8
            return codes[:, : self.scale.numel()] * self.scale.numpy()[None, :]
        values = np.array(stored, dtype=np.float32, order="C")
        if self.scale is not None:
            values *= self.scale.numpy()[None, :]
        return values

    def scale_array(self) -> np.ndarray | None:
        return None if self.scale is None else self.scale.numpy()

    def tensors(self) -> dict[str, Tensor]:
        return {} if self.scale is None else {"scale": self.scale}
