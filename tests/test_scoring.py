"""Scores: invariances (batch, block, query chunking, repeats), seeds, top-k, self-influence."""

import dataclasses

import pytest
import torch

from fastinf.config import CurvatureConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine

from tiny import SMALL_SCORE, TinyConvEps, random_dataset

BASE = dataclasses.replace(SMALL_SCORE, query_batch_size=8)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = TinyConvEps().double()
    data = random_dataset(9, (2, 5, 5), seed=1)
    engine = InfluenceEngine(model, NoiseSchedule.linear(100, 1e-3, 0.2), data, config=BASE)
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    queries = random_dataset(5, (2, 5, 5), seed=7).images
    return engine, queries


def scores_with(engine, queries, **changes):
    engine.config = dataclasses.replace(BASE, **changes)
    try:
        return engine.score(queries, k=3, return_scores=True)
    finally:
        engine.config = BASE


def test_scores_match_dense_per_example_contraction(fitted):
    engine, queries = fitted
    result = scores_with(engine, queries)
    grads = engine.query_gradients(queries)
    pre = engine.curvature.precondition(grads, BASE.damping, BASE.damping_mode)
    train = engine.train_gradients(list(range(len(engine.train_set))))
    expected = sum(
        pre[name][0].flatten(1) @ train[name][0].flatten(1).T
        + (0 if pre[name][1] is None else pre[name][1] @ train[name][1].T)
        for name in pre
    )
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "changes",
    [
        dict(block_size=1),
        dict(block_size=9),
        dict(batch_size=1),
        dict(batch_size=5),
        dict(query_batch_size=1),
        dict(query_batch_size=2),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_scores_invariant_to_batching(fitted, changes):
    engine, queries = fitted
    reference = scores_with(engine, queries)
    changed = scores_with(engine, queries, **changes)
    torch.testing.assert_close(changed.scores, reference.scores, rtol=1e-10, atol=1e-12)
    assert torch.equal(changed.proponents.indices, reference.proponents.indices)
    assert torch.equal(changed.opponents.indices, reference.opponents.indices)


def test_scores_reproducible_and_seed_dependent(fitted):
    engine, queries = fitted
    first, again = scores_with(engine, queries), scores_with(engine, queries)
    assert torch.equal(first.scores, again.scores)
    other = scores_with(engine, queries, seed=1)
    assert not torch.allclose(first.scores, other.scores, rtol=1e-3)


def test_query_order_and_chunking_do_not_change_a_querys_scores(fitted):
    engine, queries = fitted
    full = scores_with(engine, queries)
    reversed_rows = scores_with(engine, queries.flip(0))
    torch.testing.assert_close(reversed_rows.scores.flip(0), full.scores, rtol=1e-10, atol=1e-12)
    single = scores_with(engine, queries[2:3])
    torch.testing.assert_close(single.scores, full.scores[2:3], rtol=1e-10, atol=1e-12)


def test_topk_agrees_with_full_sort_and_sign_convention(fitted):
    engine, queries = fitted
    result = scores_with(engine, queries)
    order = torch.argsort(result.scores, dim=1, descending=True, stable=True)
    assert torch.equal(result.proponents.indices, order[:, :3])
    assert torch.equal(result.opponents.indices, order.flip(1)[:, :3])
    assert (
        result.proponents.scores >= result.opponents.scores.max(1, keepdim=True).values.min()
    ).all()
    subset = [8, 2, 5, 0]
    sub = engine.score(queries, k=2, indices=subset, return_scores=True)
    torch.testing.assert_close(sub.scores, result.scores[:, subset])
    assert set(sub.proponents.indices.flatten().tolist()) <= set(subset)


def test_self_influence_equals_preconditioned_inner_product(fitted):
    engine, _ = fitted
    values = engine.self_influence([3, 1])
    grads = engine.train_gradients([3, 1])
    pre = engine.curvature.precondition(grads, BASE.damping)
    expected = sum(
        (pre[n][0] * grads[n][0]).flatten(1).sum(1)
        + (0 if grads[n][1] is None else (pre[n][1] * grads[n][1]).sum(1))
        for n in grads
    )
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-12)
    assert (values > 0).all()
