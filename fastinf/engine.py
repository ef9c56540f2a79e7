"""The engine a service loads once and calls many times, and `topk_influencers`.

engine = InfluenceEngine(model, schedule, train_set)
engine.fit()                                  # or engine.load_curvature(directory)
result = engine.topk(generated_images, k=10)  # proponents and opponents per query
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .artifacts import check_provenance, dataset_fingerprint, model_fingerprint, tensor_fingerprint
from .config import CurvatureConfig, ScoreConfig
from .curvature import Curvature, LayerGrads, fit_curvature
from .data import validate_images
from .diffusion import NoiseSchedule, Purpose, resolve_measurement
from .gradients import DrawSpec, ExampleBlock, PerExampleGradients, example_blocks, run_block
from .kernels import empty_topk, topk_merge
from .layers import capture_layers, find_layers
from .models import as_eps_model
from .progress import progress_bar
from .scoring import InfluenceResult, QueryCache, ScoreAccumulator, TopK

__all__ = ["InfluenceEngine", "topk_influencers"]


class InfluenceEngine:
    """Model + noise schedule + training set + fitted curvature, ready to attribute queries.

    Args:
        model: an ε-prediction model, `model(x_t, t, cond) -> ε̂`, or a diffusers
            `UNet2DModel` (wrapped automatically). Only its nn.Linear / nn.Conv2d layers are
            attributed through (normalisation layers and embeddings are excluded).
        schedule: the noise schedule the model was trained with.
        train_set: a map-style Dataset of `(image [C, H, W], cond)` items (cond -1 or None =
            unconditional) — pixels or VAE latents, in the model's input range.
        config: draws, measurement, damping, block sizes (`ScoreConfig`).
        sample_shape: (C, H, W) of one model input; read from the model or the data if None.
        num_workers: DataLoader workers for streaming the training set.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        train_set: Dataset,
        *,
        config: ScoreConfig | None = None,
        sample_shape: tuple[int, int, int] | None = None,
        num_workers: int = 0,
    ):
        self.model = as_eps_model(model)
        self.schedule = schedule
        self.train_set = train_set
        self.config = config or ScoreConfig()
        self.num_workers = num_workers
        self.layers = find_layers(self.model)
        first = train_set[0]
        first_image = first[0] if isinstance(first, (tuple, list)) else first
        self.sample_shape = tuple(
            sample_shape or getattr(self.model, "sample_shape", None) or first_image.shape
        )
        validate_images(first_image, self.sample_shape, what="training image 0")
        self.provenance = {
            "model": model_fingerprint(self.model),
            "dataset": dataset_fingerprint(train_set),
            "schedule": schedule.fingerprint(),
            "layers": list(self.layers),
        }
        self.curvature: Curvature | None = None
        self.index = None  # a fastinf.index.TrainingIndex after build_index / load_index

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- curvature -------------------------------------------------------------------------
    def fit(
        self, config: CurvatureConfig | None = None, indices: list[int] | None = None
    ) -> Curvature:
        """Fit (E)K-FAC on the training set (or the examples `indices`) and keep it."""
        self.curvature = fit_curvature(
            self.model,
            self.layers,
            self.schedule,
            self.train_set,
            config or CurvatureConfig(),
            provenance=self.provenance,
            indices=indices,
            num_workers=self.num_workers,
        )
        return self.curvature

    def save_curvature(self, directory: str | os.PathLike) -> None:
        self._require_curvature().save(directory)

    def load_curvature(self, directory: str | os.PathLike) -> Curvature:
        """Load a curvature saved by `save_curvature`; it must match this model and dataset."""
        self.curvature = Curvature.load(directory, self.provenance, self.layers).to(self.device)
        return self.curvature

    def _require_curvature(self) -> Curvature:
        if self.curvature is None:
            raise RuntimeError(
                "no curvature: call engine.fit() or engine.load_curvature(directory) first."
            )
        return self.curvature

    # -- index -----------------------------------------------------------------------------
    def build_index(self, directory: str | os.PathLike, config=None, **options):
        """Build (or resume) the persistent index of the training set in `directory` and
        use it for `score` (`fastinf.index.build_index`; config: `IndexConfig`)."""
        from .index import build_index

        self.index = build_index(self, directory, config, **options)
        return self.index

    def load_index(self, directory: str | os.PathLike, **options):
        """Load an index built for this model, data, curvature and ScoreConfig; `score`
        then searches it instead of streaming the training set (`unload_index` undoes).
        Options: `verify`, `sharded` (`fastinf.index.TrainingIndex.load`)."""
        from .index import TrainingIndex

        self.index = TrainingIndex.load(directory, self, **options)
        return self.index

    def unload_index(self) -> None:
        self.index = None

    # -- queries ---------------------------------------------------------------------------
    def _query_block(self, queries: Tensor, cond: Tensor | int | None) -> ExampleBlock:
        images = validate_images(queries, self.sample_shape, what="queries")
        images = images.to(self.device, self.dtype)
        if cond is not None:
            cond = torch.as_tensor(cond, dtype=torch.int64).reshape(-1).expand(images.shape[0])
            cond = cond.to(self.device)
        ids = [
            _content_id(images[row], None if cond is None else int(cond[row]))
            for row in range(images.shape[0])
        ]
        return ExampleBlock(torch.tensor(ids, dtype=torch.int64), images, cond)

    def query_gradients(self, queries: Tensor, cond=None) -> LayerGrads:
        """∇m(θ, x_q) of the configured measurement over K_q draws, per tracked layer.

        Args:
            queries: [Q, C, H, W] (or one [C, H, W]) generated samples in the model's range.
            cond: class labels [Q] (or one int) for a class-conditional model.
        """
        block = self._query_block(queries, cond)
        return self._gradients(block, self._query_spec(), self._measurement())

    def _measurement(self):
        cfg = self.config
        return resolve_measurement(cfg.measurement, cfg.t_min, cfg.t_max)

    def _query_spec(self) -> DrawSpec:
        t_range = self._measurement().timestep_range(self.schedule.num_timesteps)
        return DrawSpec(
            Purpose.QUERY_GRADIENT, self.config.query_draws, self.config.seed, 0, t_range
        )

    def _gradients(self, block: ExampleBlock, spec: DrawSpec, measurement) -> LayerGrads:
        consumer = PerExampleGradients(self.layers)
        with self._eval(), capture_layers(self.layers, consumer) as capture:
            run_block(
                capture,
                consumer,
                self.model,
                self.schedule,
                block,
                measurement,
                spec,
                self.config.batch_size,
            )
        return consumer.grads()

    def query_meta(self) -> dict:
        curvature = self._require_curvature()
        return {
            "score_config": self.config.query_fingerprint(),
            "curvature": curvature.config.fingerprint(),
            **self.provenance,
        }

    def prepare_queries(self, queries: Tensor, cond=None) -> QueryCache:
        """Query gradients, preconditioned by (G + λI)⁻¹ once and cached for scoring."""
        self._require_curvature()
        block = self._query_block(queries, cond)
        parts = []
        step = self.config.query_batch_size
        for start in range(0, block.ids.numel(), step):
            part = slice(start, start + step)
            sub = ExampleBlock(
                block.ids[part],
                block.images[part],
                None if block.cond is None else block.cond[part],
            )
            grads = self._gradients(sub, self._query_spec(), self._measurement())
            parts.append(self.precondition_queries(grads, sub.ids))
        return QueryCache.concat(parts)

    def precondition_queries(self, grads: LayerGrads, query_ids: Tensor) -> QueryCache:
        """Cache (G + λI)⁻¹ ∇m for query gradients from `query_gradients` (ids: their
        `query_ids`), e.g. to precondition one set of gradients at several dampings."""
        curvature = self._require_curvature()
        pre = curvature.precondition(grads, self.config.damping, self.config.damping_mode)
        pre = {
            n: (w.to(self.dtype), None if b is None else b.to(self.dtype))
            for n, (w, b) in pre.items()
        }
        return QueryCache(pre, query_ids, self.query_meta())

    def query_ids(self, queries: Tensor, cond=None) -> Tensor:
        """The content ids [Q] that seed each query's draws (independent of batching)."""
        return self._query_block(queries, cond).ids

    # -- scoring ---------------------------------------------------------------------------
    def score(
        self,
        queries: Tensor | QueryCache,
        k: int = 10,
        *,
        cond=None,
        indices: list[int] | None = None,
        return_scores: bool = False,
        exact_rerank: int | None = None,
        rerank_sigmas: float | None = None,
    ) -> InfluenceResult:
        """Score every training example (or `indices`) against the queries; keep the top-k.

        Train gradients (K = config.train_draws draws each) are streamed in blocks of
        `config.block_size` examples; memory is O(block), not O(N). τ > 0: proponent.
        Returns top-k proponents and opponents per query, and the full [Q, N] score matrix
        (columns in the order of `indices`, default dataset order) if `return_scores`.

        With an index loaded (`load_index`) and no `indices`, the index is searched instead
        (scores ≈ τ; `return_scores` gives the index scores in index row order);
        `exact_rerank=C` re-scores the uncertain among every query's top-C candidates
        exactly, `rerank_sigmas` sets how sure the rest must be (`TrainingIndex.topk`).
        """
        if self.index is not None and indices is None:
            return self.index.topk(
                self,
                queries,
                k,
                cond=cond,
                exact_rerank=exact_rerank,
                rerank_sigmas=rerank_sigmas,
                return_scores=return_scores,
            )
        cache = queries if isinstance(queries, QueryCache) else self.prepare_queries(queries, cond)
        if isinstance(queries, QueryCache):
            check_provenance("query cache", cache.meta, self.query_meta())
        total = len(self.train_set) if indices is None else len(indices)
        k = min(k, total)
        top = empty_topk(cache.num_queries, k, largest=True, dtype=torch.float64)
        bottom = empty_topk(cache.num_queries, k, largest=False, dtype=torch.float64)
        columns, seen = [], 0
        for block_scores in self._stream_scores(cache, indices, self._train_spec()):
            # The running top-k holds positions in the scoring order; ties go to the earlier.
            top = topk_merge(*top, block_scores, seen, largest=True)
            bottom = topk_merge(*bottom, block_scores, seen, largest=False)
            if return_scores:
                columns.append(block_scores.T.clone())
            seen += block_scores.shape[0]
        scores = torch.cat(columns, dim=1) if return_scores else None
        order = (
            torch.arange(total) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        )
        proponents, opponents = (
            TopK(torch.where(pos >= 0, order[pos.clamp_min(0)], -1), values)
            for values, pos in (top, bottom)
        )
        return InfluenceResult(proponents, opponents, scores, cache.query_ids)

    def score_matrices(
        self,
        caches: list[QueryCache],
        *,
        indices: list[int] | None = None,
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
        """
        for cache in caches:
            meta = {key: cache.meta.get(key) for key in self.provenance}
            check_provenance("query cache", meta, self.provenance)
        joined = QueryCache.concat(caches)
        spec = self._train_spec(draw_offset, num_draws)
        columns = [block.T for block in self._stream_scores(joined, indices, spec)]
        matrix = torch.cat(columns, dim=1)
        return list(matrix.split([cache.num_queries for cache in caches]))

    def _train_spec(self, draw_offset: int = 0, num_draws: int | None = None) -> DrawSpec:
        count = self.config.train_draws if num_draws is None else num_draws
        return DrawSpec(Purpose.TRAIN_GRADIENT, count, self.config.seed, draw_offset)

    def _stream_scores(self, cache: QueryCache, indices: list[int] | None, spec: DrawSpec):
        """Yield the [B, Q] float64 scores of each block of training examples, in order."""
        total = len(self.train_set) if indices is None else len(indices)
        accumulator = ScoreAccumulator(self.layers, cache)
        objective = resolve_measurement(self.config.train_objective)
        with (
            self._eval(),
            capture_layers(self.layers, accumulator) as capture,
            progress_bar(total, "score train") as bar,
        ):
            for block in example_blocks(
                self.train_set, self.config.block_size, indices, self.num_workers
            ):
                block = self._train_block(block)
                run_block(
                    capture,
                    accumulator,
                    self.model,
                    self.schedule,
                    block,
                    objective,
                    spec,
                    self.config.batch_size,
                )
                yield accumulator.scores
                bar.update(block.ids.numel())

    def with_config(self, curvature: Curvature | None = None, **changes) -> InfluenceEngine:
        """A view of this engine (same model and data) with `ScoreConfig` fields changed
        and, if given, another fitted curvature; the original engine is left as it was."""
        view = copy.copy(self)
        view.config = dataclasses.replace(self.config, **changes)
        if curvature is not None:
            view.curvature = curvature
        return view

    topk = score

    def _train_block(self, block: ExampleBlock) -> ExampleBlock:
        images = block.images
        if images.shape[1:] != self.sample_shape or not images.is_floating_point():
            validate_images(images, self.sample_shape, what=f"training examples {block.ids[0]}..")
        bad = ~torch.isfinite(images.flatten(1)).all(1)
        if bool(bad.any()):
            raise ValueError(
                f"training examples {block.ids[bad].tolist()} contain NaN/Inf pixels; clean or "
                "drop them (pass `indices=` to skip them)."
            )
        return ExampleBlock(block.ids, images.to(self.device, self.dtype), block.cond)

    def train_gradients(self, indices: list[int]) -> LayerGrads:
        """∇ℓ(θ, x_n) for the given training examples (K draws each), materialised."""
        block = self._train_block(next(example_blocks(self.train_set, len(indices), indices)))
        objective = resolve_measurement(self.config.train_objective)
        return self._gradients(block, self._train_spec(), objective)

    def self_influence(self, indices: list[int] | None = None) -> Tensor:
        """τ(n, n) = ∇ℓ_nᵀ (G + λI)⁻¹ ∇ℓ_n for each training example, [N] float64."""
        curvature = self._require_curvature()
        order = list(range(len(self.train_set))) if indices is None else list(indices)
        values = []
        step = self.config.block_size
        for start in range(0, len(order), step):
            grads = self.train_gradients(order[start : start + step])
            projected = curvature.project(grads)
            total = 0.0
            for name, (weight, bias) in projected.items():
                inv_w, inv_b = curvature.inverse_damped(
                    name, self.config.damping, self.config.damping_mode
                )
                total = total + (weight.square() * inv_w).flatten(1).sum(1)
                if bias is not None:
                    total = total + (bias.square() * inv_b).sum(1)
            values.append(total.cpu())
        return torch.cat(values)

    def _eval(self):
        return _EvalMode(self.model)


def _content_id(image: Tensor, label: int | None) -> int:
    """A 28-bit id from a query's pixels (and label): it seeds the query's draws, so a
    query's gradient never depends on which other queries share its batch."""
    key = tensor_fingerprint(image) + ("" if label is None else f":{label}")
    return int(hashlib.sha256(key.encode()).hexdigest()[:7], 16)


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


_DEFAULT_ENGINE: InfluenceEngine | None = None


def default_engine(cache_dir: str | os.PathLike | None = None) -> InfluenceEngine:
    """The embedded default: the shipped digits DDPM, its training set and EK-FAC.

    The curvature is fitted on first use and cached in `cache_dir` (default
    $FASTINF_CACHE or ./.fastinf_cache), then loaded on later calls.
    """
    global _DEFAULT_ENGINE
    if _DEFAULT_ENGINE is None:
        from .data import load_digits_dataset
        from .models import default_schedule, load_digits_model

        engine = InfluenceEngine(load_digits_model(), default_schedule(), load_digits_dataset())
        directory = Path(cache_dir or os.environ.get("FASTINF_CACHE", ".fastinf_cache")) / "digits"
        try:
            engine.load_curvature(directory)
        except FileNotFoundError:
            engine.fit()
            engine.save_curvature(directory)
        _DEFAULT_ENGINE = engine
    return _DEFAULT_ENGINE


def topk_influencers(
    query: Tensor,
    k: int = 10,
    *,
    engine: InfluenceEngine | None = None,
    cond=None,
    return_scores: bool = False,
    exact_rerank: int | None = None,
    rerank_sigmas: float | None = None,
) -> InfluenceResult:
    """The k training examples that most raised (proponents) and most lowered (opponents)
    the likelihood of each query, by EK-FAC influence on the loss measurement.

    Args:
        query: generated samples [Q, C, H, W] or one [C, H, W], in the model's input range.
        k: how many proponents and opponents per query.
        engine: a loaded `InfluenceEngine`; None uses the embedded digits default.
        cond: class labels for a class-conditional model.
        return_scores: also return the full [Q, N] score matrix.
        exact_rerank: with an index loaded on the engine, the top-C candidates of each query
            that may be re-scored exactly (see `InfluenceEngine.score`).
        rerank_sigmas: with an index, how sure (in standard deviations of the index's
            error) a candidate's place must be before it is left un-re-scored; 0: re-score
            all C.
    Returns:
        `InfluenceResult` with `proponents` / `opponents` (`TopK`: indices, scores [Q, k],
        and with an index which scores are exact).
    """
    engine = engine or default_engine()
    return engine.score(
        query,
        k,
        cond=cond,
        return_scores=return_scores,
        exact_rerank=exact_rerank,
        rerank_sigmas=rerank_sigmas,
    )
