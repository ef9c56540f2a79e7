"""The seams of the pipeline: curvature strategies behind one registry, query caches that
refuse to be mixed, passes that always restore the model's mode, atomic writes, ranks."""

from __future__ import annotations

import pytest
import torch

import fastinf.curvature
from fastinf.artifacts import ArtifactMismatchError, atomic_write, atomic_write_text
from fastinf.cli import build_parser
from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.curvature import STRATEGIES, CurvatureError, EigenbasisCurvature, require_eigenbasis
from fastinf.diffusion import NoiseSchedule
from fastinf.distributed import merge_topk, owned
from fastinf.engine import InfluenceEngine
from fastinf.evaluation import measure_queries
from fastinf.models import DIGITS_WEIGHTS_PATH, load_sidecar
from fastinf.queries import QueryCache
from fastinf.sampling import sample_ddpm
from fastinf.train import evaluate_loss

from tiny import TinyConvEps, random_dataset, undocumented

CONFIG = ScoreConfig(train_draws=2, query_draws=2, damping=1e-2)


@pytest.fixture
def engine():
    torch.manual_seed(0)
    return InfluenceEngine(
        TinyConvEps().double(),
        NoiseSchedule.linear(50),
        random_dataset(6, (2, 5, 5)),
        config=CONFIG,
    )


@pytest.fixture
def queries():
    return torch.rand(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_curvature_api_is_pinned_and_documented():
    assert sorted(fastinf.curvature.__all__) == [
        "Curvature",
        "CurvatureError",
        "EigenbasisCurvature",
        "LayerCurvature",
        "STRATEGIES",
        "SketchedCurvature",
        "Strategy",
        "as_kfac",
        "fit_curvature",
        "load_curvature",
        "require_eigenbasis",
    ]
    assert undocumented(fastinf.curvature) == []


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_fits_saves_and_loads_through_the_registry(
    engine, queries, strategy, tmp_path
):
    fitted = engine.fit(
        CurvatureConfig(strategy, factor_draws=1, eigval_draws=1, projection_dim=24)
    )
    assert fitted.config.strategy == strategy
    before = engine.score(queries, k=2, return_scores=True).scores
    engine.save_curvature(tmp_path)
    loaded = engine.load_curvature(tmp_path)
    assert type(loaded) is type(fitted) and loaded.config == fitted.config
    after = engine.score(queries, k=2, return_scores=True).scores
    torch.testing.assert_close(after, before, rtol=1e-12, atol=0)
    # The types say what a strategy can do: only a Kronecker eigenbasis has `rotate`.
    has_eigenbasis = isinstance(loaded, EigenbasisCurvature)
    assert has_eigenbasis == hasattr(loaded, "rotate") == (strategy != "trak")
    if has_eigenbasis:
        assert require_eigenbasis(loaded, "test") is loaded
    else:
        with pytest.raises(CurvatureError, match=f"{strategy!r}.*'ekfac'"):
            require_eigenbasis(loaded, "test")


def test_concat_refuses_caches_prepared_differently(engine, queries):
    engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
    first = engine.prepare_queries(queries[:2])
    second = engine.prepare_queries(queries[2:])
    joined = QueryCache.concat([first, second])
    assert joined.num_queries == 3 and joined.meta == first.meta
    stiff = engine.with_config(damping=1.0).prepare_queries(queries[2:])
    with pytest.raises(ArtifactMismatchError, match=r"caches 0 and 1.*score_config"):
        QueryCache.concat([first, stiff])
    # Side by side they are welcome: one pass, each matrix its own.
    loose, firm = engine.score_matrices([first, stiff])
    torch.testing.assert_close(loose, engine.score(first, return_scores=True).scores)
    view = engine.with_config(damping=1.0)
    torch.testing.assert_close(firm, view.score(stiff, return_scores=True).scores)


class _Exploding(TinyConvEps):
    """Fails in the middle of a pass, after the model was switched to eval mode."""

    def forward(self, x_t, timesteps, cond=None):
        assert not self.training
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "step", ["fit", "score", "evaluate_loss", "measure_queries", "sample_ddpm"]
)
def test_every_pass_restores_the_training_mode_even_when_it_fails(step, queries):
    model = _Exploding().double().train()
    data = random_dataset(4, (2, 5, 5))
    schedule = NoiseSchedule.linear(50)
    engine = InfluenceEngine(model, schedule, data, config=CONFIG)
    run = {
        "fit": lambda: engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1)),
        "score": lambda: engine.with_config(curvature=_identity(engine)).score(queries),
        "evaluate_loss": lambda: evaluate_loss(model, data, schedule, num_draws=2),
        "measure_queries": lambda: measure_queries(model, schedule, queries, num_draws=2),
        "sample_ddpm": lambda: sample_ddpm(model, schedule, 1, seed=0, sample_shape=(2, 5, 5)),
    }[step]
    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert model.training


def _identity(engine):
    return STRATEGIES["identity"].fit(engine.source, CurvatureConfig("identity"), None)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out" / "result.json"
    atomic_write_text(path, "old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_cli_train_defaults_to_the_shipped_weights_steps():
    args = build_parser().parse_args(["train", "--out", "x"])
    assert args.steps == load_sidecar(DIGITS_WEIGHTS_PATH)["training"]["steps"]


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_ranks_share_the_work_exactly_once(world):
    items = list(range(10))
    shares = [owned(items, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_merge_topk_alone_orders_by_score_then_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]], dtype=torch.float64)
    indices = torch.tensor([[4, 9, 2, -1]])
    top, which = merge_topk(scores, indices, 3)
    assert which.tolist() == [[2, 9, 4]] and top.tolist() == [[3.0, 3.0, 1.0]]


def test_the_engine_records_how_its_training_set_was_fingerprinted():
    model, schedule, data = (
        TinyConvEps().double(),
        NoiseSchedule.linear(50),
        random_dataset(6, (2, 5, 5)),
    )
    full = InfluenceEngine(model, schedule, data).provenance["dataset"]
    sample = InfluenceEngine(model, schedule, data, verify="sample").provenance["dataset"]
    assert full.startswith("full:") and sample.startswith("sample:")
