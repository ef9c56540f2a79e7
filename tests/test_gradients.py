"""Per-example gradients built from captured rows against per-example autograd."""

import pytest
import torch

from fastinf.config import ScoreConfig
from fastinf.diffusion import NoiseSchedule, Purpose, make_draws
from fastinf.engine import InfluenceEngine
from fastinf.models import as_eps_model

from tiny import TinyConvEps, random_dataset, tiny_unet


def autograd_example_gradient(model, schedule, image, cond, example_id, num_draws, seed):
    """∇ of mean_k mean_pixels (ε − ε_θ(x_t, t))² for one example, by plain autograd."""
    draws = make_draws(
        torch.tensor([example_id]),
        torch.arange(num_draws),
        tuple(image.shape),
        num_timesteps=schedule.num_timesteps,
        purpose=Purpose.TRAIN_GRADIENT,
        seed=seed,
        dtype=image.dtype,
    )
    noise, timesteps = draws.noise[0], draws.timesteps[0]
    x_t = schedule.add_noise(image.expand(num_draws, *image.shape), noise, timesteps)
    if cond is None:
        cond_items = None
    elif isinstance(cond, torch.Tensor) and cond.dim() > 0:  # text states [L, D]
        cond_items = cond.expand(num_draws, *cond.shape)
    else:
        cond_items = torch.full((num_draws,), cond)
    loss = (model(x_t, timesteps, cond_items) - noise).square().flatten(1).mean(1).mean()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # θ
    return dict(
        zip(
            params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True
        )
    )


def assert_example_gradients(grads, row, expected, rtol=1e-7):
    """Row `row` of per-layer gradients equals autograd's parameter gradients `expected`."""
    for name, (weight, bias) in grads.items():
        torch.testing.assert_close(
            weight[row], expected[f"{name}.weight"].flatten(1), rtol=rtol, atol=1e-10
        )
        if bias is not None:
            torch.testing.assert_close(bias[row], expected[f"{name}.bias"], rtol=rtol, atol=1e-10)


def check_against_autograd(engine, model, indices, cond=None):
    grads = engine.train_gradients(indices)
    config = engine.config
    for row, index in enumerate(indices):
        image = engine.train_set[index][0]
        expected = autograd_example_gradient(
            model, engine.schedule, image, cond, index, config.train_draws, config.seed
        )
        assert_example_gradients(grads, row, expected)


@pytest.mark.parametrize(
    "batch_size", [1, 4, 64], ids=["draws-split", "examples-split", "one-pass"]
)
def test_conv_model_per_example_gradients(batch_size):
    torch.manual_seed(0)
    model = TinyConvEps().double()
    data = random_dataset(5, (2, 5, 5), seed=3)
    engine = InfluenceEngine(
        model,
        NoiseSchedule.linear(100),
        data,
        config=ScoreConfig(train_draws=3, batch_size=batch_size),
    )
    check_against_autograd(engine, model, [4, 0, 2])


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_unet_per_example_gradients_include_attention_projections(conditional):
    unet = tiny_unet(3 if conditional else None)
    model = as_eps_model(unet)
    labels = torch.tensor([0, 2, 1]) if conditional else None
    data = random_dataset(3, (1, 4, 4), seed=5, labels=labels)
    engine = InfluenceEngine(
        model, NoiseSchedule.linear(100), data, config=ScoreConfig(train_draws=2)
    )
    assert any(name.endswith("to_q") for name in engine.layers), "attention projections are tracked"
    assert not any("norm" in name for name in engine.layers)
    grads = engine.train_gradients([1, 2])
    for row, index in enumerate([1, 2]):
        image, cond = data[index]
        expected = autograd_example_gradient(
            model, engine.schedule, image, None if not conditional else int(cond), index, 2, 0
        )
        assert_example_gradients(grads, row, expected, rtol=1e-6)
