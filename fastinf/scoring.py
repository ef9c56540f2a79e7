"""Scoring: cached preconditioned queries, train gradients streamed in blocks, running top-k.

τ(q, n) = ∇m(θ, x_q)ᵀ (G + λI)⁻¹ ∇ℓ(θ, x_n) (DESIGN §1 Score). Each query's
(G + λI)⁻¹∇m is computed once and cached; each block of train gradients is contracted with
all cached queries layer by layer as the backward pass delivers that layer's rows, so no
per-example gradient of the whole model ever exists in memory. Positive τ: a proponent
(x_n made the query more likely); negative: an opponent.

Under `torch.distributed` (`torchrun`) a pass over the training set is shared: the
examples are cut into blocks of `ScoreConfig.block_size` scoring positions, rank r scores
blocks r, r + W, … (`GradientSource.share`), and the ranks' running top-k lists (or score
columns) are gathered and merged, so every rank returns what one process would.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .artifacts import check_provenance, tensor_fingerprint
from .curvature.base import NO_CURVATURE
from .data import validate_indices
from .distributed import all_gather_objects, merge_topk, rank_world
from .gradients import BlockConsumer
from .kernels import empty_topk, score_params, topk_merge
from .layers import LayerCall
from .queries import QueryCache, QueryPreparer, stack_layers
from .source import GradientSource, LayerGrads

__all__ = ["ExactScorer", "InfluenceResult", "ScoreAccumulator", "Scorer", "TopK", "clip_k"]


class ScoreAccumulator(BlockConsumer):
    """Layer consumer: scores[b, q] += ⟨V_q, G_b⟩ for each layer as its rows arrive.

    Linear layers (few rows) contract their rows with `fastinf.kernels.score_params` (the
    fused Triton kernel on CUDA never writes G_b = Σ_m b_m a_mᵀ to memory); convolutions form
    G_b [B, d_out, d_in] for one layer at a time with the grouped weight-gradient
    convolution and contract it with one GEMM. Scores accumulate in float64 in
    backward-layer order.
    """

    def __init__(self, layers, preconditioned: LayerGrads):
        self.preconditioned = preconditioned
        self.num_queries = next(iter(preconditioned.values()))[0].shape[0]
        super().__init__(layers)

    def reset(self, num_examples: int) -> None:
        super().reset(num_examples)
        self.scores = torch.zeros(num_examples, self.num_queries, dtype=torch.float64)

    def __call__(self, name: str, call: LayerCall) -> None:
        query_weight, query_bias = self.preconditioned[name]
        if call.info.kind == "conv2d":
            # Unfolding a convolution's input costs more than the whole backward pass, so
            # its per-example gradients come from the grouped weight-gradient convolution.
            weight, bias = call.example_gradients(self.count)
            layer = weight.flatten(1) @ query_weight.flatten(1).to(weight).T
        else:
            act, grad = call.rows()
            act = act.reshape(self.count, -1, act.shape[-1])
            grad = grad.reshape(self.count, -1, grad.shape[-1])
            layer = score_params(act, grad, query_weight.to(act))
            bias = grad.sum(1) if query_bias is not None else None
        if query_bias is not None:
            layer = layer + bias @ query_bias.to(bias).T
        self.scores[self.part] += layer.double().cpu()


@dataclass(frozen=True)
class TopK:
    """Training indices [Q, k] (int64, dataset positions) and their scores [Q, k] per query.

    Proponents are sorted by descending score, opponents by ascending score. Entries past
    the number of scored examples have index -1. `exact` [Q, k] (bool) says which scores are
    exact τ when some come from an index (None: all exact).
    """

    indices: Tensor
    scores: Tensor
    exact: Tensor | None = None

    def to_lists(self) -> dict[str, list]:
        lists = {"indices": self.indices.tolist(), "scores": self.scores.tolist()}
        if self.exact is not None:
            lists["exact"] = self.exact.tolist()
        return lists


@dataclass(frozen=True)
class InfluenceResult:
    """What `topk_influencers` returns.

    `proponents`: highest τ (removing them is predicted to raise the query's measurement
    the most — they made the query more likely); `opponents`: lowest (most negative) τ;
    `scores`: the full [Q, N] matrix when requested, else None; `query_ids`: draw seeds;
    `search_recall`: for an answer searched in an index, the recall of its first stage
    measured when the index was built (`fastinf.index.recall`), else None.
    """

    proponents: TopK
    opponents: TopK
    scores: Tensor | None
    query_ids: Tensor
    search_recall: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "sign_convention": "positive score = proponent (made the query more likely)",
            "query_ids": self.query_ids.tolist(),
            "proponents": self.proponents.to_lists(),
            "opponents": self.opponents.to_lists(),
        }
        if self.search_recall is not None:
            out["search_recall"] = self.search_recall
        return out


def clip_k(k: int, total: int) -> int:
    """k, checked (≥ 1) and clipped to the number of scored examples, with a warning."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1 (how many proponents and opponents).")
    if k > total:
        warnings.warn(
            f"k={k} exceeds the {total} scored examples; returning {total}.", stacklevel=3
        )
    return min(k, total)


class Scorer(Protocol):
    """What answers `engine.score`: top-k proponents and opponents of each query."""

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
    ) -> InfluenceResult: ...


class ExactScorer:
    """Exact τ against every training example, train gradients streamed block by block.

    Train gradients (K = `ScoreConfig.train_draws` draws each) are computed in blocks of
    `block_size` examples and contracted with every cached query as the backward pass
    delivers each layer; memory is O(block), not O(N). Scores are exact, so the re-rank
    options of `Scorer.topk` have nothing to do here.

    Under an initialised `torch.distributed` process group, `topk` and `score_matrices`
    are collective: every rank must call them with the same arguments. Each rank prepares
    the queries itself (cheap, identical) and scores only its share of the blocks; the
    ranks' top-k lists are merged (ties to the earlier scoring position, as in one
    process) and score columns gathered, so every rank returns the one-process result.
    `scores` (a few chosen examples, e.g. a re-rank's candidates) is not shared: a rank may
    call it alone.
    """

    def __init__(self, source: GradientSource, preparer: QueryPreparer | None):
        self.source = source
        self.preparer = preparer  # None: no curvature yet, only `score_matrices` of caches

    def _require_preparer(self) -> QueryPreparer:
        if self.preparer is None:
            raise RuntimeError(NO_CURVATURE)
        return self.preparer

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
        """Score every training example (or `indices`) against the queries; keep the top-k.

        Returns top-k proponents and opponents per query, and the full [Q, N] score matrix
        (columns in the order of `indices`, default dataset order) if `return_scores`
        (under torch.distributed, gathered on every rank: O(Q·N) memory each).
        """
        cache = self._require_preparer().prepare(queries, cond)
        if indices is not None:
            # Every rank checks them all, so a bad index fails every rank, not one.
            indices = validate_indices(indices, len(self.source.train_set))
        total = len(self.source.train_set) if indices is None else len(indices)
        k = clip_k(k, total)
        top = empty_topk(cache.num_queries, k, largest=True, dtype=torch.float64)
        bottom = empty_topk(cache.num_queries, k, largest=False, dtype=torch.float64)
        columns = []
        spec = self.source.train_spec()
        self._agree([cache], indices, spec, {"k": k, "return_scores": return_scores})
        for start, block_scores in self._shared_stream(cache.preconditioned, indices, spec):
            # The running top-k holds positions in the scoring order; ties go to the earlier.
            top = topk_merge(*top, block_scores, start, largest=True)
            bottom = topk_merge(*bottom, block_scores, start, largest=False)
            if return_scores:
                columns.append((start, block_scores.T.clone()))
        if rank_world()[1] > 1:
            top = merge_topk(*top, k)
            values, positions = merge_topk(-bottom[0], bottom[1], k)
            bottom = (-values, positions)
        scores = _gather_columns(columns, cache.num_queries, total) if return_scores else None
        order = (
            torch.arange(total) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        )
        proponents, opponents = (
            TopK(torch.where(pos >= 0, order[pos.clamp_min(0)], -1), values)
            for values, pos in (top, bottom)
        )
        return InfluenceResult(proponents, opponents, scores, cache.query_ids)

    def scores(self, cache: QueryCache, examples: Sequence[int]) -> Tensor:
        """τ [Q, len(examples)] float64 of a prepared cache against chosen examples.

        Computed by this rank alone, even under torch.distributed (not a collective).
        """
        self._require_preparer().check(cache)
        spec = self.source.train_spec()
        blocks = self.stream(cache.preconditioned, examples, spec)
        return torch.cat([block.T for block in blocks], dim=1)

    def score_matrices(
        self,
        caches: list[QueryCache],
        *,
        indices: Sequence[int] | None = None,
        draw_offset: int = 0,
        num_draws: int | None = None,
    ) -> list[Tensor]:
        """Full score matrices [Q_i, N] of several query caches in one pass over the data.

        The caches may come from different curvatures, dampings or measurements (a damping
        sweep, the baselines of an evaluation) as long as they were prepared for this model
        and training set: the train gradients are computed once and contracted with all of
        them. Train gradients are the mean over draws `draw_offset .. draw_offset +
        num_draws - 1` (default: the configured K from 0), so disjoint draw ranges can be
        scored separately and averaged, weighted by their draw counts, into any K.
        Under torch.distributed the pass is shared and the matrices gathered on every rank.
        """
        provenance = self.source.provenance
        for cache in caches:
            meta = {key: cache.meta.get(key) for key in provenance}
            check_provenance("query cache", meta, provenance)
        if indices is not None:
            indices = validate_indices(indices, len(self.source.train_set))
        joined = stack_layers([cache.preconditioned for cache in caches])
        spec = self.source.train_spec(draw_offset, num_draws)
        total = len(self.source.train_set) if indices is None else len(indices)
        self._agree(caches, indices, spec, {})
        columns = [(start, block.T) for start, block in self._shared_stream(joined, indices, spec)]
        matrix = _gather_columns(columns, sum(cache.num_queries for cache in caches), total)
        return list(matrix.split([cache.num_queries for cache in caches]))

    def _agree(
        self, caches: list[QueryCache], indices: list[int] | None, spec, options: dict
    ) -> None:
        """Under torch.distributed, fail on every rank unless all ranks are about to score
        the same queries against the same examples: ranks that differ (another file on one
        node, another option) would merge into a wrong answer, or wait for each other forever.
        """
        world = rank_world()[1]
        if world == 1:
            return
        chosen = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        facts = {
            "queries": [cache.query_ids.tolist() for cache in caches],
            "model, training set, curvature and query options": [cache.meta for cache in caches],
            "examples scored": None if chosen is None else tensor_fingerprint(chosen),
            "train draws": spec,
            "block_size": self.source.config.block_size,
            **options,
        }
        views = all_gather_objects(facts)
        differing = [key for key in facts if any(view[key] != views[0][key] for view in views)]
        if differing:
            raise ValueError(
                f"the {world} ranks disagree on {'; '.join(differing)}: under torch.distributed "
                "every rank must make the same scoring call. Run the same command with the same "
                "weights, data, curvature and queries on every node."
            )

    def _shared_stream(
        self, preconditioned: LayerGrads, indices: list[int] | None, spec
    ) -> Iterator[tuple[int, Tensor]]:
        """(first scoring position, [B, Q] scores) of each block this rank scores.

        Scoring positions 0..total-1 (into `indices`, default the dataset) are cut into
        blocks of `block_size`; this rank takes its share of the blocks
        (`GradientSource.share`), in one stream so that data loading runs ahead.
        """
        total = len(self.source.train_set) if indices is None else len(indices)
        size = self.source.config.block_size
        blocks = range(0, total, size)
        starts = self.source.share(blocks)
        if len(starts) == len(blocks):
            chosen = indices
        else:
            order = range(total) if indices is None else indices
            chosen = [order[p] for start in starts for p in range(start, min(start + size, total))]
            if not chosen:
                return
        rank, world = rank_world()
        desc = "score train" if world == 1 else f"score train [rank {rank}/{world}]"
        stream = self.stream(preconditioned, chosen, spec, desc=desc)
        yield from zip(starts, stream, strict=True)

    def stream(
        self,
        preconditioned: LayerGrads,
        indices: Sequence[int] | None,
        spec,
        *,
        desc: str = "score train",
    ) -> Iterator[Tensor]:
        """Yield the [B, Q] float64 scores of each block of training examples, in order
        (every example, or `indices`, by this process alone)."""
        accumulator = ScoreAccumulator(self.source.layers, preconditioned)
        source = self.source
        for _ in source.stream(accumulator, source.objective(), spec, indices=indices, desc=desc):
            yield accumulator.scores


def _gather_columns(columns: list[tuple[int, Tensor]], num_queries: int, total: int) -> Tensor:
    """Every rank's (first scoring position, [Q, B] columns) → the [Q, total] matrix."""
    matrix = torch.empty(num_queries, total, dtype=torch.float64)
    for part in all_gather_objects(columns):
        for start, block in part:
            matrix[:, start : start + block.shape[1]] = block
    return matrix
