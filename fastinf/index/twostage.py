"""Two-stage search for large N (search="twostage"): sketches find candidates, stored
vectors rank them.

First stage: every stored vector v_n (as the search sees it: code × scale) has a sketch
s_n = P v_n of `first_stage_dim` values, stored as fp16 beside its shard when the index is
built, so that ⟨P v_q, P v_n⟩ ≈ ⟨v_q, v_n⟩ (v is itself a sketch of the whitened vector,
DESIGN §1 last identity). P is

* `pca`: the top principal directions (uncentred: eigenvectors of Σ v vᵀ) of the stored
  vectors of `first_stage_fit` examples spread over the build order — the projection that
  keeps most of the vectors' energy, hence of their inner products; or
* `countsketch`: each of v's values, times a random sign, added into one of the buckets
  (seeded, data-independent; measured far weaker on whitened gradients, whose energy is
  spread over thousands of directions: `bench/results/index_twostage.md`).

A faiss structure over the sketches (flat, hnsw or ivf) yields the top-C rows of each query
for both signs: proponents (largest ⟨s_q, s_n⟩) and opponents (largest ⟨−s_q, s_n⟩).

Second stage: the stored vectors of only those ≤ 2C rows are read from the memory-mapped
shards and scored with the flat search's own codes and kernel (`flat_over_stored`), so
every returned score is exactly the flat search's score of that row, and with C ≥ N the
lists are the flat search's. The first stage only decides which rows are looked at; its
recall against flat is measured by `bench/index_twostage.py`, never assumed.

A sketch is a power of two (`scale`) times P v, chosen at build time so that the fitted
sketches' largest value is at most 1: fp16 then holds values up to 65,504 times larger
without overflow, and ranking is unchanged by a positive factor.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

from ..artifacts import ArtifactCorruptError, tensor_fingerprint
from .config import IndexConfig
from .search import SearchIndex, flat_over_stored

__all__ = ["FirstStageProjection", "TwoStageSearch", "principal_directions"]

# Candidates scored in two threads from this many rows on (fewer: one call is quicker).
_PARALLEL_ROWS = 512
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastinf-twostage")

# Directions whose eigenvalue is below this share of the largest carry no energy of the
# fitted vectors (fewer independent vectors than first_stage_dim): their rows of P are 0.
_RANK_TOLERANCE = 1e-10


def principal_directions(values: np.ndarray, count: int) -> torch.Tensor:
    """The `count` leading uncentred principal directions of `values` [M, dim], as the
    rows of a [count, dim] float32 matrix (orthonormal; rows past the rank of `values` 0).

    Computed from the M×M Gram matrix in float64 (M ≤ dim: cost M²·dim).
    """
    rows = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).double()
    eigvals, eigvecs = torch.linalg.eigh(rows @ rows.T)
    eigvals, eigvecs = eigvals.flip(0)[:count], eigvecs.flip(1)[:, :count]
    kept = eigvals > _RANK_TOLERANCE * eigvals[0].clamp_min(1e-300)
    directions = eigvecs.T @ rows / eigvals.clamp_min(1e-300).sqrt()[:, None]
    directions[~kept] = 0.0
    out = torch.zeros(count, rows.shape[1], dtype=torch.float32)
    out[: directions.shape[0]] = directions.float()
    return out


class FirstStageProjection:
    """P: stored vectors [B, dim] (float32, as searched) → sketches [B, first_stage_dim].

    Args:
        config: the index's config (`first_stage_projection`, `first_stage_dim`,
            `sketch_seed`).
        dim: values per stored vector.
        scale: the power of two every sketch is multiplied by (`scale_for`).
        basis: pca: the [first_stage_dim, dim] principal directions
            (`principal_directions`).
    `fingerprint` pins the projection (random numbers across torch versions, the fitted
    basis) and is checked when an index is loaded.
    """

    def __init__(self, config: IndexConfig, dim: int, scale: float = 1.0, basis=None):
        if config.first_stage_dim >= dim:
            raise ValueError(
                f"IndexConfig.first_stage_dim={config.first_stage_dim} is not below the "
                f"{dim} values of a stored vector: a sketch must be smaller than what it "
                "sketches; lower first_stage_dim, or use search='flat'."
            )
        self.kind = config.first_stage_projection
        self.dim, self.sketch_dim, self.scale = dim, config.first_stage_dim, float(scale)
        if self.kind == "pca":
            if basis is None or tuple(basis.shape) != (self.sketch_dim, dim):
                raise ValueError(
                    f"first_stage_projection='pca' needs a [{self.sketch_dim}, {dim}] basis "
                    f"(principal_directions), got {None if basis is None else tuple(basis.shape)}."
                )
            self.basis = basis.float().contiguous()
            self.tensors = [self.basis]
        else:
            salt = zlib.crc32(f"first_stage|{self.kind}|{dim}".encode())
            seed = salt ^ (config.sketch_seed * 0x9E3779B1 % 2**32)
            generator = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(0, self.sketch_dim, (dim,), generator=generator)
            self.sign = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
            self.tensors = [self.bucket, self.sign]

    def project(self, values: np.ndarray) -> np.ndarray:
        """[B, dim] float32 → P·values [B, first_stage_dim] float32, times `scale`."""
        rows = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if self.kind == "pca":
            out = rows @ self.basis.T
        else:
            out = rows.new_zeros(rows.shape[0], self.sketch_dim)
            out.index_add_(1, self.bucket, rows * self.sign)
        return (out * self.scale).numpy()

    def sketch(self, values: np.ndarray) -> np.ndarray:
        """Stored sketches [B, first_stage_dim] fp16 of stored vectors [B, dim] (as searched).

        Raises:
            ValueError: a sketch value overflows fp16 (vectors far larger than the
                fitted examples': rebuild with a larger first_stage_fit).
        """
        projected = self.project(values)
        with np.errstate(over="ignore"):
            sketches = projected.astype(np.float16)
        if not np.isfinite(sketches).all():
            raise ValueError(
                f"first-stage sketches overflow fp16 (|s| up to {np.abs(projected).max():.3g} "
                "after scaling): these vectors are far larger than the examples the scale "
                "was set on; rebuild the index (overwrite=True) with a larger first_stage_fit."
            )
        return sketches

    @staticmethod
    def scale_for(projected: np.ndarray) -> float:
        """The power of two that maps the largest |value| of `projected` to (½, 1]."""
        largest = float(np.abs(projected).max(initial=0.0))
        if largest == 0.0 or not math.isfinite(largest):
            return 1.0
        return 2.0 ** -math.ceil(math.log2(largest))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in self.tensors:
            digest.update(tensor_fingerprint(tensor).encode())
        return digest.hexdigest()[:16]


class TwoStageSearch:
    """Sketch search for candidates, then exact scores of their stored vectors.

    Args:
        first_stage: the faiss structure over the sketches (row r = row r of the index).
        projection: the build's `FirstStageProjection`.
        shards: stored values of each shard [rows, width] (memory-mapped), in row order.
        config: the index's config (storage, candidates, first-stage search settings).
        scale: integer storage: the per-dimension scales.
    """

    def __init__(
        self,
        first_stage: SearchIndex,
        projection: FirstStageProjection,
        shards: Sequence[np.ndarray],
        config: IndexConfig,
        scale: np.ndarray | None = None,
    ):
        self.first_stage = first_stage
        self.projection = projection
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(values) for values in self.shards])
        self.config = config
        self.scale = scale
        if first_stage.size != self.starts[-1] or first_stage.cpu_index.d != projection.sketch_dim:
            raise ArtifactCorruptError(
                f"the first-stage structure holds {first_stage.size} sketches of "
                f"{first_stage.cpu_index.d} values, the index {self.starts[-1]} rows with "
                f"first_stage_dim={projection.sketch_dim}; rebuild the index."
            )

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [Q, count] of the largest ⟨s_q, s_n⟩ and of the largest ⟨−s_q, s_n⟩
        (-1 where the structure found fewer)."""
        sketches = self.projection.project(queries)
        both = np.concatenate([sketches, -sketches])
        count = max(1, min(count, self.size))
        if self.config.first_stage_search == "hnsw":
            # efSearch per call (not set on the shared structure): concurrent searches with
            # other candidate counts do not interfere.
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.config.first_stage_ef_search, count)
            rows = self.first_stage.cpu_index.search(both, count, params=params)[1]
        else:
            rows = self.first_stage.search(both, count)[1]
        return rows[: len(queries)], rows[len(queries) :]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Stored values [len(rows), width] of sorted distinct rows, read from the shards."""
        first = self.shards[0]
        out = np.empty((len(rows), first.shape[1]), dtype=first.dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for begin, end in zip([0, *bounds], [*bounds, len(rows)], strict=True):
            which = shard[begin]
            np.take(
                self.shards[which], rows[begin:end] - self.starts[which], axis=0, out=out[begin:end]
            )
        return out

    def stored_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """⟨query, stored value⟩ [len(rows)] float32 of sorted distinct rows, computed by the
        flat search's kernel; two halves in parallel threads (faiss runs one query on one
        thread)."""
        halves = [rows] if len(rows) < _PARALLEL_ROWS else np.array_split(rows, 2)
        parts = list(_POOL.map(lambda part: self._scores(query, part), halves))
        return np.concatenate(parts)

    def _scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        flat = flat_over_stored(self.config, self.projection.dim, self.gather(rows), self.scale)
        scores, order = flat.search(query[None, :], len(rows))
        out = np.empty(len(rows), dtype=np.float32)
        out[order[0]] = scores[0]
        return out

    def search(
        self, queries: np.ndarray, k: int, candidates: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(scores [Q, k], rows [Q, k]) for +queries, the same for −queries].

        Each query's proponents and opponents are the top-k by stored-vector score among
        the union of its candidates of both signs (max(candidates, k) per sign; default
        `first_stage_candidates`); scores are ⟨±query, stored value⟩ as the flat search
        computes them. Rows past the candidates found are -1 (score −FLT_MAX).
        """
        k = max(1, min(k, self.size))
        count = max(candidates or self.config.first_stage_candidates, k)
        plus, minus = self.candidates(queries, count)
        lowest = np.finfo(np.float32).min
        out = [
            (np.full((len(queries), k), lowest, np.float32), np.full((len(queries), k), -1))
            for _ in range(2)
        ]
        for row in range(len(queries)):
            found = np.union1d(plus[row], minus[row])
            found = found[found >= 0]
            if found.size == 0:
                continue
            scores = self.stored_scores(queries[row], found)
            # Descending score, ties by row (as the flat search orders them).
            order = np.lexsort((found, -scores))
            width = min(k, found.size)
            out[0][0][row, :width] = scores[order[:width]]
            out[0][1][row, :width] = found[order[:width]]
            # Opponents: the lowest ⟨q, v⟩ (exactly −⟨−q, v⟩), lowest first.
            order = np.lexsort((found, scores))
            out[1][0][row, :width] = -scores[order[:width]]
            out[1][1][row, :width] = found[order[:width]]
        return out
