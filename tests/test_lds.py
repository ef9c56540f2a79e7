"""The LDS benchmark directory: end to end on a tiny digits run, caching and resuming."""

import dataclasses
import json

import pytest
import torch

from fastinf.config import CurvatureConfig
from fastinf.index import IndexConfig
from fastinf.lds import LDSConfig, LDSRun, Method
from fastinf.retrain import RetrainRecipe

TINY = LDSConfig(
    num_train=24,
    num_subsets=4,
    oracle_subsets=2,
    num_queries=2,
    sampling_steps=10,
    measurement_draws=8,
    recipe=RetrainRecipe(steps=2, batch_size=4, warmup=1),
    counterfactual_queries=1,
    counterfactual_percents=(10.0,),
)
METHODS = [
    Method("EK-FAC", CurvatureConfig(factor_draws=1, eigval_draws=1), train_draws=2, query_draws=2),
    Method(
        "K-FAC", CurvatureConfig(strategy="kfac", factor_draws=1, eigval_draws=1), train_draws=2
    ),
    Method("grad-dot", CurvatureConfig(strategy="identity"), train_draws=2, query_draws=2),
    Method(
        "D-TRAK",
        CurvatureConfig(
            strategy="trak", projection_dim=64, factor_draws=1, objective="square_norm"
        ),
        damping=0.1,
        damping_mode="relative",
        train_draws=2,
        measurement="square_norm",
        train_objective="square_norm",
    ),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lds")
    rows = LDSRun(directory, TINY, num_workers=2).evaluate(METHODS)
    return directory, rows


def test_rows_cover_every_method_and_the_oracle(run_dir):
    _, rows = run_dir
    assert [row["method"] for row in rows] == [m.name for m in METHODS] + ["oracle (seed to seed)"]
    for row in rows:
        assert -1.0 <= row["lds"] <= 1.0
        assert row["num_queries"] == TINY.num_queries
    assert rows[-1]["num_subsets"] == TINY.oracle_subsets


def test_rerun_trains_and_scores_nothing_and_gives_the_same_rows(run_dir, monkeypatch):
    directory, rows = run_dir
    run = LDSRun(directory, TINY, num_workers=1)
    assert run.retrain() == 0

    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached score was recomputed")

    monkeypatch.setattr("fastinf.engine.InfluenceEngine.score_matrices", refuse)
    assert run.evaluate(METHODS) == rows


def test_interrupted_model_is_retrained_alone_and_identically(run_dir):
    directory, _ = run_dir
    run = LDSRun(directory, TINY, num_workers=1)
    before, _ = run.measurements()
    sidecar = directory / "models" / "subset_002_seed0.json"
    sidecar.unlink()  # as if killed between writing the weights and the sidecar
    assert run.retrain() == 1
    after, _ = run.measurements()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)


def test_directory_grows_but_refuses_another_setup(run_dir):
    directory, _ = run_dir
    grown = LDSRun(directory, dataclasses.replace(TINY, num_subsets=5), num_workers=1)
    assert torch.equal(grown.masks[:4], LDSRun(directory, TINY).masks)
    other = dataclasses.replace(TINY, recipe=RetrainRecipe(steps=3, batch_size=4, warmup=1))
    with pytest.raises(ValueError, match="another config"):
        LDSRun(directory, other)
    setup = json.loads((directory / "setup.json").read_text())
    assert setup["num_subsets"] == TINY.num_subsets


def test_model_trained_with_another_recipe_is_an_error(run_dir):
    directory, _ = run_dir
    run = LDSRun(directory, TINY)
    run.store.recipe = RetrainRecipe(steps=9)
    with pytest.raises(ValueError, match="recipe, seed or subset changed"):
        run.retrain()


def test_counterfactual_rows(run_dir):
    directory, _ = run_dir
    rows = LDSRun(directory, TINY, num_workers=1).counterfactual(METHODS[0])
    assert len(rows) == 1
    row = rows[0]
    assert row["percent_removed"] == 10.0
    assert all(isinstance(row[k], float) for k in ("base", "delta_top", "delta_random"))
    assert (directory / "models" / "without_random_10pct.json").exists()


def test_index_scores_of_an_uncompressed_index_are_the_exact_scores(run_dir, monkeypatch):
    directory, _ = run_dir
    run = LDSRun(directory, TINY, num_workers=1)
    method = METHODS[0]
    exact = run.scores([method])[method.key()]
    config = IndexConfig(compression="exact", storage="fp32")
    through_index = run.index_scores(method, config)
    assert through_index.shape == exact.shape
    scale = float(exact.abs().max())
    torch.testing.assert_close(through_index, exact, rtol=0, atol=1e-5 * scale)
    sketched = run.index_scores(method, IndexConfig(dim=64, storage="fp32"))
    assert not torch.allclose(sketched, exact)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached index score matrix was rebuilt")

    monkeypatch.setattr("fastinf.engine.InfluenceEngine.build_index", refuse)
    assert torch.equal(run.index_scores(method, config), through_index)
