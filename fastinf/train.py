"""Training ε-prediction diffusion models: the default digits DDPM and LDS retraining.

The objective is the training loss ℓ of DESIGN §1 (per-pixel-mean squared ε error with
t ~ U{0..T-1}, ε ~ N(0, I)), optimised with AdamW, linear warmup then cosine decay of the
learning rate, gradient-norm clipping and an exponential moving average (EMA) of the
weights. Training randomness (batch order, t, ε) comes from torch generators seeded by
`seed`, so a run is reproducible on a given machine; the hashed draws of
`fastinf.diffusion` are used where reproducibility across batchings matters (evaluation).

Reproduce the shipped weights with `python -m fastinf.train --out-dir fastinf/weights`.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fastinf.config import DIGITS_STEPS
from fastinf.data import batch_cond, load_digits_dataset, validate_images
from fastinf.diffusion import MEASUREMENTS, NoiseSchedule, Purpose
from fastinf.gradients import DrawSpec, ExampleBlock, forward_draws, predict_noise
from fastinf.models import (
    DIGITS_WEIGHTS_PATH,
    as_eps_model,
    default_schedule,
    digits_unet_config,
    eval_mode,
    resolve_sample_shape,
    save_unet,
)

__all__ = [
    "TrainingHistory",
    "evaluate_loss",
    "main",
    "train_default",
    "train_diffusion",
    "train_digits",
    "warmup_cosine",
]

StepCallback = Callable[[int, nn.Module, nn.Module], None]


@dataclass(frozen=True)
class TrainingHistory:
    """What a training run did: one entry per optimiser step.

    Attributes:
        losses: the mini-batch training loss ℓ before each step (online weights).
        learning_rates: the learning rate used by each step.
        wall_time_s: seconds the whole run took.
    """

    losses: tuple[float, ...]
    learning_rates: tuple[float, ...]
    wall_time_s: float

    def final_loss(self, window: int = 100) -> float:
        """Mean mini-batch loss over the last `window` steps (a low-noise final loss)."""
        tail = self.losses[-window:]
        return float(sum(tail) / len(tail))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based), in [0, 1].

    Rises linearly to 1 over the first `warmup_steps` steps, then decays along a half
    cosine to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _stream_seeds(seed: int, count: int) -> list[int]:
    """Independent 63-bit seeds for `count` random streams of one run."""
    states = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(state) >> 1 for state in states]


def _index_batches(
    num_examples: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """`steps` batches of dataset positions, walking through fresh random permutations.

    Batches run across epoch boundaries so every batch is full and every example is seen
    equally often (±1), also when the dataset is smaller than a batch.
    """
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(num_examples, generator=generator)])
        yield order[:batch_size].tolist()
        order = order[batch_size:]


class _BatchSampler:
    """A DataLoader batch sampler replaying `_index_batches` (same order as the tensor path)."""

    def __init__(self, num_examples: int, batch_size: int, steps: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        return _index_batches(self.num_examples, self.batch_size, self.steps, generator)


def _stacked_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """(images [N, C, H, W], conds: labels [N] or text states [N, L, D]) of a tensor-backed
    dataset or a Subset of one."""
    if isinstance(dataset, Subset):
        parent = _stacked_tensors(dataset.dataset)
        if parent is None:
            return None
        positions = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return parent[0][positions], parent[1][positions]
    images = getattr(dataset, "images", None)
    conds = getattr(dataset, "states", None)  # a text dataset's labels are not model inputs
    if conds is None:
        conds = getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(conds, Tensor):
        return images, conds
    return None


def _batches(
    dataset: Dataset, batch_size: int, steps: int, seed: int, device: torch.device, num_workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """`steps` training batches (images [B, C, H, W], conds [B] or [B, L, D]) on `device`."""
    tensors = _stacked_tensors(dataset)
    if tensors is not None:
        images, labels = tensors[0].to(device), tensors[1].to(device)
        generator = torch.Generator().manual_seed(seed)
        for positions in _index_batches(len(images), batch_size, steps, generator):
            index = torch.as_tensor(positions, device=device)
            yield images[index], labels[index]
        return
    loader = DataLoader(
        dataset,
        batch_sampler=_BatchSampler(len(dataset), batch_size, steps, seed),
        num_workers=num_workers,
    )
    for images, conds in loader:
        yield images.to(device), torch.as_tensor(conds).to(device)


@torch.no_grad()
def _ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ; buffers are copied."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


def train_diffusion(
    model: nn.Module,
    dataset: Dataset,
    schedule: NoiseSchedule,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    ema_decay: float = 0.999,
    max_grad_norm: float = 1.0,
    warmup: int | None = None,
    seed: int = 0,
    log_every: int = 100,
    progress: bool = True,
    num_workers: int = 0,
    callback: StepCallback | None = None,
) -> tuple[nn.Module, nn.Module, TrainingHistory]:
    """Train an ε-prediction model in place on the loss ℓ of DESIGN §1.

    Args:
        model: a `UNet2DModel` (wrapped with `as_eps_model`) or an ε-model called as
            `model(x_t, timesteps, cond)`; trained in place on its current device.
        dataset: items `(image [C, H, W], cond)` (`fastinf.data` convention). Datasets that
            expose `.images` [N, C, H, W] and `.labels` [N] tensors (and Subsets of them) are
            indexed directly without collation; others are read through a DataLoader in the
            same order.
        schedule: the noise schedule defining x_t and T.
        steps: number of optimiser steps.
        batch_size: examples per step (batches wrap across epochs, so always full).
        lr: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        ema_decay: EMA decay per step, in [0, 1).
        max_grad_norm: clip the global gradient norm to this value (inf disables).
        warmup: linear warmup steps before the cosine decay; None means 5% of `steps`.
        seed: seeds batch order, timesteps and noise; equal seeds give equal weights.
        log_every: steps between progress-bar loss updates.
        progress: show a progress bar.
        num_workers: DataLoader workers for datasets without tensor storage.
        callback: called as `callback(step, model, ema_model)` after each optimiser step
            (1-based step), e.g. for checkpoints.
    Returns:
        `(model, ema_model, history)`: the trained ε-model, a separate copy holding the EMA
        weights, both in eval mode, and the `TrainingHistory`.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}; 0.999 is typical.")
    if lr <= 0.0:
        raise ValueError(f"lr must be positive, got {lr}.")
    if len(dataset) < 1:
        raise ValueError("the dataset is empty; training needs at least one example.")
    warmup_steps = max(1, steps // 20) if warmup is None else warmup
    if warmup_steps < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}.")

    model = as_eps_model(model)
    device = next(model.parameters()).device
    ema_model = copy.deepcopy(model).requires_grad_(False)
    parameters = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, warmup_steps)
    )
    order_seed, noise_seed = _stream_seeds(seed, 2)
    noise_generator = torch.Generator().manual_seed(noise_seed)
    per_draw_loss = MEASUREMENTS["loss"]
    model_shape = getattr(model, "sample_shape", None)

    losses: list[float] = []
    learning_rates: list[float] = []
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, disable=not progress, desc="training", dynamic_ncols=True)
    batches = _batches(dataset, batch_size, steps, order_seed, device, num_workers)
    for step, (images, conds) in enumerate(batches, start=1):
        if step == 1:
            validate_images(images, model_shape or tuple(images.shape[1:]), "training images")
        # t and ε are drawn on the CPU so a run is the same on every device.
        timesteps = torch.randint(
            0, schedule.num_timesteps, (images.shape[0],), generator=noise_generator
        ).to(device)
        noise = torch.randn(images.shape, generator=noise_generator, dtype=images.dtype)
        noise = noise.to(device)
        eps_pred = predict_noise(model, schedule, images, noise, timesteps, batch_cond(conds))
        loss = per_draw_loss(eps_pred, noise, timesteps, schedule).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_schedule.step()
        _ema_update(ema_model, model, ema_decay)

        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, model, ema_model)
        bar.update(1)
        if step % log_every == 0 or step == steps:
            window = losses[-log_every:]
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{learning_rates[-1]:.1e}")
    bar.close()
    history = TrainingHistory(tuple(losses), tuple(learning_rates), time.perf_counter() - started)
    return model.eval(), ema_model.eval(), history


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: Dataset,
    schedule: NoiseSchedule,
    *,
    num_draws: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    purpose: int = Purpose.EVALUATION,
    sample_shape: tuple[int, int, int] | None = None,
) -> float:
    """Dataset loss: mean over examples of ℓ (DESIGN §1) with fixed, hashed draws.

    Each example (id = its position in `dataset`) gets `num_draws` draws from
    `fastinf.diffusion.make_draws`, so the value does not depend on `batch_size` and two
    models compared with the same `seed` see identical (t, ε).

    Returns:
        The loss (mean squared ε error per pixel), as a Python float.
    """
    model = as_eps_model(model)
    shape = resolve_sample_shape(model, sample_shape)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with eval_mode(model):
        for images, conds in loader:
            images = validate_images(images, shape, "evaluation images").to(device)
            ids = torch.arange(count, count + images.shape[0])
            block = ExampleBlock(ids, images, batch_cond(torch.as_tensor(conds)))
            spec = DrawSpec(purpose, num_draws, seed)
            eps_pred, noise, timesteps = forward_draws(model, schedule, block, spec)
            per_draw = MEASUREMENTS["loss"](eps_pred, noise, timesteps, schedule)
            total += float(per_draw.double().sum())
            count += images.shape[0]
    return total / (count * num_draws)


def train_default(
    unet: nn.Module,
    dataset: Dataset,
    weights_path,
    *,
    description: str,
    command: str,
    metadata: dict | None = None,
    steps: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    ema_decay: float = 0.999,
    warmup: int = 200,
    progress: bool = True,
) -> Path:
    """Train a shipped default from its initial `unet` on `dataset` under
    `default_schedule()` and save its EMA weights with a sidecar of the run's provenance
    (`description`, the reproducing `command`, hyper-parameters, losses, `metadata`)."""
    schedule = default_schedule()
    hyper_parameters = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "ema_decay": ema_decay,
        "warmup": warmup,
        "max_grad_norm": 1.0,
        "lr_schedule": "linear warmup then cosine decay to 0",
        "optimizer": "AdamW",
        "seed": seed,
    }
    _, ema_model, history = train_diffusion(
        unet,
        dataset,
        schedule,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        warmup=warmup,
        seed=seed,
        progress=progress,
    )
    eval_draws = 8
    ema_loss = evaluate_loss(ema_model, dataset, schedule, num_draws=eval_draws, seed=0)
    sidecar = {
        "description": description,
        **(metadata or {}),
        "schedule": {
            "beta_schedule": "linear",
            "num_timesteps": schedule.num_timesteps,
            "beta_start": 1e-4,
            "beta_end": 2e-2,
        },
        "training": hyper_parameters,
        "command": command,
        "final_train_loss": history.final_loss(100),
        "final_train_loss_note": "mean mini-batch loss of the online weights, last 100 steps",
        "ema_eval_loss": ema_loss,
        "ema_eval_loss_note": (
            f"EMA weights on all {len(dataset)} training images, {eval_draws} draws each "
            "(make_draws, Purpose.EVALUATION, seed 0)"
        ),
        "wall_time_s": round(history.wall_time_s, 1),
        "num_parameters": sum(param.numel() for param in ema_model.parameters()),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }
    save_unet(ema_model, weights_path, sidecar)
    return Path(weights_path)


def train_digits(
    out_dir,
    *,
    steps: int = DIGITS_STEPS,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    ema_decay: float = 0.999,
    warmup: int = 200,
    progress: bool = True,
) -> Path:
    """Train the default digits DDPM from scratch and save its EMA weights.

    Writes `digits_unet.safetensors` (fp32 EMA weights) and `digits_unet.json` (UNet
    config, schedule, hyper-parameters, reproducing command, losses) into `out_dir`.

    Returns:
        The path of the weights file.
    """
    from diffusers import UNet2DModel

    # Initialise from `seed` without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**digits_unet_config())
    command = (
        f"python -m fastinf.train --out-dir {out_dir} --steps {steps} --seed {seed} "
        f"--batch-size {batch_size} --lr {lr} --weight-decay {weight_decay} "
        f"--ema-decay {ema_decay} --warmup {warmup}"
    )
    return train_default(
        unet,
        load_digits_dataset(),
        Path(out_dir) / DIGITS_WEIGHTS_PATH.name,
        description="Unconditional DDPM (ε-prediction) on scikit-learn digits; EMA weights.",
        metadata={
            "dataset": "sklearn.datasets.load_digits: 1797 images [1, 8, 8], 0..16 scaled to "
            "[-1, 1]"
        },
        command=command,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        warmup=warmup,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: train the default digits DDPM (`python -m fastinf.train --help`)."""
    parser = argparse.ArgumentParser(description=train_digits.__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(DIGITS_WEIGHTS_PATH.parent))
    parser.add_argument("--steps", type=int, default=DIGITS_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--force", action="store_true", help="replace weights in --out-dir")
    args = parser.parse_args(argv)
    if not args.force and (Path(args.out_dir) / DIGITS_WEIGHTS_PATH.name).exists():
        parser.error(f"{args.out_dir} already holds {DIGITS_WEIGHTS_PATH.name}; pass --force.")
    weights_path = train_digits(
        args.out_dir,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        warmup=args.warmup,
    )
    print(f"wrote {weights_path} and {weights_path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
