"""TRAK: the GGN^loss of randomly sketched per-example gradients (a curvature strategy).

The baselines TRAK and D-TRAK (DESIGN §1 baselines) as a curvature of the same engine.
Each example's gradient g_n (mean over draws of the training loss, or of the square norm
for D-TRAK) is sketched to φ_n = P g_n ∈ ℝ^k, F = (1/N) Σ_n φ_n φ_nᵀ is fitted, and a
query is preconditioned in parameter space as V_q = Pᵀ (F + λI)⁻¹ P ∇m_q, so the engine's
streaming scorer gives τ(q, n) = ⟨V_q, g_n⟩ = (P ∇m_q)ᵀ (F + λI)⁻¹ (P g_n) unchanged.

P is Kronecker-structured per layer (a dense Gaussian over all parameters would not fit in
memory): a layer's gradient [G | b] ∈ ℝ^{d_out × (d_in + 1)} is sketched to
S_out [G | b] S_inᵀ / √(k_out k_in) with Gaussian S_out [k_out, d_out], S_in [k_in, d_in+1]
drawn from the config seed, which preserves inner products in expectation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..config import CurvatureConfig
from ..diffusion import Purpose, resolve_measurement
from ..gradients import BlockConsumer, DrawSpec
from ..layers import LayerCall, LayerInfo
from ..source import GradientSource, LayerGrads
from .base import Curvature
from .factors import eigh_psd
from .passes import FitPasses

__all__ = ["SketchedCurvature", "fit"]


def _sketch_side(size: int, dim: int) -> int:
    return min(size, dim)


def _layer_dims(layers: dict[str, LayerInfo], projection_dim: int) -> dict[str, tuple[int, int]]:
    """(k_out, k_in) per layer: the largest common side s with Σ min(d_out, s)·min(d_in', s)
    ≤ projection_dim (at least 1 × 1 per layer)."""

    def total(side: int) -> int:
        return sum(
            _sketch_side(info.d_out, side) * _sketch_side(info.d_in + info.has_bias, side)
            for info in layers.values()
        )

    low, high = 1, max(max(info.d_out, info.d_in + 1) for info in layers.values())
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total(mid) <= projection_dim else (low, mid - 1)
    return {
        name: (_sketch_side(info.d_out, low), _sketch_side(info.d_in + info.has_bias, low))
        for name, info in layers.items()
    }


def _layer_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
    return int(digest[:15], 16)


class SketchedCurvature(Curvature):
    """A fitted TRAK curvature: per-layer sketches P and F = U diag(s) Uᵀ (float64).

    It preconditions like every `Curvature`, but has no Kronecker eigenbasis: the index and
    self-influence, which need one, refuse it (`require_eigenbasis`).
    """

    def __init__(
        self,
        layers: dict[str, LayerInfo],
        config: CurvatureConfig,
        provenance: dict,
        fisher_eigvals: Tensor,
        fisher_eigvecs: Tensor,
    ):
        super().__init__(config, provenance)
        self.layer_info = layers
        self.fisher_eigvals = fisher_eigvals
        self.fisher_eigvecs = fisher_eigvecs
        self.dims = _layer_dims(layers, config.projection_dim)
        self.sketches = {}
        device = fisher_eigvecs.device
        for name, info in layers.items():
            k_out, k_in = self.dims[name]
            generator = torch.Generator().manual_seed(_layer_seed(config.seed, name))
            sketch_out = torch.randn(k_out, info.d_out, generator=generator, dtype=torch.float64)
            sketch_in = torch.randn(
                k_in, info.d_in + info.has_bias, generator=generator, dtype=torch.float64
            )
            scale = (k_out * k_in) ** -0.5
            self.sketches[name] = (sketch_out.to(device) * scale, sketch_in.to(device))

    @property
    def dim(self) -> int:
        return sum(k_out * k_in for k_out, k_in in self.dims.values())

    def sketch(self, grads: LayerGrads) -> Tensor:
        """φ = P g [n, k] (float64) for per-layer gradients name → (weight, bias)."""
        parts = []
        for name in self.layer_info:
            weight, bias = grads[name]
            parts.append(self.sketch_layer(name, weight, bias))
        return torch.cat(parts, dim=1)

    def sketch_layer(self, name: str, weight: Tensor, bias: Tensor | None) -> Tensor:
        """φ of one layer's gradients [n, k_out · k_in] (float64)."""
        sketch_out, sketch_in = self.sketches[name]
        augmented = weight.double()
        if bias is not None:
            augmented = torch.cat([augmented, bias.double().unsqueeze(2)], dim=2)
        return (sketch_out @ augmented @ sketch_in.T).flatten(1)

    def damping_value(self, damping: float, mode: str) -> float:
        """λ: absolute, or `damping` × the mean eigenvalue of F."""
        return damping if mode == "absolute" else damping * float(self.fisher_eigvals.mean())

    def precondition(self, grads: LayerGrads, damping: float, mode: str = "absolute") -> LayerGrads:
        """Pᵀ (F + λI)⁻¹ P g per layer, float64, in parameter space."""
        value = self.damping_value(damping, mode)
        if value <= 0:
            raise ValueError(
                "TRAK's sketched Fisher has rank <= N, so it needs a positive damping; set one."
            )
        eigvecs = self.fisher_eigvecs
        sketched = self.sketch(grads)
        solved = ((sketched @ eigvecs) / (self.fisher_eigvals + value)) @ eigvecs.T
        out, start = {}, 0
        for name, info in self.layer_info.items():
            k_out, k_in = self.dims[name]
            sketch_out, sketch_in = self.sketches[name]
            block = solved[:, start : start + k_out * k_in].reshape(-1, k_out, k_in)
            start += k_out * k_in
            augmented = sketch_out.T @ block @ sketch_in
            bias = augmented[:, :, info.d_in] if info.has_bias else None
            out[name] = (augmented[:, :, : info.d_in], bias)
        return out

    def to(self, device) -> SketchedCurvature:
        return SketchedCurvature(
            self.layer_info,
            self.config,
            self.provenance,
            self.fisher_eigvals.to(device),
            self.fisher_eigvecs.to(device),
        )

    def layer_names(self) -> list[str]:
        return list(self.layer_info)

    def tensors(self) -> dict[str, Tensor]:
        """F's eigendecomposition; the sketches are regenerated from the config's seed."""
        return {"fisher_eigvals": self.fisher_eigvals, "fisher_eigvecs": self.fisher_eigvecs}

    @classmethod
    def from_artifact(
        cls,
        tensors: dict[str, Tensor],
        meta: dict,
        config: CurvatureConfig,
        layer_info: dict[str, LayerInfo],
    ) -> SketchedCurvature:
        """Rebuild from a saved artifact (`load_curvature` checked checksum and provenance)."""
        return cls(
            layer_info,
            config,
            meta["provenance"],
            tensors["fisher_eigvals"],
            tensors["fisher_eigvecs"],
        )


class _SketchedGradients(BlockConsumer):
    """Layer consumer: φ[b] = P g_b for each example of a block, layer by layer."""

    def __init__(self, layers, curvature: SketchedCurvature):
        self.curvature = curvature
        self.offsets, start = {}, 0
        for name in layers:
            k_out, k_in = curvature.dims[name]
            self.offsets[name] = slice(start, start + k_out * k_in)
            start += k_out * k_in
        super().__init__(layers)

    def reset(self, num_examples: int) -> None:
        super().reset(num_examples)
        self.features = torch.zeros(num_examples, self.curvature.dim, dtype=torch.float64)

    def __call__(self, name: str, call: LayerCall) -> None:
        weight, bias = call.example_gradients(self.count)
        sketched = self.curvature.sketch_layer(name, weight, bias).cpu()
        self.features[self.part, self.offsets[name]] += sketched


def fit(
    source: GradientSource, config: CurvatureConfig, passes: FitPasses | None = None
) -> SketchedCurvature:
    """Fit F = (1/N) Σ_n (P g_n)(P g_n)ᵀ over `passes`' examples (default: every example,
    without checkpoints) with g_n the gradient of `config.objective` averaged over
    `config.factor_draws` draws, and eigendecompose it in float64."""
    passes = passes if passes is not None else FitPasses(source, config)
    empty = torch.zeros(0, dtype=torch.float64, device=source.device)
    curvature = SketchedCurvature(source.layers, config, dict(source.provenance), empty, empty)
    consumer = _SketchedGradients(source.layers, curvature)
    spec = DrawSpec(Purpose.FIT_FACTORS, config.factor_draws, config.seed)
    sums = {"fisher": torch.zeros(curvature.dim, curvature.dim, dtype=torch.float64)}

    def run(chunks: list[list[int]]) -> Iterator[None]:
        for number, chunk in enumerate(chunks, 1):
            for _ in source.stream(
                consumer,
                resolve_measurement(config.objective),
                spec,
                indices=chunk,
                block_size=max(1, config.batch_size // config.factor_draws),
                batch_size=config.batch_size,
                desc=f"fit sketched ({number}/{len(chunks)})",
            ):
                sums["fisher"] += consumer.features.T @ consumer.features
            yield

    passes.run("sketched_fisher", sums, run)
    eigvals, eigvecs = eigh_psd(sums["fisher"] / passes.num_examples)
    passes.agree([eigvals, eigvecs])
    curvature.fisher_eigvals = eigvals.to(source.device)
    curvature.fisher_eigvecs = eigvecs.to(source.device)
    return curvature
