"""A built index, loaded for queries: query gradient → whitened, compressed vector → search.

    index = engine.build_index("index/")   # once (or `fastinf index --out index/`)
    index = engine.load_index("index/")    # later; engine.score / topk_influencers use it
    result = engine.score(queries, k=10)                  # search + bounded exact re-rank
    result = engine.score(queries, k=10, exact_rerank=0)  # search only: milliseconds
    result = engine.score(queries, k=10, rerank_sigmas=0) # exact τ for all top-C candidates

Loading checks that the index belongs to the engine's model, dataset, curvature, gradient
draws and damping, and verifies every file's checksum (DESIGN §2: never a silently wrong
answer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..artifacts import ArtifactMismatchError, check_provenance
from ..scoring import InfluenceResult, QueryCache, TopK
from .build import GRADIENT_FIELDS, _flatten, _rank_world, index_identity, load_encoder
from .config import IndexConfig
from .encode import Quantizer
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
        self._norms: Tensor | None = None
        self._positions: np.ndarray | None = None
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
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, pairs[0])
            pairs = gathered
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
            self._positions = np.full(int(self.order.max()) + 1, -1, dtype=np.int64)
            self._positions[self.order[self.rows].numpy()] = np.arange(len(self.rows))
            self._starts = np.cumsum([0] + [len(values) for values in self.shards])
        wanted, starts = self._positions[examples.flatten().numpy()], self._starts
        shard = np.searchsorted(starts, wanted, side="right") - 1
        out = np.empty(len(wanted))
        for i, (which, row) in enumerate(zip(shard, wanted - starts[shard], strict=True)):
            decoded = self.quantizer.values(self.shards[which][row : row + 1])
            out[i] = np.linalg.norm(decoded.astype(np.float64))
        return torch.from_numpy(out).reshape(examples.shape)

    def error_model(self, vectors: Tensor) -> tuple[Tensor, Tensor] | None:
        """The compression error model of this index's scores (`error_model`)."""
        return error_model(self.config.compression, self.dim, self.quantizer, vectors)

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
        rerank_sigmas: float | None = None,
        return_scores: bool = False,
    ) -> InfluenceResult:
        """Proponents and opponents of each query by index search, optionally re-ranked.

        Args:
            exact_rerank: C > 0 takes every query's top-C candidates of each sign and
                re-scores them exactly (their train gradients are recomputed, `engine.score`
                over those examples). With `IndexConfig.rerank_sigmas` > 0 and a compression
                with an error model, only the candidates whose place in or out of the top-k
                is uncertain are re-scored (`bounded_rerank`; `TopK.exact` marks exact
                scores); else all of them, and the lists are exact whenever the true top-k
                are among the candidates. None: the index's `IndexConfig.exact_rerank`;
                0: search only.
            rerank_sigmas: overrides `IndexConfig.rerank_sigmas` (0: re-score all C).
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
        found = self.search(vectors, max(rerank, k))
        sigmas = self.config.rerank_sigmas if rerank_sigmas is None else rerank_sigmas
        model = self.error_model(vectors) if sigmas > 0 else None
        if model is None:
            flat = torch.cat([part.indices.flatten() for part in found])
            candidates = sorted(set(flat[flat >= 0].tolist()))
            exact = engine.score(queries, k, indices=candidates)
            return InfluenceResult(exact.proponents, exact.opponents, scores, query_ids)
        sketch, rounding = model
        norms = self.norms(torch.cat([part.indices for part in found], 1).clamp_min(0))
        sigma = (sketch[:, None] * norms.square() + rounding[:, None]).sqrt()
        spread = list(sigma.split(found[0].indices.shape[1], dim=1))
        rescore = _ExactScores(engine, queries)
        proponents, opponents = bounded_rerank(found, spread, k, sigmas, rescore, rescore.batch)
        return InfluenceResult(proponents, opponents, scores, query_ids)


class _ExactScores:
    """Exact τ of every query against chosen training examples, remembered once computed."""

    def __init__(self, engine, queries: QueryCache):
        self.engine, self.queries = engine, queries
        self.known: dict[int, Tensor] = {}
        # Examples per call: one forward/backward pass of the engine's batch.
        self.batch = max(1, engine.config.batch_size // engine.config.train_draws)

    def __call__(self, examples: list[int]) -> None:
        result = self.engine.score(self.queries, 1, indices=examples, return_scores=True)
        for column, example in enumerate(examples):
            self.known[example] = result.scores[:, column]


def bounded_rerank(
    found: tuple[TopK, TopK],
    spread: list[Tensor],
    k: int,
    sigmas: float,
    exact: _ExactScores,
    batch: int,
) -> tuple[TopK, TopK]:
    """Top-k of each query and sign from index candidates, re-scoring only the uncertain.

    A candidate's τ lies in [score − z·σ, score + z·σ] (z = `sigmas`, σ from
    `TrainingIndex.error_model`) until it is re-scored exactly. Rounds re-score up to `batch`
    candidates, highest upper bound first, among those that could be in the top-k (upper
    bound ≥ the k-th largest lower bound) and are not surely in it (lower bound above the
    (k+1)-th largest upper bound); they stop when none is left. Every query's scores of a
    re-scored example are kept. Returned scores are exact where `TopK.exact`, else the
    index's.

    Args:
        found: (proponents, opponents) index candidates [Q, C] (opponents: ascending).
        spread: σ of each candidate's index score, [Q, C] per sign.
        exact: called with a list of training indices, fills `exact.known[index]` with
            their exact τ for every query [Q].
        batch: most examples re-scored per call.
    """
    signs = (1.0, -1.0)
    while True:
        pending: list[list[int]] = []
        for part, sign, sigma in zip(found, signs, spread, strict=True):
            for row in range(part.indices.shape[0]):
                pending.append(_uncertain(part, sign, sigma, row, k, sigmas, exact.known))
        chosen: list[int] = []
        for rank in range(max(map(len, pending), default=0)):
            for items in pending:
                if rank < len(items) and items[rank] not in chosen and len(chosen) < batch:
                    chosen.append(items[rank])
        if not chosen:
            break
        exact(chosen)
    return tuple(
        _final(part, sign, k, exact.known) for part, sign in zip(found, signs, strict=True)
    )


def _estimates(part: TopK, sign: float, row: int, known: dict[int, Tensor]):
    """(valid candidate positions, sign × score, exact mask) of one query's list."""
    valid = torch.nonzero(part.indices[row] >= 0).flatten()
    indices = part.indices[row, valid].tolist()
    scores = part.scores[row, valid].double().clone()
    mask = torch.zeros(len(indices), dtype=torch.bool)
    for position, example in enumerate(indices):
        if example in known:
            scores[position] = known[example][row]
            mask[position] = True
    return valid, sign * scores, mask


def _uncertain(part, sign, sigma, row, k, sigmas, known) -> list[int]:
    valid, score, mask = _estimates(part, sign, row, known)
    width = torch.where(mask, 0.0, sigmas * sigma[row, valid].double())
    low, high = score - width, score + width
    count = min(k, score.numel())
    if count == 0:
        return []
    kth_low = low.topk(count).values[-1]
    beyond = high.topk(count + 1).values[-1] if score.numel() > count else -math.inf
    open_ = (~mask) & (high >= kth_low) & ~(low > beyond)
    order = torch.argsort(high, descending=True, stable=True)
    indices = part.indices[row, valid]
    return [int(indices[i]) for i in order.tolist() if open_[i]]


def _final(part: TopK, sign: float, k: int, known: dict[int, Tensor]) -> TopK:
    rows = []
    for row in range(part.indices.shape[0]):
        valid, score, mask = _estimates(part, sign, row, known)
        order = torch.argsort(score, descending=True, stable=True)[:k]
        indices = part.indices[row, valid][order]
        pad = k - order.numel()
        rows.append(
            (
                torch.cat([indices, indices.new_full((pad,), -1)]),
                torch.cat([sign * score[order], score.new_full((pad,), math.nan)]),
                torch.cat([mask[order], mask.new_zeros(pad)]),
            )
        )
    return TopK(*(torch.stack(column) for column in zip(*rows, strict=True)))
