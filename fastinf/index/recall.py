"""How far to trust a list that was searched rather than scanned: the first stage's recall,
measured once when the index is built.

A few training images are taken as queries (their measurement gradients, prepared exactly
as real queries are) against a pool of training examples (the calibration examples). Their
exact scores come from the exact scorer; their index scores from the build's encoder and
stored values, as the search sees them. Recall@k among the top-C candidates is the fraction
of each query's true top-k (proponents and opponents, the query's own image left out) that
the index puts among its top C: the chance that an exact re-rank of C candidates can find
a true top-k member at all. The pool is smaller than the training set, so this is an
estimate; it reports how the compression ranks, not a guarantee.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..curvature import EigenbasisCurvature
from ..gradients import collate_items
from ..queries import QueryPreparer
from ..scoring import ExactScorer
from ..source import GradientSource
from .config import IndexConfig
from .encode import Quantizer, VectorEncoder, as_float64

__all__ = ["RECALL_K", "first_stage_recall"]

RECALL_K = 10
MAX_QUERIES = 8


def first_stage_recall(
    source: GradientSource,
    curvature: EigenbasisCurvature,
    config: IndexConfig,
    encoder: VectorEncoder,
    quantizer: Quantizer,
    pool: list[int],
    pool_vectors: Tensor,
) -> dict:
    """{"k", "candidates", "recall_at_k", "recall_at_candidates", "pool", "queries"}.

    Args:
        pool_vectors: the pool's index vectors [len(pool), dim], as the build's calibration
            computed them (the pool is its calibration examples).
    """
    # k well below the pool's size, else any ranking would find the true top-k.
    k = min(RECALL_K, (len(pool) - 1) // 4)
    if k < 1:
        return {}
    candidates = min(max(config.exact_rerank, k), len(pool) - 1)
    asked = pool[: min(MAX_QUERIES, len(pool))]
    # Training examples as queries, each measured with its own conditioning (a conditional
    # model's; an unconditional one ignores the labels a dataset may carry).
    images, cond = collate_items([source.train_set[i] for i in asked])
    if not getattr(source.model, "is_conditional", False):
        cond = None
    preparer = QueryPreparer(source, curvature)
    cache = preparer.prepare(images, cond)
    exact = ExactScorer(source, preparer).scores(cache, pool)
    queries = quantizer.query(encoder.encode(as_float64(cache.preconditioned), preconditioned=True))
    stored = quantizer.values(quantizer.store(pool_vectors))
    approximate = torch.from_numpy(queries.astype(np.float64) @ stored.astype(np.float64).T)
    own = torch.tensor([[example == query for example in pool] for query in asked])
    found = {k: [], candidates: []}
    for sign in (1.0, -1.0):
        truth = (sign * exact).masked_fill(own, -torch.inf).topk(k, dim=1).indices
        ranked = (sign * approximate).masked_fill(own, -torch.inf)
        for width in found:
            listed = ranked.topk(width, dim=1).indices
            for row in range(len(asked)):
                hits = np.isin(truth[row].numpy(), listed[row].numpy()).mean()
                found[width].append(float(hits))
    return {
        "k": k,
        "candidates": candidates,
        "recall_at_k": round(float(np.mean(found[k])), 4),
        "recall_at_candidates": round(float(np.mean(found[candidates])), 4),
        "pool": len(pool),
        "queries": len(asked),
    }
