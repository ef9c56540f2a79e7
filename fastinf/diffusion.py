"""The diffusion objective: noise schedules, reproducible draws and measurements (DESIGN §1).

A *draw* d = (x_n, t, ε) pairs an example with a timestep t ~ U{0..T-1} and noise
ε ~ N(0, I). Every draw's randomness comes from a counter-based hash of
(seed, purpose, example id, draw index, stream), so a score never depends on batch size,
chunking, device or the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

__all__ = [
    "MEASUREMENTS",
    "Draws",
    "Measurement",
    "NoiseSchedule",
    "Purpose",
    "make_draws",
    "output_noise",
    "resolve_measurement",
    "uniform_stream",
]

_MASK32 = 0xFFFFFFFF


class Purpose(IntEnum):
    """What a draw is used for; each purpose gets independent randomness."""

    TRAIN_GRADIENT = 1
    QUERY_GRADIENT = 2
    FIT_FACTORS = 3
    FIT_EIGVALS = 4
    TRAINING = 5
    SAMPLING = 6
    EVALUATION = 7


class _Stream(IntEnum):
    TIMESTEP = 11
    NOISE = 12
    OUTPUT_NOISE = 13


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding uint32 values.

    Products may wrap past 2**63; only their low 32 bits are kept, which wrapping preserves.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _draw_keys(seed: int, purpose: int, example_ids: Tensor, draw_ids: Tensor, stream: int):
    """Hash keys [B, K] for every (example, draw) pair."""
    base = _mix32(torch.tensor((seed * 0x9E3779B9 + purpose * 0x85EBCA6B) & _MASK32))
    ex = _mix32(example_ids.to(torch.int64).reshape(-1, 1) + base)
    key = _mix32(ex ^ _mix32(draw_ids.to(torch.int64).reshape(1, -1) + 0x68E31DA4))
    return _mix32(key + stream * 0x1B873593)


def uniform_stream(keys: Tensor, count: int) -> Tensor:
    """`count` uniforms in (0, 1), float64, for each hash key: shape [*keys.shape, count]."""
    counters = torch.arange(count, dtype=torch.int64)
    bits = _mix32(_mix32(keys.unsqueeze(-1) ^ (counters * 0x27D4EB2F)) + 0x165667B1)
    return (bits.to(torch.float64) + 0.5) / 4294967296.0


def _normal_stream(keys: Tensor, count: int) -> Tensor:
    """`count` standard normals per key (Box-Muller on two uniform streams), float64."""
    u = uniform_stream(keys, 2 * count)
    radius = torch.sqrt(-2.0 * torch.log(u[..., :count]))
    return radius * torch.cos(2.0 * math.pi * u[..., count:])


@dataclass(frozen=True)
class Draws:
    """Timesteps [B, K] (int64) and noise [B, K, *sample_shape] for B examples × K draws."""

    timesteps: Tensor
    noise: Tensor

    @property
    def num_examples(self) -> int:
        return self.timesteps.shape[0]

    @property
    def num_draws(self) -> int:
        return self.timesteps.shape[1]


class NoiseSchedule:
    """A discrete DDPM noise schedule given by ᾱ_t, t = 0..T-1 (diffusers convention).

    Args:
        alphas_cumprod: [T] decreasing values in (0, 1].
    """

    def __init__(self, alphas_cumprod: Tensor):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if acp.numel() < 1 or not torch.all((acp > 0) & (acp <= 1)):
            raise ValueError(
                "alphas_cumprod must be a non-empty vector of values in (0, 1]; "
                "pass scheduler.alphas_cumprod from a diffusers scheduler."
            )
        self.alphas_cumprod = acp

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        """Build from any diffusers scheduler that exposes `alphas_cumprod` (e.g. DDPMScheduler)."""
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start=1e-4, beta_end=2e-2) -> NoiseSchedule:
        """The DDPM linear β schedule."""
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def betas(self) -> Tensor:
        acp = self.alphas_cumprod
        prev = torch.cat([acp.new_ones(1), acp[:-1]])
        return 1.0 - acp / prev

    def elbo_weights(self) -> Tensor:
        """w_t = β_t / (2 α_t (1 − ᾱ_t)), the ε-parameterised ELBO weights (float64, [T])."""
        betas = self.betas
        return betas / (2.0 * (1.0 - betas) * (1.0 - self.alphas_cumprod))

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, broadcasting ᾱ_t over the non-batch dims."""
        acp = self.alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype)
        acp = acp.reshape(-1, *([1] * (x0.dim() - 1)))
        return acp.sqrt() * x0 + (1.0 - acp).sqrt() * noise

    def fingerprint(self) -> list[float]:
        """A short, JSON-friendly summary that identifies the schedule."""
        acp = self.alphas_cumprod
        return [self.num_timesteps, float(acp[0]), float(acp[len(acp) // 2]), float(acp[-1])]


PerDrawFn = Callable[[Tensor, Tensor, Tensor, NoiseSchedule], Tensor]


@dataclass(frozen=True)
class Measurement:
    """A per-draw objective, averaged over draws: the training loss or a query measurement.

    `per_draw(eps_pred, eps, timesteps, schedule)` returns one value per draw ([n]);
    timesteps are drawn uniformly from [t_min, t_max] (inclusive; None means the full range).
    """

    name: str
    per_draw: PerDrawFn
    t_min: int | None = None
    t_max: int | None = None

    def timestep_range(self, num_timesteps: int) -> tuple[int, int]:
        low = 0 if self.t_min is None else self.t_min
        high = num_timesteps - 1 if self.t_max is None else self.t_max
        if not 0 <= low <= high < num_timesteps:
            raise ValueError(
                f"measurement {self.name!r}: timestep range [{low}, {high}] is outside "
                f"[0, {num_timesteps - 1}]; choose t_min <= t_max within the schedule."
            )
        return low, high

    def describe(self) -> dict:
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}


def _pixel_mse(eps_pred: Tensor, eps: Tensor, timesteps: Tensor, schedule) -> Tensor:
    return (eps - eps_pred).square().flatten(1).mean(1)


def _elbo_simplified(eps_pred: Tensor, eps: Tensor, timesteps: Tensor, schedule) -> Tensor:
    # Σ_t w_t E‖ε−ε_θ‖² estimated with t ~ U{0..T-1}: T · w_t · ‖ε−ε_θ‖².
    weights = schedule.elbo_weights().to(eps.device)[timesteps].to(eps.dtype)
    return schedule.num_timesteps * weights * (eps - eps_pred).square().flatten(1).sum(1)


def _square_norm(eps_pred: Tensor, eps: Tensor, timesteps: Tensor, schedule) -> Tensor:
    return eps_pred.square().flatten(1).mean(1)


MEASUREMENTS: dict[str, PerDrawFn] = {
    "loss": _pixel_mse,
    "timestep_loss": _pixel_mse,
    "elbo_simplified": _elbo_simplified,
    "square_norm": _square_norm,
}


def resolve_measurement(
    spec: str | Measurement | PerDrawFn, t_min: int | None = None, t_max: int | None = None
) -> Measurement:
    """Turn a name from `MEASUREMENTS`, a `Measurement` or a callable into a `Measurement`.

    `timestep_loss` needs `t_min`/`t_max` (a fixed t when equal). A user callable
    `fn(eps_pred, eps, timesteps, schedule) -> [n]` is named after its `__name__`.
    """
    if isinstance(spec, Measurement):
        return spec
    if callable(spec):
        return Measurement(getattr(spec, "__name__", "custom"), spec, t_min, t_max)
    if spec not in MEASUREMENTS:
        raise ValueError(
            f"unknown measurement {spec!r}; use one of {sorted(MEASUREMENTS)} or pass a callable "
            "fn(eps_pred, eps, timesteps, schedule) -> per-draw values."
        )
    if spec == "timestep_loss" and t_min is None and t_max is None:
        raise ValueError("measurement 'timestep_loss' needs t_min and/or t_max (equal for one t).")
    return Measurement(spec, MEASUREMENTS[spec], t_min, t_max)


def make_draws(
    example_ids: Tensor,
    draw_ids: Tensor,
    sample_shape: tuple[int, ...],
    *,
    num_timesteps: int,
    purpose: int,
    seed: int = 0,
    t_range: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Draws:
    """Deterministic draws for examples × draw indices.

    Args:
        example_ids: [B] integer ids (dataset index, or a content hash for queries).
        draw_ids: [K] draw indices (0..K-1, or an offset range for later passes).
        sample_shape: (C, H, W) of one model input.
        num_timesteps: T of the schedule.
        purpose: a `Purpose`; different purposes give independent draws.
        seed: global seed; different seeds give independent draws.
        t_range: inclusive timestep range, default the full [0, T-1].
    Returns:
        `Draws` with timesteps [B, K] and noise [B, K, *sample_shape] in `dtype`, on the CPU.
    """
    low, high = (0, num_timesteps - 1) if t_range is None else t_range
    t_keys = _draw_keys(seed, purpose, example_ids, draw_ids, _Stream.TIMESTEP)
    u = uniform_stream(t_keys, 1)[..., 0]
    timesteps = (low + torch.floor(u * (high - low + 1))).to(torch.int64).clamp_(low, high)
    n_keys = _draw_keys(seed, purpose, example_ids, draw_ids, _Stream.NOISE)
    noise = _normal_stream(n_keys, math.prod(sample_shape)).to(dtype)
    return Draws(timesteps, noise.reshape(*t_keys.shape, *sample_shape))


def output_noise(
    example_ids: Tensor, draw_ids: Tensor, sample_shape, *, purpose: int, seed: int = 0
) -> Tensor:
    """η ~ N(0, I) [B, K, *sample_shape] for the MC-Fisher backward vector, float64."""
    keys = _draw_keys(seed, purpose, example_ids, draw_ids, _Stream.OUTPUT_NOISE)
    return _normal_stream(keys, math.prod(sample_shape)).reshape(*keys.shape, *sample_shape)
