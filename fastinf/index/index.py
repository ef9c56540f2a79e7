"""A built index, loaded for search: stored vectors of every training example, a faiss
structure over them, and the error model of their compression (DESIGN §2 step 3b).

    index = TrainingIndex.load("index/", source, curvature)   # checks identity + checksums
    proponents, opponents = index.search(vectors, k)         # vectors: `IndexScorer.query_vectors`

Loading checks that the index belongs to the source's model, dataset, gradient draws and
damping and to the curvature, and verifies every file's checksum (DESIGN §2: never a
silently wrong answer). `fastinf.index.IndexScorer` turns queries into vectors and re-ranks.
A flat index holds every stored vector in a faiss structure in memory; a twostage one
holds only the first-stage structure over the sketches, and reads the stored vectors of
each query's candidates from the memory-mapped shards (`fastinf.index.twostage`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..curvature import Curvature, require_eigenbasis
from ..distributed import all_gather_objects, merge_topk, owned, rank_world
from ..scoring import TopK
from ..source import GradientSource
from .config import IndexConfig
from .encode import Quantizer, VectorEncoder
from .identity import SECTIONS, check_identity, index_identity, load_encoder, load_projection
from .search import SearchIndex
from .store import BuildPlan, IndexStore
from .twostage import FirstStageProjection, TwoStageSearch

__all__ = ["TrainingIndex"]


def error_model(
    compression: str, dim: int, quantizer: Quantizer, vectors: Tensor
) -> tuple[Tensor, Tensor] | None:
    """(a [Q], b [Q]): an index score ⟨v_q, v_n⟩ − τ(q, n) has variance ≈ a_q ‖v_n‖² + b_q.

    Count sketch: a = ‖v_q‖² / dim (each cross term q_i v_j lands in the same bucket with
    probability 1/dim, with a random sign); integer storage: b = Σ_d q_d² s_d² / 12
    (rounding to steps s_d). None for compressions without this model (their re-rank
    re-scores every candidate). The variance over sketch seeds is tested against this
    model; `bench/index_latency.py` measures the recall of the re-rank that relies on it.

    Args:
        vectors: [Q, dim] query index vectors.
    """
    query = vectors.double()
    if compression == "countsketch":
        sketch = query.square().sum(1) / dim
    elif compression == "exact":
        sketch = query.new_zeros(query.shape[0])
    else:
        return None
    rounding = query.new_zeros(query.shape[0])
    if quantizer.scale is not None:
        rounding = query.square() @ quantizer.scale.double().square() / 12
    return sketch, rounding


class TrainingIndex:
    """The stored index vectors of a training set and a faiss structure to search them.

    Row r of the index is training example `order[r]`. Scores are ⟨query vector, stored
    vector⟩ ≈ τ(q, n) (exact for `compression="exact"`, fp32); τ > 0: proponent.
    Loaded `sharded` under torch.distributed, rank r holds shards r, r + W, … and every
    search is merged across ranks (all ranks must search the same queries).
    """

    def __init__(
        self,
        store: IndexStore,
        manifest: dict,
        encoder: VectorEncoder,
        quantizer: Quantizer,
        *,
        projection: FirstStageProjection | None = None,
        verify: bool = True,
        sharded: bool = False,
    ):
        self.store = store
        self.manifest = manifest
        self.config = IndexConfig(**manifest["config"])
        self.order = torch.from_numpy(store.read_order(manifest["plan"]["order_sha256"]).copy())
        self.encoder, self.quantizer = encoder, quantizer
        records = manifest["shards"]
        self.rank, self.world = rank_world() if sharded else (0, 1)
        if self.world > 1:
            if self.config.search != "flat":
                raise ValueError(
                    f"a sharded search needs search='flat' (this index is {self.config.search!r});"
                    " load it unsharded."
                )
            records = owned(sorted(records, key=lambda r: r["shard"]), self.rank, self.world)
        self.rows = torch.cat([torch.arange(r["start"], r["stop"]) for r in records])
        self.shards = [store.open_shard(record, verify=verify) for record in records]
        self._norms: Tensor | None = None
        self._positions: tuple[np.ndarray, np.ndarray] | None = None
        if self.config.search == "flat":
            norms: list[np.ndarray] = []
            self.search_index = SearchIndex.build(
                self.config,
                self.dim,
                len(self.rows),
                self._decoded(norms),
                self.quantizer.scale_array(),
            )
            self._norms = self._by_example(norms)
        elif self.config.search == "twostage":
            if projection is None:
                raise ValueError("a twostage index needs its first-stage projection.")
            if verify:
                for record in records:
                    store.open_sketches(record, self.config.first_stage_dim, verify=True)
            path = store.check_search(manifest["search_sha256"])
            self.search_index = SearchIndex.read(path, self.config.first_stage_config())
            self.two_stage = TwoStageSearch(
                self.search_index,
                projection,
                self.shards,
                self.config,
                self.quantizer.scale_array(),
            )
        else:
            path = store.check_search(manifest["search_sha256"])
            self.search_index = SearchIndex.read(path, self.config)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        source: GradientSource,
        curvature: Curvature,
        *,
        verify: bool = True,
        sharded: bool = False,
    ) -> TrainingIndex:
        """Open a complete index built from `source` with `curvature`.

        Args:
            verify: check every shard's checksum (reads the whole index once).
            sharded: under torch.distributed, hold only this rank's shards (see class doc).

        Raises:
            FileNotFoundError: no index in `directory`.
            ArtifactMismatchError: the index belongs to another model, dataset, curvature,
                gradient configuration or damping.
            ArtifactCorruptError: a file is missing, truncated or altered (checksums).
            RuntimeError: the build has not finished.
        """
        store = IndexStore(directory)
        manifest = store.read_manifest()
        if manifest is None:
            raise FileNotFoundError(
                f"no index in {directory}; build one with `fastinf index --out {directory}` or "
                "`engine.build_index(directory)`."
            )
        if not manifest.get("complete"):
            plan = BuildPlan(manifest["plan"]["num_examples"], manifest["plan"]["shard_size"])
            done = len(store.completed(plan, manifest["build_id"]))
            raise RuntimeError(
                f"the index build in {directory} is incomplete ({done} of {len(plan.shards())} "
                "shards); run the same build command again to resume it."
            )
        curvature = require_eigenbasis(curvature, "the index")
        expected = index_identity(
            source,
            curvature,
            IndexConfig(**manifest["config"]),
            manifest["plan"]["num_examples"],
            manifest["plan"]["order_sha256"],
        )
        check_identity(f"index in {directory}", manifest, expected, SECTIONS)
        encoder, quantizer = load_encoder(store, curvature, source.config, manifest)
        projection = load_projection(store, manifest)
        return cls(
            store,
            manifest,
            encoder,
            quantizer,
            projection=projection,
            verify=verify,
            sharded=sharded,
        )

    # -- facts -----------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return int(self.manifest["plan"]["num_examples"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def bytes_per_example(self) -> int:
        return self.config.bytes_per_example(self.dim)

    def vectors(self) -> np.ndarray:
        """The stored values [rows, dim] held here (all N unless sharded), in row order."""
        return np.concatenate([np.asarray(values) for values in self.shards])

    def _decoded(self, norms: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Each shard's values as the search sees them; appends their norms to `norms`."""
        for values in self.shards:
            decoded = self.quantizer.values(values)
            norms.append(np.linalg.norm(decoded.astype(np.float64), axis=1))
            yield decoded

    def _by_example(self, norms: list[np.ndarray]) -> Tensor:
        """Row norms (this rank's, in row order) → ‖v_n‖ by dataset index, every rank's."""
        pairs = [(self.order[self.rows], torch.from_numpy(np.concatenate(norms)))]
        if self.world > 1:
            pairs = all_gather_objects(pairs[0])
        full = torch.full((int(self.order.max()) + 1,), math.nan, dtype=torch.float64)
        for examples, values in pairs:
            full[examples] = values
        return full

    def norms(self, examples: Tensor) -> Tensor:
        """‖stored vector‖ of the given training examples (dataset indices, any shape).

        A flat index computed every norm while loading; an approximate one (never sharded)
        reads just these rows from the memory-mapped shards.
        """
        if self._norms is not None:
            return self._norms[examples]
        if self._positions is None:  # dataset index → (local row, shard start), once
            positions = np.full(int(self.order.max()) + 1, -1, dtype=np.int64)
            positions[self.order[self.rows].numpy()] = np.arange(len(self.rows))
            starts = np.cumsum([0] + [len(values) for values in self.shards])
            # Published as one tuple: a thread never sees positions without their starts.
            self._positions = (positions, starts)
        positions, starts = self._positions
        wanted = positions[examples.flatten().numpy()]
        shard = np.searchsorted(starts, wanted, side="right") - 1
        out = np.empty(len(wanted))
        for i, (which, row) in enumerate(zip(shard, wanted - starts[shard], strict=True)):
            decoded = self.quantizer.values(self.shards[which][row : row + 1])
            out[i] = np.linalg.norm(decoded.astype(np.float64))
        return torch.from_numpy(out).reshape(examples.shape)

    def error_model(self, vectors: Tensor) -> tuple[Tensor, Tensor] | None:
        """The compression error model of this index's scores (`error_model`)."""
        return error_model(self.config.compression, self.dim, self.quantizer, vectors)

    def search(
        self, vectors: Tensor, k: int, *, candidates: int | None = None
    ) -> tuple[TopK, TopK]:
        """Top-k proponents (largest ⟨v_q, v_n⟩) and opponents (largest ⟨−v_q, v_n⟩).

        Args:
            vectors: [Q, dim] query index vectors (`IndexScorer.query_vectors`).
            candidates: twostage: first-stage candidates per query and sign (default
                `IndexConfig.first_stage_candidates`; ≥ N: the flat search's lists).
        Returns:
            (proponents, opponents): `TopK` of dataset indices and index scores [Q, k]
            (float64), proponents by descending score, opponents by ascending score.
        """
        queries = self.quantizer.query(vectors)
        if self.config.search == "twostage":
            signed = self.two_stage.search(queries, k, candidates)
        else:
            signed = [self.search_index.search(sign * queries, k) for sign in (1.0, -1.0)]
        found = []
        for sign, (scores, rows) in zip((1.0, -1.0), signed, strict=True):
            rows_t = torch.from_numpy(rows.astype(np.int64))
            indices = torch.where(rows_t >= 0, self.order[self.rows[rows_t.clamp_min(0)]], -1)
            scores_t = torch.from_numpy(scores).double()
            if self.world > 1:
                scores_t, indices = merge_topk(scores_t, indices, k)
            found.append(
                TopK(indices, sign * scores_t, torch.zeros_like(indices, dtype=torch.bool))
            )
        return found[0], found[1]

    def scores(self, vectors: Tensor) -> Tensor:
        """Index scores of every stored row, [Q, N] float64 (columns in row order)."""
        queries = torch.from_numpy(self.quantizer.query(vectors)).double()
        parts = [
            queries @ torch.from_numpy(self.quantizer.values(values)).double().T
            for values in self.shards
        ]
        local = torch.cat(parts, dim=1)
        if self.world == 1:
            return local
        full = local.new_empty(local.shape[0], self.num_examples)
        for rows, columns in all_gather_objects((self.rows, local)):
            full[:, rows] = columns
        return full
