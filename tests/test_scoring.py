"""Scores: a float64 dense oracle, invariances (batch, block, query chunking, repeats),
seeds, top-k, self-influence."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fastinf.config import CurvatureConfig
from fastinf.diffusion import NoiseSchedule, Purpose, make_draws
from fastinf.engine import InfluenceEngine

from tiny import SMALL_SCORE, TinyConvEps, random_dataset

BASE = dataclasses.replace(SMALL_SCORE, query_batch_size=8)
SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)
STRATEGIES = {
    "ekfac": CurvatureConfig(factor_draws=2, eigval_draws=2),
    "kfac": CurvatureConfig(strategy="kfac", factor_draws=2, eigval_draws=2),
    "identity": CurvatureConfig(strategy="identity"),
}


def tiny_setup():
    torch.manual_seed(0)
    model = TinyConvEps().double()
    data = random_dataset(9, (2, 5, 5), seed=1)
    queries = random_dataset(5, (2, 5, 5), seed=7).images
    return model, data, queries


@pytest.fixture(scope="module")
def fitted():
    model, data, queries = tiny_setup()
    engine = InfluenceEngine(model, SCHEDULE, data, config=BASE)
    engine.fit(STRATEGIES["ekfac"])
    return engine, queries


def scores_with(engine, queries, **changes):
    engine.config = dataclasses.replace(BASE, **changes)
    try:
        return engine.score(queries, k=3, return_scores=True)
    finally:
        engine.config = BASE


# -- the dense float64 oracle ----------------------------------------------------------------
def tracked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d (DESIGN §1: normalisation layers carry no gradient)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


def dense_gradients(model, images, ids, purpose, num_draws):
    """[B, P] float64: ∇ of the mean over `num_draws` draws of the per-pixel-mean squared
    error, one plain autograd call per (example, draw), flattened layer by layer (weight
    as [d_out, d_in], then bias). The draws are those the engine seeds for `ids`."""
    params = [
        p
        for module in tracked_modules(model).values()
        for p in (module.weight, module.bias)
        if p is not None
    ]
    rows = []
    for image, example_id in zip(images, ids.tolist(), strict=True):
        draws = make_draws(
            torch.tensor([example_id]),
            torch.arange(num_draws),
            tuple(image.shape),
            num_timesteps=SCHEDULE.num_timesteps,
            purpose=purpose,
            seed=BASE.seed,
            dtype=torch.float64,
        )
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for draw in range(num_draws):
            noise = draws.noise[0, draw : draw + 1]
            timestep = draws.timesteps[0, draw : draw + 1]
            x_t = SCHEDULE.add_noise(image.unsqueeze(0), noise, timestep)
            loss = (model(x_t, timestep) - noise).square().mean()
            total += torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        rows.append(total / num_draws)
    return torch.stack(rows)


def to_layer_grads(vectors, modules):
    """Split [n, P] dense vectors into the engine's name → (weight [n, d_out, d_in],
    bias [n, d_out] or None) layout, in the order `dense_gradients` flattens."""
    grads, start = {}, 0
    for name, module in modules.items():
        d_out, size = module.weight.shape[0], module.weight.numel()
        weight = vectors[:, start : start + size].reshape(-1, d_out, size // d_out)
        start += size
        bias = None
        if module.bias is not None:
            bias = vectors[:, start : start + d_out]
            start += d_out
        grads[name] = (weight, bias)
    assert start == vectors.shape[1]
    return grads


def dense_preconditioner(engine, modules, num_params):
    """[P, P] (G + λI)⁻¹ as a dense matrix: the engine's preconditioner applied to every
    unit vector e_i gives row i (the matrix is symmetric), in `dense_gradients`' order."""
    unit = torch.eye(num_params, dtype=torch.float64)
    pre = engine.curvature.precondition(
        to_layer_grads(unit, modules), BASE.damping, BASE.damping_mode
    )
    return torch.cat(
        [
            torch.cat([pre[n][0].flatten(1)] + ([] if pre[n][1] is None else [pre[n][1]]), 1)
            for n in modules
        ],
        dim=1,
    )


@pytest.fixture(scope="module", params=list(STRATEGIES))
def oracle(request):
    """(engine fitted with one strategy, its scores, the oracle's τ [Q, N] and self-influence
    [N]), the oracle's gradients taken on a float64 copy of the model the engine never sees."""
    model, data, queries = tiny_setup()
    reference = copy.deepcopy(model).eval()
    engine = InfluenceEngine(model, SCHEDULE, data, config=BASE)
    engine.fit(STRATEGIES[request.param])
    result = engine.score(queries, k=3, return_scores=True)
    modules = tracked_modules(reference)
    train = dense_gradients(
        reference,
        data.images,
        torch.arange(len(data)),
        Purpose.TRAIN_GRADIENT,
        BASE.train_draws,
    )
    query = dense_gradients(
        reference, queries, result.query_ids, Purpose.QUERY_GRADIENT, BASE.query_draws
    )
    if request.param == "identity":
        # G = I: the preconditioner is known in closed form, no engine code involved.
        inverse = torch.eye(train.shape[1], dtype=torch.float64) / (1.0 + BASE.damping)
    else:
        inverse = dense_preconditioner(engine, modules, train.shape[1])
        # (G + λI)⁻¹ of a PSD G is symmetric, positive definite and block diagonal by layer.
        torch.testing.assert_close(inverse, inverse.T, rtol=1e-10, atol=1e-10)
        assert torch.linalg.eigvalsh(inverse).min() > 0
        sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in modules.values()]
        blocks = torch.block_diag(*(torch.ones(s, s) for s in sizes)).bool()
        assert not inverse[~blocks].any()
    return engine, result, query @ inverse @ train.T, ((train @ inverse) * train).sum(1)


def test_scores_match_a_dense_float64_oracle(oracle):
    _, result, expected, _ = oracle
    assert result.scores.dtype == torch.float64
    scale = float(expected.abs().max())
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-11 * scale)


def test_self_influence_matches_the_dense_oracle(oracle):
    engine, _, _, expected = oracle
    values = engine.self_influence()
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-11 * float(expected.max()))
    assert (values > 0).all()


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
