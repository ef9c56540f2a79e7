"""Compressions of whitened eigenbasis coordinates into index vectors (DESIGN §1, last identity).

A model-wide whitened vector w = W^½∘Ĝ is the concatenation of blocks, one per tracked
layer's weight (d_out·d_in coordinates, row-major (o, i)) and bias (d_out). Each compression
maps w to `dim` values so that ⟨c(w_q), c(w_n)⟩ ≈ ⟨w_q, w_n⟩ = τ(q, n):

* `exact` keeps every coordinate (the oracle; tiny models only).
* `countsketch` adds each coordinate, times a random sign, into one of `dim` buckets
  (a sparse random projection; unbiased, variance ≈ ‖w_q‖²‖w_n‖²/dim).
* `gaussian` projects each block with its own dense Gaussian matrix, dimensions shared out in
  proportion to the block's Σ Λ/(Λ+λ); it runs through the fused whiten-and-sketch kernel.
* `kronecker` sketches a layer's coordinate matrix C as S_out C S_inᵀ (and the bias as
  S_out b), with Gaussian S_out, S_in: memory d_out·k_out + d_in·k_in per layer.
* `truncate` keeps the `dim` coordinates ranked highest (by Λ/(Λ+λ) or by measured energy);
  the score is then the partial sum over those coordinates.
* `hybrid` keeps the top `exact_fraction`·dim coordinates exactly and count-sketches the
  rest into the remaining dimensions.

Compressors are registered by name in `COMPRESSORS`; each is built deterministically from
the layout, the config, the sketch seed and (truncate/hybrid) the ranking of coordinates.
"""

from __future__ import annotations

import abc
import hashlib
import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..artifacts import tensor_fingerprint
from ..curvature import EigenbasisCurvature
from ..kernels import whiten_sketch
from .config import IndexConfig

__all__ = [
    "COMPRESSORS",
    "Block",
    "Compressor",
    "CoordinateLayout",
    "damped_ratio",
    "make_compressor",
    "whitening_scales",
]


@dataclass(frozen=True)
class Block:
    """One block of the model-wide coordinate vector: `key` = "layer::weight" or "layer::bias"."""

    key: str
    layer: str
    part: str  # "weight" or "bias"
    rows: int  # d_out
    cols: int  # d_in (1 for a bias)
    offset: int  # position of the block's first coordinate in the model-wide vector

    @property
    def size(self) -> int:
        return self.rows * self.cols


class CoordinateLayout:
    """The blocks of the model-wide whitened vector, in tracked-layer order (weight, bias)."""

    def __init__(self, curvature: EigenbasisCurvature):
        blocks, offset = [], 0
        for name, layer in curvature.layers.items():
            rows, cols = layer.eigvals_weight.shape
            blocks.append(Block(f"{name}::weight", name, "weight", rows, cols, offset))
            offset += rows * cols
            if layer.eigvals_bias is not None:
                blocks.append(Block(f"{name}::bias", name, "bias", rows, 1, offset))
                offset += rows
        self.blocks = blocks
        self.size = offset

    def __iter__(self):
        return iter(self.blocks)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """A [..., size] tensor as one [..., block.size] view per block key."""
        return {b.key: flat[..., b.offset : b.offset + b.size] for b in self.blocks}


def whitening_scales(
    curvature: EigenbasisCurvature, damping: float, mode: str
) -> dict[str, Tensor]:
    """W^½ = (Λ + λ)^-½ per block key, [rows, cols] float64 (DESIGN §1 Damping)."""
    scales = {}
    for name in curvature.layers:
        inv_weight, inv_bias = curvature.inverse_damped(name, damping, mode)
        scales[f"{name}::weight"] = inv_weight.sqrt()
        if inv_bias is not None:
            scales[f"{name}::bias"] = inv_bias.sqrt().unsqueeze(1)
    return scales


def damped_ratio(curvature: EigenbasisCurvature, damping: float, mode: str) -> dict[str, Tensor]:
    """Λ/(Λ + λ) per block key, flattened [block.size] float64: each coordinate's share of
    the effective dimension Σ Λ/(Λ+λ)."""
    ratios = {}
    for name, layer in curvature.layers.items():
        value = curvature.damping_value(name, damping, mode)
        ratios[f"{name}::weight"] = (
            layer.eigvals_weight / (layer.eigvals_weight + value)
        ).flatten()
        if layer.eigvals_bias is not None:
            ratios[f"{name}::bias"] = layer.eigvals_bias / (layer.eigvals_bias + value)
    return ratios


def _generator(seed: int, key: str, salt: str) -> torch.Generator:
    """A CPU generator per (seed, block, purpose): a block's sketch never depends on others."""
    mixed = zlib.crc32(f"{key}|{salt}".encode()) ^ (seed * 0x9E3779B1 % (1 << 32))
    return torch.Generator().manual_seed(mixed)


def _hash_buckets(seed: int, key: str, size: int, buckets: int) -> tuple[Tensor, Tensor]:
    generator = _generator(seed, key, "countsketch")
    bucket = torch.randint(0, buckets, (size,), generator=generator)
    sign = torch.randint(0, 2, (size,), generator=generator).to(torch.int8) * 2 - 1
    return bucket, sign


def _split_dims(total: int, weights: list[float], minimum: int = 1) -> list[int]:
    """Integers ≥ minimum summing to `total`, proportional to `weights` (largest remainder)."""
    if total < minimum * len(weights):
        raise ValueError(
            f"dim={total} is smaller than {minimum} per block × {len(weights)} blocks; "
            "raise IndexConfig.dim or use compression='countsketch'."
        )
    spare = total - minimum * len(weights)
    weight_sum = sum(weights) or 1.0
    exact = [spare * w / weight_sum for w in weights]
    dims = [minimum + math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in order[: total - sum(dims)]:
        dims[i] += 1
    return dims


class Compressor(abc.ABC):
    """Base: `add(block, coords, scale, out)` whitens one block's eigenbasis coordinates and
    adds their compression into `out` [B, dim]; `add_whitened` does the same from already
    whitened coordinates. Subclasses implement `add_whitened`, and may fuse `add`."""

    name = ""

    def __init__(self, layout: CoordinateLayout, config: IndexConfig, ranking=None):
        self.layout = layout
        self.config = config
        self.dim = config.dim

    def add(self, block: Block, coords: Tensor, scale: Tensor, out: Tensor) -> None:
        """coords [B, rows, cols] eigenbasis coordinates, scale [rows, cols] W^½."""
        whitened = whiten_sketch(coords, scale.to(coords.dtype), None)
        self.add_whitened(block, whitened.to(out.dtype), out)

    @abc.abstractmethod
    def add_whitened(self, block: Block, whitened: Tensor, out: Tensor) -> None:
        """whitened [B, block.size] (row-major (o, i) order)."""

    def random_tensors(self) -> list[Tensor]:
        """The random parts (for the fingerprint that pins them across torch versions)."""
        return []

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in self.random_tensors():
            digest.update(tensor_fingerprint(tensor).encode())
        return digest.hexdigest()[:16]


class ExactCompressor(Compressor):
    name = "exact"

    def __init__(self, layout, config, ranking=None):
        super().__init__(layout, config)
        self.dim = layout.size

    def add_whitened(self, block, whitened, out):
        out[:, block.offset : block.offset + block.size] = whitened

    def fingerprint(self) -> str:
        return "none"


class CountSketch(Compressor):
    name = "countsketch"

    def __init__(self, layout, config, ranking=None):
        super().__init__(layout, config)
        self.hashes = {
            b.key: _hash_buckets(config.sketch_seed, b.key, b.size, self.dim) for b in layout
        }

    def add_whitened(self, block, whitened, out):
        bucket, sign = self.hashes[block.key]
        out.index_add_(1, bucket.to(out.device), whitened * sign.to(whitened))

    def random_tensors(self):
        return [t for pair in self.hashes.values() for t in pair]


class GaussianSketch(Compressor):
    """Dense per-block Gaussian projections with entries N(0, 1/k_block)."""

    name = "gaussian"
    MAX_ENTRIES = 1 << 28  # 1 GiB of float32 sketches: beyond that, use countsketch

    def __init__(self, layout, config, ranking=None):
        super().__init__(layout, config)
        shares = [float(ranking[b.key].sum()) for b in layout]
        self.dims = dict(zip([b.key for b in layout], _split_dims(self.dim, shares), strict=True))
        entries = sum(b.size * self.dims[b.key] for b in layout)
        if entries > self.MAX_ENTRIES:
            raise ValueError(
                f"compression='gaussian' with dim={self.dim} needs {entries:,} sketch entries "
                f"(> {self.MAX_ENTRIES:,}); lower dim or use compression='countsketch'."
            )
        self.offsets, self.sketches, offset = {}, {}, 0
        for block in layout:
            k = self.dims[block.key]
            generator = _generator(config.sketch_seed, block.key, "gaussian")
            self.sketches[block.key] = torch.randn(block.size, k, generator=generator) / math.sqrt(
                k
            )
            self.offsets[block.key] = offset
            offset += k

    def add(self, block, coords, scale, out):
        start = self.offsets[block.key]
        sketch = self.sketches[block.key].to(coords.device, coords.dtype)
        part = whiten_sketch(coords, scale.to(coords.dtype), sketch)
        out[:, start : start + sketch.shape[1]] = part.to(out.dtype)

    def add_whitened(self, block, whitened, out):
        start = self.offsets[block.key]
        sketch = self.sketches[block.key].to(whitened.device, whitened.dtype)
        out[:, start : start + sketch.shape[1]] = whitened @ sketch

    def random_tensors(self):
        return list(self.sketches.values())


class KroneckerSketch(Compressor):
    """S_out C S_inᵀ per layer (and S_out b for its bias), S entries N(0, 1/k)."""

    name = "kronecker"

    def __init__(self, layout, config, ranking=None):
        super().__init__(layout, config)
        layers: dict[str, list[Block]] = {}
        for block in layout:
            layers.setdefault(block.layer, []).append(block)
        shares = [sum(float(ranking[b.key].sum()) for b in blocks) for blocks in layers.values()]
        budgets = _split_dims(config.dim, shares)
        self.factors, self.offsets, offset = {}, {}, 0
        for (name, blocks), budget in zip(layers.items(), budgets, strict=True):
            rows, cols = blocks[0].rows, blocks[0].cols
            has_bias = len(blocks) > 1
            k_out, k_in = _kronecker_shape(budget, rows, cols, has_bias)
            generator = _generator(config.sketch_seed, name, "kronecker")
            s_out = torch.randn(k_out, rows, generator=generator) / math.sqrt(k_out)
            s_in = torch.randn(k_in, cols, generator=generator) / math.sqrt(k_in)
            self.factors[name] = (s_out, s_in)
            for block in blocks:
                self.offsets[block.key] = offset
                offset += k_out * (k_in if block.part == "weight" else 1)
        self.dim = offset

    def add(self, block, coords, scale, out):
        self.add_whitened(block, (coords * scale.to(coords.dtype)).flatten(1), out)

    def add_whitened(self, block, whitened, out):
        s_out, s_in = (s.to(whitened.device, whitened.dtype) for s in self.factors[block.layer])
        if block.part == "weight":
            matrix = whitened.reshape(-1, block.rows, block.cols)
            part = (s_out @ matrix @ s_in.T).flatten(1)
        else:
            part = whitened @ s_out.T
        start = self.offsets[block.key]
        out[:, start : start + part.shape[1]] = part.to(out.dtype)

    def random_tensors(self):
        return [t for pair in self.factors.values() for t in pair]


def _kronecker_shape(budget: int, rows: int, cols: int, has_bias: bool) -> tuple[int, int]:
    """(k_out, k_in) with k_out·k_in (+ k_out for the bias) ≈ budget, same ratio both sides."""
    ratio = math.sqrt(max(budget, 1) / (rows * cols))
    k_out = min(rows, max(1, round(rows * ratio)))
    spare = max(1, budget - (k_out if has_bias else 0))
    k_in = min(cols, max(1, spare // k_out))
    return k_out, k_in


def _top_coordinates(layout: CoordinateLayout, ranking: dict[str, Tensor], count: int) -> Tensor:
    """Global positions of the `count` highest-ranked coordinates, in descending rank."""
    flat = torch.cat([ranking[b.key].flatten().double() for b in layout])
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[:count]


class Truncation(Compressor):
    """Keeps the `dim` highest-ranked whitened coordinates (kept = their global positions)."""

    name = "truncate"

    def __init__(self, layout, config, ranking=None, kept=None, kept_count=None):
        super().__init__(layout, config)
        count = kept_count or min(config.dim, layout.size)
        self.kept = _top_coordinates(layout, ranking, count) if kept is None else kept.long()
        self.local = {}
        for block in layout:
            inside = (self.kept >= block.offset) & (self.kept < block.offset + block.size)
            positions = inside.nonzero().flatten()
            self.local[block.key] = (self.kept[positions] - block.offset, positions)

    def add_whitened(self, block, whitened, out):
        local, positions = self.local[block.key]
        out[:, positions.to(out.device)] = whitened[:, local.to(whitened.device)]

    def random_tensors(self):
        return [self.kept]


class Hybrid(Truncation):
    """Top coordinates kept exactly; every other coordinate count-sketched into the rest."""

    name = "hybrid"

    def __init__(self, layout, config, ranking=None, kept=None):
        kept_count = max(1, min(round(config.exact_fraction * config.dim), config.dim - 1))
        super().__init__(layout, config, ranking, kept, kept_count)
        buckets = config.dim - kept_count
        self.hashes = {}
        for block in layout:
            bucket, sign = _hash_buckets(config.sketch_seed, block.key, block.size, buckets)
            # A kept coordinate gets sign 0: it is not sketched a second time.
            sign[self.local[block.key][0]] = 0
            self.hashes[block.key] = (bucket + kept_count, sign)

    def add_whitened(self, block, whitened, out):
        super().add_whitened(block, whitened, out)
        bucket, sign = self.hashes[block.key]
        out.index_add_(1, bucket.to(out.device), whitened * sign.to(whitened))

    def random_tensors(self):
        return [self.kept, *(t for pair in self.hashes.values() for t in pair)]


COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (ExactCompressor, CountSketch, GaussianSketch, KroneckerSketch, Truncation, Hybrid)
}


def make_compressor(
    layout: CoordinateLayout,
    config: IndexConfig,
    ranking: dict[str, Tensor] | None,
    *,
    kept: Tensor | None = None,
) -> Compressor:
    """The compressor named by `config.compression`.

    Args:
        ranking: per block key, a non-negative [block.size] importance of each coordinate:
            truncate/hybrid keep the highest; gaussian/kronecker share dimensions out in
            proportion to each block's sum. Unused by exact and countsketch.
        kept: truncate/hybrid: the kept global coordinate positions, in rank order (as
            saved by a build), instead of ranking again.
    """
    cls = COMPRESSORS[config.compression]
    if kept is not None and issubclass(cls, Truncation):
        return cls(layout, config, ranking, kept=kept)
    return cls(layout, config, ranking)
