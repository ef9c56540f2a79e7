"""A built index, loaded for queries: query gradient → whitened, compressed vector → search.

    index = engine.build_index("index/")   # once (or `fastinf index --out index/`)
    index = engine.load_index("index/")    # later; engine.score / topk_influencers use it
    result = engine.score(queries, k=10)                  # search only: milliseconds
    result = engine.score(queries, k=10, exact_rerank=50) # exact τ for the top-50 candidates

Loading checks that the index belongs to the engine's model, dataset, curvature, gradient
draws and damping, and verifies every file's checksum (DESIGN §2: never a silently wrong
answer).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..artifacts import ArtifactMismatchError, check_provenance
from ..scoring import InfluenceResult, QueryCache, TopK
from .build import GRADIENT_FIELDS, _flatten, _rank_world, index_identity, load_encoder
from .config import IndexConfig
from .search import SearchIndex
from .store import BuildPlan, IndexStore

__all__ = ["TrainingIndex"]


def _merge_ranks(scores: Tensor, indices: Tensor, k: int, world: int) -> tuple[Tensor, Tensor]:
    """The k largest scores (ties: lower dataset index first) over every rank's top-k."""
    missing = indices < 0
    scores = scores.masked_fill(missing, -math.inf)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (scores, indices))
    scores = torch.cat([part[0] for part in gathered], dim=1)
    indices = torch.cat([part[1] for part in gathered], dim=1)
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


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
        engine,
        *,
        verify: bool = True,
        sharded: bool = False,
    ):
        self.store = store
        self.manifest = manifest
        self.config = IndexConfig(**manifest["config"])
        self.order = torch.from_numpy(store.read_order(manifest["plan"]["order_sha256"]).copy())
        self.encoder, self.quantizer = load_encoder(store, engine, manifest)
        records = manifest["shards"]
        self.rank, self.world = _rank_world() if sharded else (0, 1)
        if self.world > 1:
            if self.config.search != "flat":
                raise ValueError(
                    f"a sharded search needs search='flat' (this index is {self.config.search!r});"
                    " load it unsharded."
                )
            records = [r for r in records if r["shard"] % self.world == self.rank]
        self.rows = torch.cat([torch.arange(r["start"], r["stop"]) for r in records])
        self.shards = [store.open_shard(record, verify=verify) for record in records]
        if self.config.search == "flat":
            batches = (self.quantizer.values(values) for values in self.shards)
            self.search_index = SearchIndex.build(
                self.config, self.dim, len(self.rows), batches, self.quantizer.scale_array()
            )
        else:
            path = store.check_search(manifest["search_sha256"])
            self.search_index = SearchIndex.read(path, self.config)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, engine, *, verify: bool = True, sharded: bool = False
    ) -> TrainingIndex:
        """Open a complete index for `engine` (which must hold the index's curvature).

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
        expected = index_identity(
            engine,
            IndexConfig(**manifest["config"]),
            manifest["plan"]["num_examples"],
            manifest["plan"]["order_sha256"],
        )
        sections = ("provenance", "curvature", "gradients")
        recorded = {k: manifest.get(k, {}) for k in sections}
        check_provenance(
            f"index in {directory}",
            _flatten(recorded),
            _flatten({k: expected[k] for k in sections}),
        )
        return cls(store, manifest, engine, verify=verify, sharded=sharded)

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

    # -- queries ---------------------------------------------------------------------------
    def query_vectors(
        self, engine, queries: Tensor | QueryCache, cond=None
    ) -> tuple[Tensor, Tensor]:
        """(index vectors [Q, dim] float64, query ids [Q]) of query images or a `QueryCache`.

        Images: ∇m over K_q draws (the engine's measurement), projected, whitened by W^½ and
        compressed exactly like the train side. A cache of (G + λI)⁻¹∇m is un-whitened by
        W^-½ instead, giving the same vector.
        """
        self._check_engine(engine)
        if isinstance(queries, QueryCache):
            check_provenance("query cache", queries.meta, engine.query_meta())
            pre = {
                n: (w.double(), None if b is None else b.double())
                for n, (w, b) in queries.preconditioned.items()
            }
            return self.encoder.encode(pre, preconditioned=True), queries.query_ids
        grads = engine.query_gradients(queries, cond)
        grads = {n: (w.double(), None if b is None else b.double()) for n, (w, b) in grads.items()}
        return self.encoder.encode(grads), engine.query_ids(queries, cond)

    def _check_engine(self, engine) -> None:
        for name in GRADIENT_FIELDS:
            if getattr(engine.config, name) != self.manifest["gradients"][name]:
                raise ArtifactMismatchError(
                    f"the index was built with {name}={self.manifest['gradients'][name]!r} but the "
                    f"engine now has {name}={getattr(engine.config, name)!r}; set the engine's "
                    "ScoreConfig back or rebuild the index."
                )

    def search(self, vectors: Tensor, k: int) -> tuple[TopK, TopK]:
        """Top-k proponents (largest ⟨v_q, v_n⟩) and opponents (largest ⟨−v_q, v_n⟩).

        Args:
            vectors: [Q, dim] query index vectors (`query_vectors`).
        Returns:
            (proponents, opponents): `TopK` of dataset indices and index scores [Q, k]
            (float64), proponents by descending score, opponents by ascending score.
        """
        queries = self.quantizer.query(vectors)
        found = []
        for sign in (1.0, -1.0):
            scores, rows = self.search_index.search(sign * queries, k)
            rows_t = torch.from_numpy(rows.astype(np.int64))
            indices = torch.where(rows_t >= 0, self.order[self.rows[rows_t.clamp_min(0)]], -1)
            scores_t = torch.from_numpy(scores).double()
            if self.world > 1:
                scores_t, indices = _merge_ranks(scores_t, indices, k, self.world)
            found.append(TopK(indices, sign * scores_t))
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
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (self.rows, local))
        full = local.new_empty(local.shape[0], self.num_examples)
        for rows, columns in gathered:
            full[:, rows] = columns
        return full

    def topk(
        self,
        engine,
        queries: Tensor | QueryCache,
        k: int = 10,
        *,
        cond=None,
        exact_rerank: int | None = None,
        return_scores: bool = False,
    ) -> InfluenceResult:
        """Proponents and opponents of each query by index search, optionally re-ranked.

        Args:
            exact_rerank: C > 0 re-scores the union of every query's top-C candidates of
                each sign exactly (their train gradients are recomputed, `engine.score`
                over those examples): the returned scores are then exact τ, and the lists
                exact whenever the true top-k are among the candidates. None: the index's
                `IndexConfig.exact_rerank`; 0: search only.
            return_scores: also return the index scores of every row, [Q, N] (row order).
        """
        rerank = self.config.exact_rerank if exact_rerank is None else exact_rerank
        if rerank and not isinstance(queries, QueryCache):
            queries = engine.prepare_queries(queries, cond)
        vectors, query_ids = self.query_vectors(engine, queries, cond)
        k = min(k, self.num_examples)
        scores = self.scores(vectors) if return_scores else None
        if not rerank:
            proponents, opponents = self.search(vectors, k)
            return InfluenceResult(proponents, opponents, scores, query_ids)
        proponents, opponents = self.search(vectors, max(rerank, k))
        found = torch.cat([proponents.indices.flatten(), opponents.indices.flatten()])
        candidates = sorted(set(found[found >= 0].tolist()))
        exact = engine.score(queries, k, indices=candidates)
        return InfluenceResult(exact.proponents, exact.opponents, scores, query_ids)
