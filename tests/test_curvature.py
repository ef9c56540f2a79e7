"""(E)K-FAC against dense float64 constructions, and exactness where K-FAC is exact."""

import math

import pytest
import torch
from torch.func import functional_call, jacrev

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.curvature import CurvatureError
from fastinf.diffusion import NoiseSchedule, Purpose, make_draws
from fastinf.engine import InfluenceEngine

from tiny import LinearEps, TinyConvEps, random_dataset


def dense_block(layer, strategy):
    """The weight block's dense matrix in row-major vec order: (o, i) → o·d_in + i."""
    if strategy == "kfac":
        return torch.kron(layer.grad_cov, layer.act_cov)
    basis = torch.kron(layer.eigvecs_grad, layer.eigvecs_act)
    return basis @ torch.diag(layer.eigvals_weight.flatten()) @ basis.T


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_precondition_equals_dense_inverse(conv_model, conv_data, schedule, strategy, approx):
    engine = InfluenceEngine(conv_model, schedule, conv_data)
    curvature = engine.fit(
        CurvatureConfig(strategy=strategy, kfac_approx=approx, factor_draws=2, eigval_draws=2)
    )
    damping = 1e-2
    generator = torch.Generator().manual_seed(3)
    grads = {
        name: (
            torch.randn(2, info.d_out, info.d_in, generator=generator, dtype=torch.float64),
            torch.randn(2, info.d_out, generator=generator, dtype=torch.float64)
            if info.has_bias
            else None,
        )
        for name, info in engine.layers.items()
    }
    result = curvature.precondition(grads, damping)
    for name, (weight, bias) in grads.items():
        layer = curvature.layers[name]
        dense = dense_block(layer, strategy)
        dense = dense + damping * torch.eye(dense.shape[0], dtype=torch.float64)
        expected = torch.linalg.solve(dense, weight.flatten(1).T).T.reshape(weight.shape)
        torch.testing.assert_close(result[name][0], expected, rtol=1e-7, atol=1e-9)
        if bias is not None:
            if strategy == "kfac":
                bias_dense = layer.grad_cov  # A = 1 for the bias block
            else:
                q = layer.eigvecs_grad
                bias_dense = q @ torch.diag(layer.eigvals_bias) @ q.T
            bias_dense = bias_dense + damping * torch.eye(bias_dense.shape[0], dtype=torch.float64)
            expected_bias = torch.linalg.solve(bias_dense, bias.T).T
            torch.testing.assert_close(result[name][1], expected_bias, rtol=1e-7, atol=1e-9)


def dense_influence(model, schedule, data, engine, queries, *, curvature_cfg, score_cfg):
    """τ = ∇mᵀ (G + λI)⁻¹ ∇ℓ with G built densely by torch.func on the same draws."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shape = model.sample_shape
    num_pixels = math.prod(shape)
    ids = torch.arange(len(data))
    draws = make_draws(
        ids,
        torch.arange(curvature_cfg.factor_draws),
        shape,
        num_timesteps=schedule.num_timesteps,
        purpose=Purpose.FIT_FACTORS,
        seed=curvature_cfg.seed,
        dtype=torch.float64,
    )
    x0 = data.images.repeat_interleave(curvature_cfg.factor_draws, 0)
    x_t = schedule.add_noise(x0, draws.noise.flatten(0, 1), draws.timesteps.flatten())
    t = draws.timesteps.flatten()

    def output(weight):
        return functional_call(model, {"linear.weight": weight}, (x_t, t)).flatten(1)

    jac = jacrev(output)(params["linear.weight"]).flatten(2)  # [N_d, P, n_params]
    ggn = torch.einsum("dpa,dpb->ab", jac, jac) * (2.0 / num_pixels) / jac.shape[0]
    ggn = ggn + score_cfg.damping * torch.eye(ggn.shape[0], dtype=torch.float64)

    def mean_loss(weight, images, example_ids, purpose, num_draws):
        d = make_draws(
            example_ids,
            torch.arange(num_draws),
            shape,
            num_timesteps=schedule.num_timesteps,
            purpose=purpose,
            seed=score_cfg.seed,
            dtype=torch.float64,
        )
        x = schedule.add_noise(
            images.repeat_interleave(num_draws, 0), d.noise.flatten(0, 1), d.timesteps.flatten()
        )
        pred = functional_call(model, {"linear.weight": weight}, (x, d.timesteps.flatten()))
        return (pred - d.noise.flatten(0, 1)).square().flatten(1).mean(1).mean()

    def grad_of(images, example_id, purpose, num_draws):
        w = params["linear.weight"].clone().requires_grad_(True)
        loss = mean_loss(w, images.unsqueeze(0), torch.tensor([example_id]), purpose, num_draws)
        return torch.autograd.grad(loss, w)[0].flatten()

    query_ids = engine.query_ids(queries)
    query_grads = torch.stack(
        [
            grad_of(q, int(i), Purpose.QUERY_GRADIENT, score_cfg.query_draws)
            for q, i in zip(queries, query_ids, strict=True)
        ]
    )
    train_grads = torch.stack(
        [
            grad_of(data.images[n], n, Purpose.TRAIN_GRADIENT, score_cfg.train_draws)
            for n in range(len(data))
        ]
    )
    return query_grads @ torch.linalg.solve(ggn, train_grads.T)


@pytest.mark.parametrize(
    ("strategy", "noiseless"),
    [("kfac", False), ("ekfac", True)],
    ids=["kfac-any-schedule", "ekfac-inputs-independent-of-noise"],
)
def test_one_linear_layer_influence_equals_exact_damped_ggn(strategy, noiseless):
    """K-FAC is exact for one linear layer with one position under exact GGN^model; EK-FAC too
    when its eigenvalue pass sees the same layer inputs (ᾱ_t = 1: x_t = x_0)."""
    torch.manual_seed(0)
    model = LinearEps((1, 2, 2)).double()
    schedule = NoiseSchedule(torch.ones(50)) if noiseless else NoiseSchedule.linear(50, 1e-3, 0.3)
    data = random_dataset(7, (1, 2, 2), seed=4)
    queries = random_dataset(3, (1, 2, 2), seed=5).images
    curvature_cfg = CurvatureConfig(strategy=strategy, mc="exact", factor_draws=3, eigval_draws=2)
    score_cfg = ScoreConfig(train_draws=4, query_draws=5, damping=1e-3, damping_mode="absolute")
    engine = InfluenceEngine(model, schedule, data, config=score_cfg)
    engine.fit(curvature_cfg)
    result = engine.score(queries, k=3, return_scores=True)
    expected = dense_influence(
        model, schedule, data, engine, queries, curvature_cfg=curvature_cfg, score_cfg=score_cfg
    )
    torch.testing.assert_close(result.scores, expected, rtol=1e-8, atol=1e-10)


def test_exact_mode_grad_cov_is_scaled_identity_for_a_linear_layer():
    model = LinearEps((1, 2, 3)).double()
    data = random_dataset(5, (1, 2, 3), seed=2)
    engine = InfluenceEngine(model, NoiseSchedule.linear(20), data)
    curvature = engine.fit(CurvatureConfig(strategy="kfac", mc="exact", factor_draws=2))
    torch.testing.assert_close(
        curvature.layers["linear"].grad_cov, torch.eye(6, dtype=torch.float64) * 2 / 6
    )


def test_mc_fisher_grad_cov_is_unbiased_for_a_linear_layer():
    model = LinearEps((1, 2, 2)).double()
    data = random_dataset(50, (1, 2, 2), seed=2)
    engine = InfluenceEngine(model, NoiseSchedule.linear(20), data)
    curvature = engine.fit(CurvatureConfig(strategy="kfac", mc="sample", factor_draws=40))
    # 2000 draws of √(2/P)η ηᵀ√(2/P): each entry has standard error ≈ 0.5·√(2/2000) ≈ 0.016.
    torch.testing.assert_close(
        curvature.layers["linear"].grad_cov,
        torch.eye(4, dtype=torch.float64) * 0.5,
        atol=0.06,
        rtol=0,
    )


def test_nan_covariance_names_the_layer(conv_data, schedule):
    model = TinyConvEps().double()
    with torch.no_grad():
        model.shared.weight[0, 0, 0, 0] = float("nan")
    engine = InfluenceEngine(model, schedule, conv_data)
    with pytest.raises(CurvatureError, match=r"layer '.*'.*NaN/Inf.*diverged model weights"):
        engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))


def test_relative_damping_scales_with_mean_eigenvalue(conv_model, conv_data, schedule):
    engine = InfluenceEngine(conv_model, schedule, conv_data)
    curvature = engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
    layer = curvature.layers["conv_out"]
    mean = torch.cat([layer.eigvals_weight.flatten(), layer.eigvals_bias]).mean()
    assert curvature.damping_value("conv_out", 0.1, "relative") == pytest.approx(0.1 * float(mean))
    inv_w, _ = curvature.inverse_damped("conv_out", 0.1, "relative")
    torch.testing.assert_close(inv_w, 1 / (layer.eigvals_weight + 0.1 * mean))


def test_ekfac_eigenvalues_sum_to_trace_of_the_per_draw_ggn(conv_model, conv_data, schedule):
    """Σ Λ = mean_d ‖G_d‖² (the basis is orthonormal), a check independent of the basis."""
    engine = InfluenceEngine(conv_model, schedule, conv_data)
    curvature = engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1, batch_size=1))
    recorder = {}

    def consumer(name, call):
        act, grad = call.rows()
        recorder[name] = torch.einsum("nro,nri->noi", grad, act).square().sum((1, 2)).mean()

    from fastinf.gradients import DrawSpec, backprop_curvature_seed, example_blocks
    from fastinf.layers import capture_layers

    traces = {name: 0.0 for name in engine.layers}
    with capture_layers(engine.layers, consumer) as capture:
        for block in example_blocks(conv_data, 1):
            backprop_curvature_seed(
                capture,
                conv_model,
                schedule,
                block,
                DrawSpec(Purpose.FIT_EIGVALS, 1),
                ggn="model",
                mc="sample",
            )
            for name in traces:
                traces[name] += float(recorder[name]) / len(conv_data)
    for name, layer in curvature.layers.items():
        assert float(layer.eigvals_weight.sum()) == pytest.approx(traces[name], rel=1e-9)


def test_ggn_loss_is_the_empirical_fisher_of_per_draw_losses():
    torch.manual_seed(3)
    model = LinearEps((1, 2, 2)).double()
    schedule = NoiseSchedule.linear(30, 1e-3, 0.3)
    data = random_dataset(6, (1, 2, 2), seed=8)
    engine = InfluenceEngine(model, schedule, data)
    curvature = engine.fit(CurvatureConfig(strategy="kfac", ggn="loss", factor_draws=3))
    draws = make_draws(
        torch.arange(6),
        torch.arange(3),
        (1, 2, 2),
        num_timesteps=30,
        purpose=Purpose.FIT_FACTORS,
        dtype=torch.float64,
    )
    x_t = schedule.add_noise(
        data.images.repeat_interleave(3, 0), draws.noise.flatten(0, 1), draws.timesteps.flatten()
    )
    with torch.no_grad():
        residual = draws.noise.flatten(0, 1).flatten(1) - model.linear(x_t.flatten(1))
    loss_grads = -(2.0 / 4) * residual  # ∂ mean_pixels (ε − ε̂)² / ∂ε̂ per draw
    torch.testing.assert_close(curvature.layers["linear"].grad_cov, loss_grads.T @ loss_grads / 18)
    torch.testing.assert_close(
        curvature.layers["linear"].act_cov, x_t.flatten(1).T @ x_t.flatten(1) / 18
    )
