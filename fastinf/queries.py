"""Query preparation: generated samples → (G + λI)⁻¹∇m, computed once and cached.

The step between fitting a curvature and scoring: each query's measurement gradient
(K_q draws seeded by the query's content) is preconditioned by the curvature and kept,
with a record of everything it depends on, so that scoring — exact or through the index,
now or after `save`/`load` — never pairs it with another model, curvature or damping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .artifacts import ArtifactMismatchError, check_provenance, load_artifact, save_artifact
from .curvature import Curvature
from .gradients import ExampleBlock
from .source import GradientSource, LayerGrads

__all__ = ["QueryCache", "QueryPreparer", "stack_layers"]


def stack_layers(parts: list[LayerGrads]) -> LayerGrads:
    """Per-layer tensors of several query sets, rows concatenated in order."""
    joined = {}
    for name in parts[0]:
        weights = torch.cat([part[name][0] for part in parts])
        biases = [part[name][1] for part in parts]
        joined[name] = (weights, None if biases[0] is None else torch.cat(biases))
    return joined


@dataclass
class QueryCache:
    """Preconditioned query gradients (G + λI)⁻¹∇m, one row per query, per tracked layer.

    `preconditioned[name]` = (weight [Q, d_out, d_in], bias [Q, d_out] or None);
    `query_ids` [Q] are the content hashes that seeded each query's draws;
    `meta` records the measurement, draws, damping and what the curvature was fitted on.
    """

    preconditioned: LayerGrads
    query_ids: Tensor
    meta: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return int(self.query_ids.numel())

    def select(self, rows: slice | Tensor) -> QueryCache:
        """A cache holding only the given queries (for query chunking)."""
        chosen = {
            name: (weight[rows], None if bias is None else bias[rows])
            for name, (weight, bias) in self.preconditioned.items()
        }
        return QueryCache(chosen, self.query_ids[rows], dict(self.meta))

    @staticmethod
    def concat(caches: list[QueryCache]) -> QueryCache:
        """One cache of the queries of `caches`, in order; they must have been prepared
        the same way (same model, data, curvature, measurement, draws and damping)."""
        if not caches:
            raise ValueError("QueryCache.concat needs at least one cache.")
        first = caches[0].meta
        for number, cache in enumerate(caches[1:], start=1):
            differing = sorted(
                k for k in first.keys() | cache.meta.keys() if first.get(k) != cache.meta.get(k)
            )
            if differing:
                raise ArtifactMismatchError(
                    f"query caches 0 and {number} were prepared differently ({', '.join(differing)}"
                    "); their scores would not be comparable. Prepare them with one engine, or "
                    "score them side by side with `engine.score_matrices(caches)`."
                )
        joined = stack_layers([cache.preconditioned for cache in caches])
        return QueryCache(joined, torch.cat([c.query_ids for c in caches]), dict(first))

    def save(self, directory: str | os.PathLike) -> None:
        """Write `queries.safetensors` + `queries.json`."""
        tensors = {"query_ids": self.query_ids}
        for name, (weight, bias) in self.preconditioned.items():
            tensors[f"{name}::weight"] = weight
            if bias is not None:
                tensors[f"{name}::bias"] = bias
        save_artifact(
            directory, "queries", tensors, {"meta": self.meta, "layers": list(self.preconditioned)}
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_meta: dict | None = None) -> QueryCache:
        """Load a query cache; check it matches the engine's curvature and score config."""
        tensors, record = load_artifact(directory, "queries")
        if expected_meta is not None:
            check_provenance("query cache", record["meta"], expected_meta)
        layers = {n: (tensors[f"{n}::weight"], tensors.get(f"{n}::bias")) for n in record["layers"]}
        return cls(layers, tensors["query_ids"], record["meta"])


class QueryPreparer:
    """Prepares queries for one gradient source and one fitted curvature.

    `prepare(images)` → `QueryCache`; `check(cache)` refuses a cache prepared for anything
    else. Queries are processed `ScoreConfig.query_batch_size` at a time; each query's draws
    depend only on its content, so the result does not depend on that batching.
    """

    def __init__(self, source: GradientSource, curvature: Curvature):
        self.source = source
        self.curvature = curvature

    def meta(self) -> dict:
        """What a cache prepared here depends on (`QueryCache.meta`)."""
        return {
            "score_config": self.source.config.query_fingerprint(),
            "curvature": self.curvature.config.fingerprint(),
            "curvature_tensors": self.curvature.fingerprint(),
            **self.source.provenance,
        }

    def check(self, cache: QueryCache) -> QueryCache:
        """`cache`, if it was prepared for this source, curvature and configuration."""
        check_provenance("query cache", cache.meta, self.meta())
        return cache

    def prepare(self, queries: Tensor | QueryCache, cond=None) -> QueryCache:
        """Query gradients, preconditioned by (G + λI)⁻¹ (a cache is checked and kept).

        Args:
            queries: [Q, C, H, W] (or one [C, H, W]) generated samples, or a `QueryCache`.
            cond: class labels [Q] (or one int) for a class-conditional model.
        """
        if isinstance(queries, QueryCache):
            return self.check(queries)
        source = self.source
        block = source.query_block(queries, cond)
        parts = []
        step = source.config.query_batch_size
        for start in range(0, block.ids.numel(), step):
            part = slice(start, start + step)
            sub = ExampleBlock(
                block.ids[part],
                block.images[part],
                None if block.cond is None else block.cond[part],
            )
            grads = source.gradients(sub, source.measurement(), source.query_spec())
            parts.append(self.precondition(grads, sub.ids))
        return QueryCache.concat(parts)

    def precondition(self, grads: LayerGrads, query_ids: Tensor) -> QueryCache:
        """Cache (G + λI)⁻¹ ∇m of query gradients (ids: their content ids), in the model's
        dtype — e.g. to precondition one set of gradients at several dampings."""
        config, dtype = self.source.config, self.source.dtype
        pre = self.curvature.precondition(grads, config.damping, config.damping_mode)
        pre = {n: (w.to(dtype), None if b is None else b.to(dtype)) for n, (w, b) in pre.items()}
        _check_not_vanished(grads, pre, config.damping, dtype)
        return QueryCache(pre, query_ids, self.meta())


def _check_not_vanished(grads: LayerGrads, pre: LayerGrads, damping: float, dtype) -> None:
    """A damping so large that (G + λI)⁻¹∇m underflows to zero in the model's dtype would
    make every score 0: refuse it rather than rank by nothing."""
    nonzero = any(bool(w.ne(0).any()) for w, _ in grads.values())
    if nonzero and not any(bool(w.ne(0).any()) for w, _ in pre.values()):
        raise ValueError(
            f"damping={damping:g} is so large that the preconditioned queries are all 0 in "
            f"{dtype} (every score would be 0); use a smaller damping, or "
            "damping_mode='relative'."
        )
