"""Scoring: cached preconditioned queries, train gradients streamed in blocks, running top-k.

τ(q, n) = ∇m(θ, x_q)ᵀ (G + λI)⁻¹ ∇ℓ(θ, x_n) (DESIGN §1 Score). Each query's
(G + λI)⁻¹∇m is computed once and cached; each block of train gradients is contracted with
all cached queries layer by layer as the backward pass delivers that layer's rows, so no
per-example gradient of the whole model ever exists in memory. Positive τ: a proponent
(x_n made the query more likely); negative: an opponent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .artifacts import check_provenance, load_artifact, save_artifact
from .curvature import LayerGrads
from .gradients import BlockConsumer
from .kernels import score_params
from .layers import LayerCall

__all__ = ["InfluenceResult", "QueryCache", "ScoreAccumulator", "TopK"]


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
        names = list(caches[0].preconditioned)
        joined = {}
        for name in names:
            weights = torch.cat([c.preconditioned[name][0] for c in caches])
            biases = [c.preconditioned[name][1] for c in caches]
            joined[name] = (weights, None if biases[0] is None else torch.cat(biases))
        return QueryCache(joined, torch.cat([c.query_ids for c in caches]), dict(caches[0].meta))

    def save(self, directory) -> None:
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
    def load(cls, directory, expected_meta: dict | None = None) -> QueryCache:
        """Load a query cache; check it matches the engine's curvature and score config."""
        tensors, record = load_artifact(directory, "queries")
        if expected_meta is not None:
            check_provenance("query cache", record["meta"], expected_meta)
        layers = {n: (tensors[f"{n}::weight"], tensors.get(f"{n}::bias")) for n in record["layers"]}
        return cls(layers, tensors["query_ids"], record["meta"])


class ScoreAccumulator(BlockConsumer):
    """Layer consumer: scores[b, q] += ⟨V_q, G_b⟩ for each layer as its rows arrive.

    Linear layers (few rows) contract their rows with `fastinf.kernels.score_params` (the
    fused Triton kernel on CUDA never writes G_b = Σ_m b_m a_mᵀ to memory); convolutions form
    G_b [B, d_out, d_in] for one layer at a time with the grouped weight-gradient
    convolution and contract it with one GEMM. Scores accumulate in float64 in
    backward-layer order.
    """

    def __init__(self, layers, cache: QueryCache):
        self.cache = cache
        super().__init__(layers)

    def reset(self, num_examples: int) -> None:
        super().reset(num_examples)
        self.scores = torch.zeros(num_examples, self.cache.num_queries, dtype=torch.float64)

    def __call__(self, name: str, call: LayerCall) -> None:
        query_weight, query_bias = self.cache.preconditioned[name]
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
    `scores`: the full [Q, N] matrix when requested, else None; `query_ids`: draw seeds.
    """

    proponents: TopK
    opponents: TopK
    scores: Tensor | None
    query_ids: Tensor

    def to_dict(self) -> dict:
        return {
            "sign_convention": "positive score = proponent (made the query more likely)",
            "query_ids": self.query_ids.tolist(),
            "proponents": self.proponents.to_lists(),
            "opponents": self.opponents.to_lists(),
        }
