import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import fastinf.train as train_module
from fastinf.data import ImageTensorDataset, load_digits_dataset
from fastinf.diffusion import NoiseSchedule, Purpose, make_draws
from fastinf.train import evaluate_loss, train_diffusion, warmup_cosine

from tiny import small_unet

SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.1)


class TinyEps(nn.Module):
    """A generic ε-model: one 3×3 conv plus a learned per-timestep offset."""

    sample_shape = (1, 8, 8)

    def __init__(self, num_timesteps=100, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.offset = nn.Embedding(num_timesteps, 1)

    def forward(self, x_t, timesteps, cond=None):
        return self.conv(x_t) + self.offset(timesteps)[:, :, None, None]


class ZeroEps(nn.Module):
    """Predicts ε = 0, so its loss is the mean squared noise of the draws."""

    sample_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x_t, timesteps, cond=None):
        return torch.zeros_like(x_t) * self.unused


class ItemsOnly(Dataset):
    """Hides a dataset's tensor storage so training must go through a DataLoader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


@pytest.fixture(scope="module")
def digits_64():
    digits = load_digits_dataset()
    return ImageTensorDataset(digits.images[:64], digits.labels[:64])


def weights_of(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def run(model, dataset, **kwargs):
    options = {"steps": 12, "batch_size": 16, "lr": 5e-3, "progress": False, **kwargs}
    return train_diffusion(model, dataset, SCHEDULE, **options)


def test_public_api_is_pinned():
    assert sorted(train_module.__all__) == sorted(
        [
            "TrainingHistory",
            "evaluate_loss",
            "main",
            "train_default",
            "train_diffusion",
            "train_digits",
            "warmup_cosine",
        ]
    )


def test_training_reduces_the_loss_on_fixed_draws(digits_64):
    model = small_unet()
    before = evaluate_loss(model, digits_64, SCHEDULE, num_draws=4, seed=1)
    trained, ema_model, history = run(model, digits_64, steps=60, lr=1e-2, ema_decay=0.9)
    after = evaluate_loss(trained, digits_64, SCHEDULE, num_draws=4, seed=1)
    after_ema = evaluate_loss(ema_model, digits_64, SCHEDULE, num_draws=4, seed=1)
    assert after < 0.6 * before
    assert after_ema < 0.6 * before
    assert len(history.losses) == 60
    assert history.final_loss(10) < history.losses[0]


def test_training_is_deterministic_given_the_seed(digits_64):
    first, first_ema, first_history = run(small_unet(), digits_64, seed=3)
    second, second_ema, second_history = run(small_unet(), digits_64, seed=3)
    assert_same_weights(weights_of(first), weights_of(second))
    assert_same_weights(weights_of(first_ema), weights_of(second_ema))
    assert first_history.losses == second_history.losses
    other, _, _ = run(small_unet(), digits_64, seed=4)
    assert not torch.equal(first.unet.conv_in.weight, other.unet.conv_in.weight), (
        "a different seed must give different weights"
    )


def test_tensor_path_equals_dataloader_path(digits_64):
    # 64 examples with batch 24: batches straddle epoch boundaries.
    tensor_model, _, _ = run(TinyEps(), digits_64, batch_size=24, seed=5)
    loader_model, _, _ = run(TinyEps(), ItemsOnly(digits_64), batch_size=24, seed=5)
    assert_same_weights(weights_of(tensor_model), weights_of(loader_model))


def test_subset_trains_like_the_same_images_stacked(digits_64):
    positions = [3, 9, 10, 17, 40, 41, 63]
    subset_model, _, _ = run(TinyEps(), Subset(digits_64, positions), batch_size=4, seed=2)
    stacked = ImageTensorDataset(digits_64.images[positions], digits_64.labels[positions])
    stacked_model, _, _ = run(TinyEps(), stacked, batch_size=4, seed=2)
    assert_same_weights(weights_of(subset_model), weights_of(stacked_model))


def test_ema_matches_a_hand_computation(digits_64):
    decay = 0.5
    model = TinyEps()
    initial = weights_of(model)
    online, ema = [], []

    def record(step, current, ema_model):
        online.append(weights_of(current))
        ema.append(weights_of(ema_model))

    run(model, digits_64, steps=2, ema_decay=decay, callback=record)
    for name, theta_0 in initial.items():
        theta_1, theta_2 = online[0][name], online[1][name]
        assert not torch.equal(theta_1, theta_0) and not torch.equal(theta_2, theta_1)
        expected_1 = decay * theta_0 + (1 - decay) * theta_1
        expected_2 = decay**2 * theta_0 + decay * (1 - decay) * theta_1 + (1 - decay) * theta_2
        torch.testing.assert_close(ema[0][name], expected_1, rtol=0, atol=1e-7)
        torch.testing.assert_close(ema[1][name], expected_2, rtol=0, atol=1e-7)


def test_learning_rate_follows_warmup_then_cosine(digits_64):
    _, _, history = run(TinyEps(), digits_64, steps=10, lr=0.1, warmup=4)
    expected = [0.1 * warmup_cosine(step, 10, 4) for step in range(10)]
    assert history.learning_rates == pytest.approx(expected)
    assert expected[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    assert warmup_cosine(7, 10, 4) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 4) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(3, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_class_conditional_training_needs_labels(digits_64):
    unet = small_unet(num_class_embeds=10)
    initial_embedding = unet.class_embedding.weight.detach().clone()
    _, _, history = run(unet, digits_64, steps=3)
    assert len(history.losses) == 3
    # The labels reached the model: every class embedding row received gradient.
    changed = (unet.class_embedding.weight - initial_embedding).abs().amax(dim=1)
    assert bool(torch.all(changed > 0))
    unlabelled = ImageTensorDataset(digits_64.images)
    with pytest.raises(ValueError, match="class-conditional"):
        run(small_unet(num_class_embeds=10), unlabelled, steps=1)


def test_training_rejects_bad_arguments_and_images(digits_64):
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        run(TinyEps(), digits_64, ema_decay=1.0)
    with pytest.raises(ValueError, match="steps"):
        run(TinyEps(), digits_64, steps=0)
    wrong_size = ImageTensorDataset(torch.zeros(8, 1, 6, 6))
    with pytest.raises(ValueError, match="training images have 6 height but the model expects 8"):
        run(TinyEps(), wrong_size)


def test_evaluate_loss_uses_the_hashed_draws(digits_64):
    # ε_θ = 0 makes ℓ the mean squared noise of exactly the draws make_draws returns.
    draws = make_draws(
        torch.arange(64),
        torch.arange(3),
        (1, 8, 8),
        num_timesteps=SCHEDULE.num_timesteps,
        purpose=Purpose.EVALUATION,
        seed=7,
    )
    expected = float(draws.noise.double().square().mean())
    value = evaluate_loss(ZeroEps(), digits_64, SCHEDULE, num_draws=3, seed=7, batch_size=10)
    assert value == pytest.approx(expected, rel=1e-6)


def test_evaluate_loss_does_not_depend_on_batch_size(digits_64):
    model = small_unet()
    model.train()
    by_7 = evaluate_loss(model, digits_64, SCHEDULE, num_draws=2, batch_size=7)
    by_64 = evaluate_loss(model, digits_64, SCHEDULE, num_draws=2, batch_size=64)
    assert by_7 == pytest.approx(by_64, rel=1e-5)
    assert model.training, "evaluation must restore the training flag"
    trained, _, _ = run(copy.deepcopy(model), digits_64, steps=5)
    assert evaluate_loss(trained, digits_64, SCHEDULE, num_draws=2) != pytest.approx(by_64)
