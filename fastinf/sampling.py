"""Generating query samples with ancestral DDPM sampling (diffusers `DDPMScheduler`).

Every sample has its own random stream, seeded from (seed, sample index), so sample i is
the same whatever `batch_size` is, and different seeds give independent samples.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastinf.diffusion import NoiseSchedule, Purpose
from fastinf.models import as_eps_model, eval_mode, resolve_sample_shape

__all__ = ["make_ddpm_scheduler", "sample_ddpm"]


def make_ddpm_scheduler(schedule: NoiseSchedule) -> DDPMScheduler:
    """A diffusers `DDPMScheduler` with the betas of `schedule` (ε-prediction).

    Uses the "fixed_small" posterior variance of DDPM and clips the predicted x_0 to
    [-1, 1], the data range of fastinf's pixel models.
    """
    return DDPMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.numpy(),
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
    )


def _sample_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, SAMPLING, sample index)."""
    generators = []
    for index in indices:
        state = np.random.SeedSequence([seed, int(Purpose.SAMPLING), index])
        generators.append(torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0])))
    return generators


def _cond_vector(cond: int | Tensor | None, num_samples: int) -> Tensor | None:
    """Class labels [num_samples] int64 from None, one label, or one label per sample; or
    text states [num_samples, L, D] from one [L, D] or one per sample."""
    if cond is None:
        return None
    if isinstance(cond, Tensor) and cond.is_floating_point() and cond.dim() in (2, 3):
        states = cond if cond.dim() == 3 else cond.expand(num_samples, *cond.shape)
        if states.shape[0] != num_samples:
            raise ValueError(
                f"cond holds {states.shape[0]} text states for {num_samples} samples; give one "
                "[L, D] for all or one per sample."
            )
        return states
    labels = torch.as_tensor(cond, dtype=torch.int64)
    if labels.dim() == 0:
        return labels.expand(num_samples).clone()
    if labels.shape != (num_samples,):
        raise ValueError(
            f"cond must be one class label or one per sample ([{num_samples}]), "
            f"got shape {tuple(labels.shape)}."
        )
    return labels


@torch.no_grad()
def sample_ddpm(
    model: nn.Module,
    schedule: NoiseSchedule,
    num_samples: int,
    *,
    seed: int,
    num_inference_steps: int | None = None,
    cond: int | Tensor | None = None,
    batch_size: int = 256,
    sample_shape: tuple[int, int, int] | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw samples from an ε-prediction model by ancestral DDPM sampling.

    Args:
        model: a `UNet2DModel` or ε-model (`fastinf.models` call convention); used in
            eval mode on its own device.
        schedule: the training noise schedule of `model`.
        num_samples: how many samples to generate.
        seed: non-negative seed; sample i depends only on (seed, i), not on `batch_size`.
        num_inference_steps: number of denoising steps (diffusers "leading" spacing);
            None uses all T steps.
        cond: for a class-conditional model, one class label for all samples or a [n]
            int64 tensor of labels; for a cross-attention model, text states [L, D] for all
            samples or [n, L, D]; None for an unconditional model.
        batch_size: samples denoised together.
        sample_shape: (C, H, W); defaults to `model.sample_shape`.
        progress: show a progress bar over batches.
    Returns:
        Samples [num_samples, C, H, W], float32 on the CPU, clipped to [-1, 1].
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    model = as_eps_model(model)
    shape = resolve_sample_shape(model, sample_shape)
    device = next(model.parameters()).device
    labels = _cond_vector(cond, num_samples)
    scheduler = make_ddpm_scheduler(schedule)
    scheduler.set_timesteps(num_inference_steps or schedule.num_timesteps)
    samples = []
    with eval_mode(model):
        for start in tqdm(range(0, num_samples, batch_size), disable=not progress, desc="sampling"):
            indices = range(start, min(start + batch_size, num_samples))
            generators = _sample_generators(seed, indices)
            batch_labels = None if labels is None else labels[start : indices.stop].to(device)
            if batch_labels is not None and batch_labels.is_floating_point():
                batch_labels = batch_labels.to(next(model.parameters()).dtype)
            x_t = torch.cat([torch.randn((1, *shape), generator=gen) for gen in generators])
            x_t = x_t.to(device, next(model.parameters()).dtype)
            for timestep in scheduler.timesteps:
                timesteps = torch.full(
                    (len(indices),), int(timestep), dtype=torch.int64, device=device
                )
                eps_pred = model(x_t, timesteps, batch_labels)
                x_t = scheduler.step(eps_pred, timestep, x_t, generator=generators).prev_sample
            samples.append(x_t.clamp(-1.0, 1.0).to("cpu", torch.float32))
    return torch.cat(samples)
