"""The engine a service loads once and calls many times, and `topk_influencers`.

    engine = InfluenceEngine(model, schedule, train_set)
    engine.fit()                                   # or engine.load_curvature(directory)
    result = engine.score(generated_images, k=10)  # proponents and opponents per query

The engine is a facade over four steps, each its own object:

    GradientSource   model + schedule + data + draws: every forward/backward pass
      → Curvature    fit (`fastinf.curvature.STRATEGIES`) or load
      → QueryPreparer  queries → (G + λI)⁻¹∇m, a `QueryCache`
      → Scorer       `ExactScorer` (stream the training set) or, with an index loaded,
                     `IndexScorer` (search + bounded exact re-rank through the exact scorer)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .artifacts import ArtifactCorruptError, ArtifactMismatchError
from .config import CurvatureConfig, ScoreConfig
from .curvature import Curvature, fit_curvature, load_curvature, require_eigenbasis
from .curvature.base import NO_CURVATURE
from .curvature.passes import finish_fit
from .diffusion import NoiseSchedule
from .index.build import build_index
from .index.config import IndexConfig
from .index.index import TrainingIndex
from .index.scorer import IndexScorer
from .layers import LayerSelect
from .queries import QueryCache, QueryPreparer
from .scoring import ExactScorer, InfluenceResult, Scorer
from .source import GradientSource, LayerGrads

__all__ = ["InfluenceEngine", "default_engine", "default_index", "topk_influencers"]


class InfluenceEngine:
    """Model + noise schedule + training set + fitted curvature, ready to attribute queries.

    Args:
        model, schedule, train_set, config, sample_shape, num_workers, verify, layers: what
            the gradient source is built on (`fastinf.source.GradientSource`): an
            ε-prediction model or a diffusers `UNet2DModel`, its noise schedule, a
            map-style Dataset of `(image, cond)` items, the draws and damping
            (`ScoreConfig`), and which layers are attributed (None: every trainable
            Linear/Conv2d; name globs such as "*attn*"; or a predicate).
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
        verify: str | None = None,
        layers: LayerSelect = None,
    ):
        self.source = GradientSource(
            model,
            schedule,
            train_set,
            config,
            sample_shape=sample_shape,
            num_workers=num_workers,
            verify=verify,
            layers=layers,
        )
        self.curvature: Curvature | None = None
        self.index: TrainingIndex | None = None  # searched by `score` while loaded

    # -- what the engine is built on (the gradient source's) -------------------------------
    model = property(lambda self: self.source.model)
    schedule = property(lambda self: self.source.schedule)
    train_set = property(lambda self: self.source.train_set)
    layers = property(lambda self: self.source.layers)
    sample_shape = property(lambda self: self.source.sample_shape)
    provenance = property(lambda self: self.source.provenance)
    device = property(lambda self: self.source.device)
    dtype = property(lambda self: self.source.dtype)

    @property
    def config(self) -> ScoreConfig:
        return self.source.config

    @config.setter
    def config(self, config: ScoreConfig) -> None:
        self.source = self.source.with_config(config)

    # -- curvature -------------------------------------------------------------------------
    def fit(
        self,
        config: CurvatureConfig | None = None,
        indices: Sequence[int] | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> Curvature:
        """Fit the curvature (`CurvatureConfig.strategy`, default EK-FAC) on the training
        set (or the examples `indices`) and keep it; a loaded index is unloaded.

        Under torchrun the ranks share the examples and all keep the same curvature. With
        `checkpoint_dir`, the fit saves its progress after every chunk of examples in
        `checkpoint_dir/fit_progress`, and the same call after an interruption resumes it;
        once complete, the curvature is written to `checkpoint_dir` (`save_curvature`, by
        rank 0) and the progress deleted. If that write fails (OSError), `self.curvature`
        holds the fit and the progress is kept.
        """
        self.curvature = fit_curvature(self.source, config, indices, checkpoint_dir)
        self.index = None
        if checkpoint_dir is not None:
            finish_fit(self.curvature, checkpoint_dir)
        return self.curvature

    def save_curvature(self, directory: str | os.PathLike) -> None:
        self._require_curvature().save(directory)

    def load_curvature(self, directory: str | os.PathLike) -> Curvature:
        """Load a curvature saved by `save_curvature`; it must match this model and dataset.
        A loaded index is unloaded."""
        curvature = load_curvature(directory, self.provenance, self.layers)
        self.curvature = curvature.to(self.device)
        self.index = None
        return self.curvature

    def _require_curvature(self) -> Curvature:
        if self.curvature is None:
            raise RuntimeError(NO_CURVATURE)
        return self.curvature

    # -- index -----------------------------------------------------------------------------
    def build_index(
        self,
        directory: str | os.PathLike,
        config: IndexConfig | None = None,
        *,
        indices: Sequence[int] | None = None,
        overwrite: bool = False,
        load: bool = True,
    ) -> TrainingIndex | None:
        """Build (or resume) the persistent index of the training set in `directory`
        (`fastinf.index.build_index`) and, unless `load=False`, load it for `score`."""
        curvature = self._require_curvature()
        self.index = None  # an index of this folder in memory would be stale
        build_index(self.source, curvature, directory, config, indices=indices, overwrite=overwrite)
        return self.load_index(directory, verify=False) if load else None

    def load_index(
        self, directory: str | os.PathLike, *, verify: bool = True, sharded: bool = False
    ) -> TrainingIndex:
        """Load an index built for this model, data, curvature and ScoreConfig; `score`
        then searches it instead of streaming the training set (`unload_index` undoes).
        `verify`: check every file's checksum; `sharded`: under torch.distributed, hold
        only this rank's shards (`fastinf.index.TrainingIndex.load`)."""
        # `load` checks the index's model, data, curvature, draws and damping against these.
        index = TrainingIndex.load(
            directory, self.source, self._require_curvature(), verify=verify, sharded=sharded
        )
        self.index = index
        return index

    def unload_index(self) -> None:
        self.index = None

    # -- queries ---------------------------------------------------------------------------
    def query_gradients(self, queries: Tensor, cond=None) -> LayerGrads:
        """∇m(θ, x_q) of the configured measurement over K_q draws, per tracked layer.

        Args:
            queries: [Q, C, H, W] (or one [C, H, W]) generated samples in the model's range.
            cond: class labels [Q] (or one int) for a class-conditional model.
        """
        return self.source.query_gradients(queries, cond)

    def query_ids(self, queries: Tensor, cond=None) -> Tensor:
        """The content ids [Q] that seed each query's draws (independent of batching)."""
        return self.source.query_block(queries, cond).ids

    def query_meta(self) -> dict:
        """What a query cache prepared by this engine depends on."""
        return self._preparer().meta()

    def prepare_queries(self, queries: Tensor, cond=None) -> QueryCache:
        """Query gradients, preconditioned by (G + λI)⁻¹ once and cached for scoring."""
        return self._preparer().prepare(queries, cond)

    def precondition_queries(self, grads: LayerGrads, query_ids: Tensor) -> QueryCache:
        """Cache (G + λI)⁻¹ ∇m for query gradients from `query_gradients` (ids: their
        `query_ids`), e.g. to precondition one set of gradients at several dampings."""
        return self._preparer().precondition(grads, query_ids)

    def _preparer(self) -> QueryPreparer:
        return QueryPreparer(self.source, self._require_curvature())

    # -- scoring ---------------------------------------------------------------------------
    @property
    def scorer(self) -> Scorer:
        """What `score` asks: the index scorer while an index is loaded, else the exact one."""
        exact = self._exact()
        return exact if self.index is None else IndexScorer(self.index, exact)

    def _exact(self) -> ExactScorer:
        preparer = None if self.curvature is None else self._preparer()
        return ExactScorer(self.source, preparer)

    def score(
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

        Train gradients (K = config.train_draws draws each) are streamed in blocks of
        `config.block_size` examples; memory is O(block), not O(N). τ > 0: proponent.
        Returns top-k proponents and opponents per query, and the full [Q, N] score matrix
        (columns in the order of `indices`, default dataset order) if `return_scores`.

        With an index loaded (`load_index`) and no `indices`, the index is searched instead
        (scores ≈ τ; `return_scores` gives the index scores in index row order);
        `exact_rerank=C` re-scores the uncertain among every query's top-C candidates
        exactly, `rerank_sigmas` sets how sure the rest must be (`IndexScorer.topk`).
        """
        # Chosen examples are scored exactly, whatever index is loaded.
        scorer = self._exact() if indices is not None else self.scorer
        return scorer.topk(
            queries,
            k,
            cond=cond,
            indices=indices,
            return_scores=return_scores,
            exact_rerank=exact_rerank,
            rerank_sigmas=rerank_sigmas,
        )

    def score_matrices(
        self,
        caches: list[QueryCache],
        *,
        indices: Sequence[int] | None = None,
        draw_offset: int = 0,
        num_draws: int | None = None,
    ) -> list[Tensor]:
        """Full score matrices [Q_i, N] of several query caches in one pass over the data
        (`ExactScorer.score_matrices`: caches of other curvatures or dampings welcome)."""
        return self._exact().score_matrices(
            caches, indices=indices, draw_offset=draw_offset, num_draws=num_draws
        )

    def with_config(self, curvature: Curvature | None = None, **changes) -> InfluenceEngine:
        """A view of this engine (same model and data) with `ScoreConfig` fields changed
        and, if given, another fitted curvature (which unloads the index in the view); the
        original engine is left as it was."""
        view = copy.copy(self)
        view.config = dataclasses.replace(self.config, **changes)
        if curvature is not None:
            view.curvature, view.index = curvature, None
        return view

    # -- training examples -----------------------------------------------------------------
    def train_gradients(self, indices: Sequence[int]) -> LayerGrads:
        """∇ℓ(θ, x_n) for the given training examples (K draws each), materialised."""
        return self.source.train_gradients(indices)

    def self_influence(self, indices: Sequence[int] | None = None) -> Tensor:
        """τ(n, n) = ∇ℓ_nᵀ (G + λI)⁻¹ ∇ℓ_n for each training example, [N] float64."""
        curvature = require_eigenbasis(self._require_curvature(), "self-influence")
        config = self.config
        order = list(range(len(self.train_set))) if indices is None else list(indices)
        values = []
        for start in range(0, len(order), config.block_size):
            grads = self.train_gradients(order[start : start + config.block_size])
            total = 0.0
            for name, (weight, bias) in curvature.rotate(grads).items():
                inv_w, inv_b = curvature.inverse_damped(name, config.damping, config.damping_mode)
                total = total + (weight.square() * inv_w).flatten(1).sum(1)
                if bias is not None:
                    total = total + (bias.square() * inv_b).sum(1)
            values.append(total.cpu())
        return torch.cat(values)


_DEFAULT_ENGINE: InfluenceEngine | None = None
_DEFAULT_LOCK = threading.Lock()


def default_engine(cache_dir: str | os.PathLike | None = None) -> InfluenceEngine:
    """The embedded default: the shipped digits DDPM, its training set and EK-FAC.

    The curvature is fitted on first use and cached in `cache_dir` (default
    $FASTINF_CACHE or ./.fastinf_cache), then loaded on later calls.
    """
    global _DEFAULT_ENGINE
    with _DEFAULT_LOCK:  # threads asking at once share one fit
        if _DEFAULT_ENGINE is None:
            _DEFAULT_ENGINE = _load_default(cache_dir)
    return _DEFAULT_ENGINE


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir or os.environ.get("FASTINF_CACHE", ".fastinf_cache"))


def default_index(
    engine: InfluenceEngine | None = None, cache_dir: str | os.PathLike | None = None
) -> TrainingIndex:
    """Load the index of the embedded default into `engine` (default: `default_engine()`),
    building it on first use (about 1.5 min on a 2-core CPU) in `cache_dir`/index_digits.

    The folder is fastinf's cache: an index there built for other settings, or damaged,
    is rebuilt (`build_index(overwrite=True)` removes only the index's own files).
    """
    engine = engine or default_engine(cache_dir)
    directory = _cache_dir(cache_dir) / "index_digits"
    try:
        return engine.build_index(directory)  # a finished index is only checked and loaded
    except (ArtifactCorruptError, ArtifactMismatchError):
        return engine.build_index(directory, overwrite=True)


def _load_default(cache_dir: str | os.PathLike | None) -> InfluenceEngine:
    from .data import load_digits_dataset
    from .models import default_schedule, load_digits_model

    engine = InfluenceEngine(load_digits_model(), default_schedule(), load_digits_dataset())
    directory = _cache_dir(cache_dir) / "digits"
    try:
        engine.load_curvature(directory)
    except (FileNotFoundError, ArtifactCorruptError, ArtifactMismatchError):
        # The cache is fastinf's own: missing, damaged or from another version, refit it.
        engine.fit()
        engine.save_curvature(directory)
    return engine


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
