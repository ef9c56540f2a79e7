"""One engine shared by request threads: concurrent calls equal the same calls made one
after another, and bad input to the public API gets an error that names the fix."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastinf.config import CurvatureConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig
from fastinf.models import DiffusersEpsModel, eval_mode

from tiny import SMALL_SCORE, TinyConvEps, random_dataset, tiny_unet

THREADS = 4


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.manual_seed(0)
    engine = InfluenceEngine(
        TinyConvEps().double(),
        NoiseSchedule.linear(100, 1e-3, 0.2),
        random_dataset(10, (2, 5, 5), seed=1),
        config=SMALL_SCORE,
    )
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    queries = random_dataset(2 * THREADS, (2, 5, 5), seed=7).images
    index_dir = tmp_path_factory.mktemp("index")
    engine.build_index(index_dir, IndexConfig(compression="countsketch", dim=16), load=False)
    return engine, queries, index_dir


def _concurrently(calls):
    """Run every call at once from its own thread (released together by a barrier)."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _same(first, second):
    for name in ("proponents", "opponents"):
        a, b = getattr(first, name), getattr(second, name)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("with_index", [False, True])
def test_concurrent_scores_equal_sequential(fitted, with_index):
    engine, queries, index_dir = fitted
    if with_index:
        engine.load_index(index_dir)
    try:
        # Queries of 1 and 2 images, so threads run different batch shapes at once.
        batches = [queries[i : i + 1 + i % 2] for i in range(THREADS)] * 2
        sequential = [engine.score(batch, k=3) for batch in batches]
        concurrent = _concurrently([lambda b=batch: engine.score(b, k=3) for batch in batches])
    finally:
        engine.unload_index()
    for one, other in zip(sequential, concurrent, strict=True):
        _same(one, other)


def test_concurrent_gradients_and_self_influence_equal_sequential(fitted):
    engine, queries, _ = fitted
    calls = [
        lambda: engine.query_gradients(queries[:3]),
        lambda: engine.train_gradients([1, 4, 7]),
        lambda: engine.self_influence([0, 2, 9]),
        lambda: engine.query_gradients(queries[3:]),
    ]
    sequential = [call() for call in calls]
    concurrent = _concurrently(calls)

    def flat(value):
        if isinstance(value, torch.Tensor):
            return [value]
        return [t for w, b in value.values() for t in (w, b) if t is not None]

    for one, other in zip(sequential, concurrent, strict=True):
        for a, b in zip(flat(one), flat(other), strict=True):
            assert torch.equal(a, b)


def test_eval_mode_restores_training_only_when_the_last_thread_leaves():
    model = torch.nn.Linear(2, 2)
    model.train()
    inside, leave = threading.Barrier(2), threading.Event()
    seen = []

    def first():
        with eval_mode(model):
            inside.wait()
            leave.wait()

    thread = threading.Thread(target=first)
    thread.start()
    with eval_mode(model):
        inside.wait()
        leave.set()
        thread.join()  # the other thread has left; this one is still inside
        seen.append(model.training)
    assert seen == [False]
    assert model.training


# -- bad input to the public API ------------------------------------------------------------


def test_empty_query_batch_is_refused(fitted):
    engine, queries, _ = fitted
    with pytest.raises(ValueError, match=r"empty batch.*at least one image"):
        engine.score(queries[:0], k=2)


@pytest.mark.parametrize("k", [0, -1, 2.5, "3"])
def test_bad_k_is_refused(fitted, k):
    engine, queries, index_dir = fitted
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        engine.score(queries[:1], k=k)
    engine.load_index(index_dir)
    try:
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            engine.score(queries[:1], k=k)
    finally:
        engine.unload_index()


@pytest.mark.parametrize("indices", [[-1, 3], [0, 10], [1.5]])
def test_bad_indices_are_refused(fitted, indices):
    engine, queries, _ = fitted
    with pytest.raises(ValueError, match=r"indices .*training set of 10|must be integers"):
        engine.score(queries[:1], k=1, indices=indices)


def test_tensor_indices_are_accepted(fitted):
    engine, queries, _ = fitted
    result = engine.score(queries[:1], k=1, indices=torch.tensor([3, 5]))
    assert set(result.proponents.indices.flatten().tolist()) <= {3, 5}


def test_cond_for_an_unconditional_model_is_refused():
    model = DiffusersEpsModel(tiny_unet())
    data = random_dataset(4, (1, 4, 4), seed=1)
    engine = InfluenceEngine(model, NoiseSchedule.linear(100, 1e-3, 0.2), data, config=SMALL_SCORE)
    with pytest.raises(ValueError, match=r"model is unconditional.*drop cond"):
        engine.query_gradients(data.images[:1], cond=torch.tensor([3]))


def test_cond_outside_the_classes_is_refused():
    model = DiffusersEpsModel(tiny_unet(num_classes=3))
    data = random_dataset(4, (1, 4, 4), seed=1, labels=torch.tensor([0, 1, 2, 0]))
    engine = InfluenceEngine(model, NoiseSchedule.linear(100, 1e-3, 0.2), data, config=SMALL_SCORE)
    with pytest.raises(ValueError, match=r"outside the model's classes 0\.\.2"):
        engine.query_gradients(data.images[:2], cond=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="2 labels for 1 queries"):
        engine.query_gradients(data.images[:1], cond=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer class labels"):
        engine.query_gradients(data.images[:1], cond=torch.tensor([1.0]))
    grads = engine.query_gradients(data.images[:2], cond=2)  # one label for all
    assert next(iter(grads.values()))[0].shape[0] == 2


@pytest.mark.parametrize("damping", [float("inf"), float("nan"), -1.0])
def test_bad_damping_is_refused(fitted, damping):
    engine = fitted[0]
    with pytest.raises(ValueError, match=r"damping.*finite and >= 0"):
        engine.with_config(damping=damping)


def test_unscaled_pixels_warn(fitted):
    engine, queries, _ = fitted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.query_gradients((queries[:1] + 1) * 127.5)
    assert any("unscaled pixels" in str(w.message) for w in caught)
