"""LDS protocol on cases with known answers, and the shared-draw query measurements."""

import pytest
import torch
from scipy.stats import spearmanr

from fastinf.diffusion import NoiseSchedule, Purpose, make_draws
from fastinf.evaluation import (
    lds,
    measure_queries,
    oracle_lds,
    spearman,
    subset_masks,
    subset_predictions,
)

from tiny import LinearEps

NUM_TRAIN, NUM_SUBSETS, NUM_QUERIES = 40, 60, 8


@pytest.fixture
def additive_world():
    """Measurements that are exactly additive in the removed examples' effects β [Q, N]."""
    generator = torch.Generator().manual_seed(0)
    effects = torch.randn(NUM_QUERIES, NUM_TRAIN, generator=generator, dtype=torch.float64)
    masks = subset_masks(NUM_TRAIN, NUM_SUBSETS, 0.5, seed=3)
    base = torch.randn(NUM_QUERIES, generator=generator, dtype=torch.float64)
    measurements = base + (~masks).double() @ effects.T
    return effects, masks, measurements


def test_true_leave_out_effects_give_lds_one(additive_world):
    effects, masks, measurements = additive_world
    result = lds(effects, masks, measurements)
    torch.testing.assert_close(result.per_query, torch.ones(NUM_QUERIES, dtype=torch.float64))
    assert result.mean == pytest.approx(1.0)
    assert lds(-effects, masks, measurements).mean == pytest.approx(-1.0)


def test_noisy_and_random_scores(additive_world):
    effects, masks, measurements = additive_world
    generator = torch.Generator().manual_seed(1)
    noisy = effects + 0.3 * torch.randn(effects.shape, generator=generator, dtype=torch.float64)
    assert 0.8 < lds(noisy, masks, measurements).mean < 1.0
    random = torch.randn(effects.shape, generator=generator, dtype=torch.float64)
    result = lds(random, masks, measurements)
    assert abs(result.mean) < 4 * result.sem + 0.05
    # A constant shift of every score changes no ranking: every subset removes N/2.
    assert lds(effects + 5.0, masks, measurements).mean == pytest.approx(1.0)


def test_predictions_sum_scores_of_the_removed_examples():
    scores = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    masks = torch.tensor([[True, False, True, False], [False, True, True, False]])
    torch.testing.assert_close(
        subset_predictions(scores, masks), torch.tensor([[10.0], [9.0]], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="same training set"):
        subset_predictions(scores, masks[:, :3])
    with pytest.raises(ValueError, match="subsets, queries"):
        lds(scores, masks, torch.zeros(3, 1))


def test_spearman_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(2)
    first = torch.randint(0, 5, (30, 4), generator=generator).double()
    second = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    ours = spearman(first, second)
    for column in range(4):
        expected = spearmanr(first[:, column].numpy(), second[:, column].numpy()).statistic
        assert float(ours[column]) == pytest.approx(expected, abs=1e-12)


def test_oracle_of_identical_replicates_is_one(additive_world):
    _, _, measurements = additive_world
    assert oracle_lds(measurements, measurements).mean == pytest.approx(1.0)
    assert oracle_lds(measurements, -measurements).mean == pytest.approx(-1.0)


def test_subset_masks_keep_exactly_alpha_n_and_are_reproducible():
    masks = subset_masks(101, 20, 0.3, seed=5)
    assert masks.shape == (20, 101)
    assert (masks.sum(1) == 30).all()
    assert torch.equal(masks, subset_masks(101, 20, 0.3, seed=5))
    assert not torch.equal(masks, subset_masks(101, 20, 0.3, seed=6))
    assert len({tuple(row.tolist()) for row in masks}) == 20
    # More subsets extend, not reshuffle, the first ones (so a run directory can grow).
    assert torch.equal(subset_masks(101, 25, 0.3, seed=5)[:20], masks)
    for bad, message in [((10, 5, 1.0, 0), "fraction"), ((10, 1, 0.5, 0), "at least 2")]:
        with pytest.raises(ValueError, match=message):
            subset_masks(*bad)


def test_measure_queries_uses_shared_draws_and_is_batch_invariant():
    torch.manual_seed(0)
    model = LinearEps((1, 2, 2), bias=True).double()
    schedule = NoiseSchedule.linear(50)
    queries = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    values = measure_queries(model, schedule, queries, num_draws=16, seed=4, batch_size=1024)
    for batch_size in (1, 5, 16, 40):
        again = measure_queries(
            model, schedule, queries, num_draws=16, seed=4, batch_size=batch_size
        )
        torch.testing.assert_close(again, values, rtol=1e-12, atol=0)
    draws = make_draws(
        torch.arange(3),
        torch.arange(16),
        (1, 2, 2),
        num_timesteps=50,
        purpose=Purpose.EVALUATION,
        seed=4,
        dtype=torch.float64,
    )
    x0 = queries.repeat_interleave(16, dim=0)
    noise, timesteps = draws.noise.flatten(0, 1), draws.timesteps.flatten()
    eps_pred = model(schedule.add_noise(x0, noise, timesteps), timesteps)
    expected = (eps_pred - noise).square().mean((1, 2, 3)).reshape(3, 16).mean(1)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=0)
    assert not torch.equal(values, measure_queries(model, schedule, queries, num_draws=16, seed=5))
