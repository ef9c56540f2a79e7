"""Noise schedules, reproducible draws and the measurements."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from fastinf.diffusion import MEASUREMENTS, NoiseSchedule, Purpose, make_draws, resolve_measurement


def draws(ids, draw_ids, **kw):
    kw = {"num_timesteps": 1000, "purpose": Purpose.TRAIN_GRADIENT, **kw}
    return make_draws(torch.as_tensor(ids), torch.as_tensor(draw_ids), (1, 3, 3), **kw)


def test_draws_do_not_depend_on_batching():
    full = draws(range(10), range(6))
    part = draws([7, 3], [4, 5])
    assert torch.equal(part.noise, full.noise[[7, 3]][:, 4:6])
    assert torch.equal(part.timesteps, full.timesteps[[7, 3]][:, 4:6])


@pytest.mark.parametrize("change", [dict(seed=1), dict(purpose=Purpose.QUERY_GRADIENT)])
def test_seed_and_purpose_give_independent_draws(change):
    base, other = draws(range(50), range(4)), draws(range(50), range(4), **change)
    assert not torch.equal(base.timesteps, other.timesteps)
    correlation = torch.corrcoef(torch.stack([base.noise.flatten(), other.noise.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.05


def test_draw_statistics():
    result = draws(range(400), range(25))
    noise = result.noise.flatten().double()
    # 90,000 normals: mean within 5 standard errors, variance within 2%.
    assert abs(float(noise.mean())) < 5 / math.sqrt(noise.numel())
    assert float(noise.var()) == pytest.approx(1.0, rel=0.02)
    counts = torch.bincount(result.timesteps.flatten(), minlength=1000)
    assert counts.sum() == 10000 and counts.max() < 30
    ranged = draws(range(100), range(10), t_range=(10, 12))
    assert set(ranged.timesteps.unique().tolist()) == {10, 11, 12}


def test_schedule_matches_diffusers_scheduler():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    torch.testing.assert_close(
        schedule.alphas_cumprod, NoiseSchedule.linear().alphas_cumprod, rtol=1e-6, atol=0
    )
    torch.testing.assert_close(schedule.betas.float(), scheduler.betas, rtol=1e-4, atol=1e-7)
    x0, noise = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(
        schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"values in \(0, 1\]"):
        NoiseSchedule(torch.tensor([1.0, 0.0]))


def test_measurements_values():
    schedule = NoiseSchedule.linear(10)
    eps_pred, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 4, 9])
    loss = MEASUREMENTS["loss"](eps_pred, eps, t, schedule)
    torch.testing.assert_close(loss, ((eps - eps_pred) ** 2).mean((1, 2, 3)))
    betas = schedule.betas
    weights = betas / (2 * (1 - betas) * (1 - schedule.alphas_cumprod))
    elbo = MEASUREMENTS["elbo_simplified"](eps_pred, eps, t, schedule)
    torch.testing.assert_close(
        elbo, (10 * weights[t]).float() * ((eps - eps_pred) ** 2).sum((1, 2, 3))
    )
    torch.testing.assert_close(
        MEASUREMENTS["square_norm"](eps_pred, eps, t, schedule), (eps_pred**2).mean((1, 2, 3))
    )


def test_resolve_measurement():
    assert resolve_measurement("timestep_loss", 5, 5).timestep_range(10) == (5, 5)
    with pytest.raises(ValueError, match="outside"):
        resolve_measurement("timestep_loss", 5, 20).timestep_range(10)
    with pytest.raises(ValueError, match="unknown measurement 'elbo'"):
        resolve_measurement("elbo")

    def my_measure(eps_pred, eps, timesteps, schedule):
        return eps_pred.flatten(1).sum(1)

    custom = resolve_measurement(my_measure)
    assert custom.name == "my_measure" and custom.timestep_range(7) == (0, 6)
