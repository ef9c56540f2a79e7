"""Scoring through the index: query → index vector → search → bounded exact re-rank.

    scorer = IndexScorer(TrainingIndex.load("index/", source, curvature), exact_scorer)
    result = scorer.topk(queries, k=10)                   # search + bounded exact re-rank
    result = scorer.topk(queries, k=10, exact_rerank=0)   # search only: milliseconds
    result = scorer.topk(queries, k=10, rerank_sigmas=0)  # exact τ for all top-C candidates

The index scorer answers the same `Scorer.topk` as the exact one (`engine.score` calls
whichever the engine holds); the exact scores of re-ranked candidates come from the
`ExactScorer` it was given, so both paths share one definition of τ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..queries import QueryCache
from ..scoring import ExactScorer, InfluenceResult, TopK, clip_k
from .encode import as_float64
from .identity import check_curvature, check_gradients
from .index import TrainingIndex

__all__ = ["IndexScorer", "bounded_rerank"]


class IndexScorer:
    """Top-k proponents and opponents of queries by index search, optionally re-ranked.

    Args:
        index: a loaded `TrainingIndex`, built with the exact scorer's gradient draws and
            damping (checked).
        exact: the `ExactScorer` of the same source and curvature, for re-ranking and for
            scoring chosen `indices`.
    """

    def __init__(self, index: TrainingIndex, exact: ExactScorer):
        check_gradients(index.manifest, exact.source.config)
        if exact.preparer is not None:
            check_curvature(index.manifest, exact.preparer.curvature)
        self.index = index
        self.exact = exact
        self.source = exact.source
        self.preparer = exact.preparer

    def query_vectors(self, queries: Tensor | QueryCache, cond=None) -> tuple[Tensor, Tensor]:
        """(index vectors [Q, dim] float64, query ids [Q]) of query images or a `QueryCache`.

        Images: ∇m over K_q draws (the source's measurement), rotated into the eigenbasis,
        whitened by W^½ and compressed exactly like the train side. A cache of
        (G + λI)⁻¹∇m is un-whitened by W^-½ instead, giving the same vector.
        """
        encoder = self.index.encoder
        if isinstance(queries, QueryCache):
            cache = self.preparer.check(queries)
            pre = as_float64(cache.preconditioned)
            return encoder.encode(pre, preconditioned=True), cache.query_ids
        block = self.source.query_block(queries, cond)
        grads = self.source.gradients(block, self.source.measurement(), self.source.query_spec())
        return encoder.encode(as_float64(grads)), block.ids

    def topk(
        self,
        queries: Tensor | QueryCache,
        k: int = 10,
        *,
        cond=None,
        indices: Sequence[int] | None = None,
        return_scores: bool = False,
        exact_rerank: int | None = None,
        rerank_sigmas: float | None = None,
    ) -> InfluenceResult:
        """Proponents and opponents of each query by index search, optionally re-ranked.

        Args:
            indices: score only these training examples — exactly, by the exact scorer.
            exact_rerank: C > 0 takes every query's top-C candidates of each sign and
                re-scores them exactly (their train gradients are recomputed). With
                `IndexConfig.rerank_sigmas` > 0 and a compression with an error model, only
                the candidates whose place in or out of the top-k is uncertain are
                re-scored (`bounded_rerank`; `TopK.exact` marks exact scores); else all of
                them, and the lists are exact whenever the true top-k are among the
                candidates. None: the index's `IndexConfig.exact_rerank`; 0: search only.
            rerank_sigmas: overrides `IndexConfig.rerank_sigmas` (0: re-score all C).
            return_scores: also return the index scores of every row, [Q, N] (row order).
        """
        if indices is not None:
            return self.exact.topk(
                queries, k, cond=cond, indices=indices, return_scores=return_scores
            )
        index = self.index
        rerank = index.config.exact_rerank if exact_rerank is None else exact_rerank
        if rerank:
            queries = self.preparer.prepare(queries, cond)
        vectors, query_ids = self.query_vectors(queries, cond)
        k = clip_k(k, index.num_examples)
        scores = index.scores(vectors) if return_scores else None
        recall = index.manifest.get("first_stage_recall") or None
        if not rerank:
            proponents, opponents = index.search(vectors, k)
            return InfluenceResult(proponents, opponents, scores, query_ids, recall)
        found = index.search(vectors, max(rerank, k))
        sigmas = index.config.rerank_sigmas if rerank_sigmas is None else rerank_sigmas
        model = index.error_model(vectors) if sigmas > 0 else None
        if model is None:
            flat = torch.cat([part.indices.flatten() for part in found])
            candidates = sorted(set(flat[flat >= 0].tolist()))
            exact = self.exact.topk(queries, k, indices=candidates)
            return InfluenceResult(exact.proponents, exact.opponents, scores, query_ids, recall)
        sketch, rounding = model
        norms = index.norms(torch.cat([part.indices for part in found], 1).clamp_min(0))
        sigma = (sketch[:, None] * norms.square() + rounding[:, None]).sqrt()
        spread = list(sigma.split(found[0].indices.shape[1], dim=1))
        rescore = _ExactScores(self.exact, queries)
        proponents, opponents = bounded_rerank(found, spread, k, sigmas, rescore, rescore.batch)
        return InfluenceResult(proponents, opponents, scores, query_ids, recall)


class _ExactScores:
    """Exact τ of every query against chosen training examples, remembered once computed."""

    def __init__(self, exact: ExactScorer, queries: QueryCache):
        self.exact, self.queries = exact, queries
        self.known: dict[int, Tensor] = {}
        # Examples per call: one forward/backward pass of the source's batch.
        config = exact.source.config
        self.batch = max(1, config.batch_size // config.train_draws)

    def __call__(self, examples: list[int]) -> None:
        scores = self.exact.scores(self.queries, examples)
        for column, example in enumerate(examples):
            self.known[example] = scores[:, column]


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
    `TrainingIndex.error_model`) until it is re-scored exactly. Each query goes through
    rounds of its own: a round re-scores up to `batch` of its candidates, highest upper bound
    first, among those that could be in the top-k (upper bound ≥ the k-th largest lower
    bound) and are not surely in it (lower bound above the (k+1)-th largest upper bound);
    its rounds stop when none is left. A query uses only the exact scores it asked for, so
    its answer is the same whether it was scored alone or in a batch (a service's
    micro-batches); the queries of a round share one re-scoring pass, and no example is
    re-scored twice. Returned scores are exact where `TopK.exact`, else the index's.

    Args:
        found: (proponents, opponents) index candidates [Q, C] (opponents: ascending).
        spread: σ of each candidate's index score, [Q, C] per sign.
        exact: called with a list of training indices, fills `exact.known[index]` with
            their exact τ for every query [Q].
        batch: most examples re-scored per query and round, and per call of `exact`.
    """
    signs = (1.0, -1.0)
    asked: list[set[int]] = [set() for _ in range(found[0].indices.shape[0])]
    while True:
        wanted: list[int] = []
        progressed = False
        for row, seen in enumerate(asked):
            pending = [
                _uncertain(part, sign, sigma, row, k, sigmas, exact.known, seen)
                for part, sign, sigma in zip(found, signs, spread, strict=True)
            ]
            chosen: list[int] = []
            for rank in range(max(map(len, pending), default=0)):
                for items in pending:
                    if rank < len(items) and items[rank] not in chosen and len(chosen) < batch:
                        chosen.append(items[rank])
            seen.update(chosen)
            progressed = progressed or bool(chosen)
            wanted += [example for example in chosen if example not in exact.known]
        if not progressed:
            break
        wanted = list(dict.fromkeys(wanted))
        for start in range(0, len(wanted), batch):
            exact(wanted[start : start + batch])
    return tuple(
        _final(part, sign, k, exact.known, asked) for part, sign in zip(found, signs, strict=True)
    )


def _estimates(part: TopK, sign: float, row: int, known: dict[int, Tensor], seen: set[int]):
    """(valid candidate positions, sign × score, exact mask) of one query's list; exact
    scores only of the examples this query asked for (`seen`)."""
    valid = torch.nonzero(part.indices[row] >= 0).flatten()
    indices = part.indices[row, valid].tolist()
    scores = part.scores[row, valid].double().clone()
    mask = torch.zeros(len(indices), dtype=torch.bool)
    for position, example in enumerate(indices):
        if example in seen:
            scores[position] = known[example][row]
            mask[position] = True
    return valid, sign * scores, mask


def _uncertain(part, sign, sigma, row, k, sigmas, known, seen) -> list[int]:
    valid, score, mask = _estimates(part, sign, row, known, seen)
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


def _final(part: TopK, sign: float, k: int, known: dict[int, Tensor], asked) -> TopK:
    rows = []
    for row in range(part.indices.shape[0]):
        valid, score, mask = _estimates(part, sign, row, known, asked[row])
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
