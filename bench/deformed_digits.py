"""A large digits-like training set: seeded random deformations of the 1,797 sklearn digits.

Image n is digit n mod 1,797 (8×8, in [-1, 1] as `fastinf.data.load_digits_dataset` gives
them), warped by its own random map, drawn from a generator seeded by (seed, n // CHUNK):

- an affine map: rotation ±12°, scale ×0.9–1.1 per axis, shear ±0.15, shift ±0.6 pixel;
- an elastic displacement: i.i.d. N(0, 1) per pixel and axis, smoothed by a Gaussian of
  1.5 pixels, scaled to a root-mean-square of 0.5 pixel;

sampled bilinearly (outside the image: background, -1). Image 0…1,796 of the set are
deformed too: no image of the set is a shipped digit. The same (count, seed) always gives
the same images, whatever the machine.

    from deformed_digits import deformed_digits
    train_set = deformed_digits(100_000)   # an ImageTensorDataset [100000, 1, 8, 8]
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from fastinf.data import ImageTensorDataset, load_digits_dataset

CHUNK = 4096
ROTATION_DEGREES = 12.0
SCALE_RANGE = 0.1
SHEAR = 0.15
SHIFT_PIXELS = 0.6
ELASTIC_SIGMA = 1.5
ELASTIC_RMS_PIXELS = 0.5


def _uniform(generator: torch.Generator, count: int, half_width: float) -> torch.Tensor:
    return (2 * torch.rand(count, generator=generator, dtype=torch.float64) - 1) * half_width


def _smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, 2, H, W] displacement fields (zero padding)."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    field = functional.conv2d(field, rows, padding=(radius, 0), groups=channels)
    return functional.conv2d(field, cols, padding=(0, radius), groups=channels)


def _deform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each of `images` [B, 1, H, W] warped by its own random affine + elastic map."""
    count, _, height, width = images.shape
    angle = torch.deg2rad(_uniform(generator, count, ROTATION_DEGREES))
    scale_x = 1 + _uniform(generator, count, SCALE_RANGE)
    scale_y = 1 + _uniform(generator, count, SCALE_RANGE)
    shear = _uniform(generator, count, SHEAR)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    shift_x = _uniform(generator, count, SHIFT_PIXELS) * 2 / width
    shift_y = _uniform(generator, count, SHIFT_PIXELS) * 2 / height
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(count, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = scale_x * cos
    theta[:, 0, 1] = scale_x * (shear * cos - sin)
    theta[:, 1, 0] = scale_y * sin
    theta[:, 1, 1] = scale_y * (shear * sin + cos)
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = functional.affine_grid(theta, [count, 1, height, width], align_corners=False)
    noise = torch.randn(count, 2, height, width, generator=generator, dtype=torch.float64)
    field = _smooth(noise, ELASTIC_SIGMA)
    field = field / field.square().mean((1, 2, 3), keepdim=True).sqrt() * ELASTIC_RMS_PIXELS
    pixel = torch.tensor([2 / width, 2 / height], dtype=torch.float64).view(1, 2, 1, 1)
    grid = grid + (field * pixel).permute(0, 2, 3, 1)
    # Sample (image + 1) with zero padding, so that outside the digit is background (-1).
    warped = functional.grid_sample(
        images.double() + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return (warped - 1).clamp_(-1, 1).to(images.dtype)


def deformed_digits(count: int, seed: int = 0) -> ImageTensorDataset:
    """`count` deformed digits [count, 1, 8, 8] float32 in [-1, 1] (labels: the digit's)."""
    digits = load_digits_dataset()
    source = torch.arange(count) % len(digits)
    images = torch.empty(count, *digits.sample_shape)
    for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start // CHUNK)
        images[start:stop] = _deform(digits.images[source[start:stop]], generator)
    return ImageTensorDataset(images, digits.labels[source])
