"""Baselines as curvature settings: gradient dot product, TRAK / D-TRAK, K-FAC from EK-FAC.

Each is checked against a dense float64 reference built from explicit per-example
gradients, so the shared scoring path is exercised exactly as for EK-FAC.
"""

import pytest
import torch

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.curvature import CurvatureError, as_kfac
from fastinf.diffusion import NoiseSchedule, Purpose, resolve_measurement
from fastinf.engine import InfluenceEngine
from fastinf.gradients import DrawSpec, ExampleBlock

from tiny import TinyConvEps, random_dataset

NUM_TRAIN = 7


@pytest.fixture
def engine():
    torch.manual_seed(0)
    return InfluenceEngine(
        TinyConvEps(channels=2).double(),
        NoiseSchedule.linear(50),
        random_dataset(NUM_TRAIN, (2, 5, 5)),
        config=ScoreConfig(train_draws=3, query_draws=2, damping=0.1, damping_mode="absolute"),
    )


@pytest.fixture
def queries():
    generator = torch.Generator().manual_seed(3)
    return torch.rand(2, 2, 5, 5, dtype=torch.float64, generator=generator)


def _flat(grads) -> torch.Tensor:
    """Per-example gradients [n, parameters]: each layer's weight, then its bias."""
    parts = []
    for weight, bias in grads.values():
        parts.append(weight.flatten(1))
        if bias is not None:
            parts.append(bias)
    return torch.cat(parts, dim=1)


def test_identity_strategy_is_the_gradient_dot_product(engine, queries):
    engine.fit(CurvatureConfig(strategy="identity"))
    scores = engine.score(queries, k=3, return_scores=True).scores
    train = _flat(engine.train_gradients(list(range(NUM_TRAIN))))
    query = _flat(engine.query_gradients(queries))
    torch.testing.assert_close(scores, query @ train.T / (1 + 0.1), rtol=1e-9, atol=1e-12)


def _dense_sketch(curvature, grads) -> torch.Tensor:
    """φ = P g with P_layer = S_out ⊗ S_in applied to the row-major [G | b]."""
    parts = []
    for name, (weight, bias) in grads.items():
        sketch_out, sketch_in = curvature.sketches[name]
        augmented = weight if bias is None else torch.cat([weight, bias.unsqueeze(2)], dim=2)
        parts.append(augmented.flatten(1) @ torch.kron(sketch_out, sketch_in).T)
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("objective", ["loss", "square_norm"])
def test_trak_matches_dense_projected_fisher(engine, queries, objective):
    config = CurvatureConfig(
        strategy="trak", projection_dim=40, factor_draws=2, objective=objective
    )
    curvature = engine.fit(config)
    assert 30 <= curvature.dim <= 40
    # Per-example gradients with the fit's draws and objective, projected densely.
    images = torch.stack([engine.train_set[i][0] for i in range(NUM_TRAIN)])
    block = ExampleBlock(torch.arange(NUM_TRAIN), images, None)
    fit_spec = DrawSpec(Purpose.FIT_FACTORS, 2, 0)
    features = _dense_sketch(
        curvature, engine.source.gradients(block, resolve_measurement(objective), fit_spec)
    )
    fisher = features.T @ features / NUM_TRAIN
    damped = fisher + 0.1 * torch.eye(curvature.dim, dtype=torch.float64)
    trak = engine.with_config(train_objective=objective)
    query = _dense_sketch(curvature, trak.query_gradients(queries))
    train = _dense_sketch(curvature, trak.train_gradients(list(range(NUM_TRAIN))))
    expected = query @ torch.linalg.solve(damped, train.T)
    scores = trak.score(queries, k=3, return_scores=True).scores
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)


def test_trak_roundtrip_and_no_eigenbasis_error(engine, queries, tmp_path):
    engine.fit(CurvatureConfig(strategy="trak", projection_dim=30, factor_draws=1))
    before = engine.score(queries, k=2, return_scores=True).scores
    engine.save_curvature(tmp_path)
    engine.load_curvature(tmp_path)
    after = engine.score(queries, k=2, return_scores=True).scores
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-15)
    with pytest.raises(CurvatureError, match="eigenbasis"):
        engine.self_influence([0])


def test_kfac_from_an_ekfac_fit_equals_a_kfac_fit(engine, queries):
    config = CurvatureConfig(factor_draws=1, eigval_draws=1)
    derived = as_kfac(engine.fit(config))
    fitted = engine.fit(CurvatureConfig(strategy="kfac", factor_draws=1, eigval_draws=1))
    assert derived.config == fitted.config
    for name, layer in fitted.layers.items():
        torch.testing.assert_close(derived.layers[name].eigvals_weight, layer.eigvals_weight)
    grads = engine.query_gradients(queries)
    derived_pre, fitted_pre = derived.precondition(grads, 0.1), fitted.precondition(grads, 0.1)
    for name, (weight, bias) in fitted_pre.items():
        torch.testing.assert_close(derived_pre[name][0], weight)
        if bias is not None:
            torch.testing.assert_close(derived_pre[name][1], bias)
