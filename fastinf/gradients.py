"""Forward passes over draws and the backward seeds that define each gradient (DESIGN §1).

Items of a pass are laid out example-major: item b·K + k is draw k of example b, so a
layer's rows for one example are `rows.reshape(B, K·R, d)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .data import batch_cond, split_item, validate_indices
from .diffusion import Measurement, NoiseSchedule, make_draws, output_noise
from .layers import LayerCall

__all__ = [
    "BlockConsumer",
    "DrawSpec",
    "ExampleBlock",
    "PerExampleGradients",
    "backprop_curvature_seed",
    "backprop_objective",
    "collate_items",
    "draw_passes",
    "example_blocks",
    "forward_draws",
    "predict_noise",
    "run_block",
]


@dataclass(frozen=True)
class DrawSpec:
    """Which draws a pass uses: `num_draws` draws starting at `draw_offset`, for `purpose`."""

    purpose: int
    num_draws: int
    seed: int = 0
    draw_offset: int = 0
    t_range: tuple[int, int] | None = None

    def draw_ids(self) -> Tensor:
        return torch.arange(self.draw_offset, self.draw_offset + self.num_draws)


@dataclass(frozen=True)
class ExampleBlock:
    """A block of examples: ids [B] (int64), images [B, C, H, W], cond [B] labels, [B, ...]
    conditioning tensors (e.g. text-encoder states [B, L, D]), or None."""

    ids: Tensor
    images: Tensor
    cond: Tensor | None


def collate_items(items: list) -> tuple[Tensor, Tensor | None]:
    """Dataset items (`fastinf.data`) as (images [B, C, H, W], the model's cond: labels
    [B], conditioning tensors [B, ...] or None)."""
    images, conds = [], []
    for item in items:
        image, cond = split_item(item)
        images.append(torch.as_tensor(image))
        conds.append(cond)
    if any(isinstance(cond, Tensor) and cond.dim() > 0 for cond in conds):
        return torch.stack(images), _stack_states(conds)
    labels = torch.tensor([int(cond) for cond in conds], dtype=torch.int64)
    return torch.stack(images), batch_cond(labels)


def _stack_states(conds: list) -> Tensor:
    """Conditioning tensors of one batch (e.g. text states [L, D] each), stacked."""
    shapes = {tuple(cond.shape) if isinstance(cond, Tensor) else None for cond in conds}
    if len(shapes) != 1 or None in shapes:
        raise ValueError(
            "the items' conditioning tensors must all have one shape, got "
            f"{sorted(map(str, shapes))}; pad or encode every caption to the same length."
        )
    return torch.stack(conds)


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        return self.dataset[self.indices[position]]


def example_blocks(
    dataset: Dataset,
    block_size: int,
    indices: Sequence[int] | None = None,
    num_workers: int = 0,
) -> Iterator[ExampleBlock]:
    """Stream `dataset` (items `(image, cond)` or images; cond -1 = unconditional) in blocks.

    Nothing but one block (per worker) is held in memory, so any map-style dataset works:
    tensors, image folders, memory-mapped arrays, precomputed latents.
    """
    # Checked here, before the first block is loaded, not when the stream is first read.
    size = len(dataset)
    order = list(range(size)) if indices is None else validate_indices(indices, size)
    return _blocks(dataset, block_size, order, num_workers)


def _blocks(dataset: Dataset, block_size: int, order: list[int], num_workers: int):
    loader = DataLoader(
        _Indexed(dataset, order),
        batch_size=block_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_items,
    )
    start = 0
    for images, cond in loader:
        ids = torch.tensor(order[start : start + len(images)], dtype=torch.int64)
        start += len(images)
        yield ExampleBlock(ids, images, cond)


def predict_noise(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    cond: Tensor | None,
) -> Tensor:
    """ε̂ = model(x_t, t, cond) at x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, checked to have x_t's shape."""
    x_t = schedule.add_noise(x0, noise, timesteps)
    eps_pred = model(x_t, timesteps, cond)
    if eps_pred.shape != x_t.shape:
        raise ValueError(
            f"the model returned shape {tuple(eps_pred.shape)} for inputs {tuple(x_t.shape)}; "
            "fastinf needs an ε-prediction model whose output has the input's shape."
        )
    return eps_pred


def forward_draws(
    model: nn.Module, schedule: NoiseSchedule, block: ExampleBlock, spec: DrawSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """Predicted noise, true noise [B·K, C, H, W] and timesteps [B·K] for a block's draws.

    The one forward over draws: draw k of example b (item b·K + k) is `make_draws` of the
    example's id and draw id, so it depends on neither batching nor device.
    """
    images, num_draws = block.images, spec.num_draws
    draws = make_draws(
        block.ids,
        spec.draw_ids(),
        tuple(images.shape[1:]),
        num_timesteps=schedule.num_timesteps,
        purpose=spec.purpose,
        seed=spec.seed,
        t_range=spec.t_range,
        dtype=images.dtype,
    )
    noise = draws.noise.to(images.device).flatten(0, 1)
    timesteps = draws.timesteps.to(images.device).flatten()
    x0 = images.repeat_interleave(num_draws, dim=0)
    cond = (
        None
        if block.cond is None
        else block.cond.repeat_interleave(num_draws, dim=0).to(images.device)
    )
    return predict_noise(model, schedule, x0, noise, timesteps, cond), noise, timesteps


def backprop_objective(
    capture,
    model: nn.Module,
    schedule: NoiseSchedule,
    block: ExampleBlock,
    measurement: Measurement,
    spec: DrawSpec,
    *,
    total_draws: int,
) -> None:
    """Back-propagate Σ_b Σ_k f(draw_bk) / total_draws.

    With all of an example's `total_draws` draws split over one or more passes, the rows of
    each example sum to the gradient of its mean-over-draws estimate.
    """
    eps_pred, noise, timesteps = forward_draws(model, schedule, block, spec)
    values = measurement.per_draw(eps_pred, noise, timesteps, schedule)
    total = values.sum() / total_draws
    capture.backward(total, torch.ones_like(total))


def backprop_curvature_seed(
    capture,
    model: nn.Module,
    schedule: NoiseSchedule,
    block: ExampleBlock,
    spec: DrawSpec,
    *,
    ggn: str,
    mc: str,
) -> None:
    """Back-propagate the per-draw vectors whose outer products estimate the GGN.

    ggn='model', mc='sample': √(2/P)·η with η ~ N(0, I) (an unbiased MC-Fisher of G);
    ggn='model', mc='exact': every √(2/P)·e_i (the draws are replicated P times, so
    consumers must normalise by draws, not items); ggn='loss': ∂ℓ_d/∂ε_θ (empirical Fisher).
    """
    if mc == "exact" and ggn == "model":
        num_pixels = math.prod(block.images.shape[1:])
        replicated = ExampleBlock(
            block.ids.repeat_interleave(num_pixels),
            block.images.repeat_interleave(num_pixels, dim=0),
            None if block.cond is None else block.cond.repeat_interleave(num_pixels, dim=0),
        )
        eps_pred, _, _ = forward_draws(model, schedule, replicated, spec)
        # Item (b, i, k) = direction i of draw k of example b: draws must not depend on i,
        # so ids were repeated (same draws); each replica gets one basis direction.
        eye = torch.eye(num_pixels, dtype=eps_pred.dtype, device=eps_pred.device)
        directions = eye.repeat_interleave(spec.num_draws, dim=0).repeat(block.ids.numel(), 1)
        seed = math.sqrt(2.0 / num_pixels) * directions.reshape(eps_pred.shape)
        capture.backward(eps_pred, seed)
        return
    eps_pred, noise, _ = forward_draws(model, schedule, block, spec)
    if ggn == "model":
        eta = output_noise(
            block.ids,
            spec.draw_ids(),
            tuple(block.images.shape[1:]),
            purpose=spec.purpose,
            seed=spec.seed,
        )
        num_pixels = math.prod(block.images.shape[1:])
        seed = math.sqrt(2.0 / num_pixels) * eta.flatten(0, 1).to(eps_pred)
    else:
        num_pixels = math.prod(eps_pred.shape[1:])
        seed = (-2.0 / num_pixels) * (noise - eps_pred.detach())
    capture.backward(eps_pred, seed)


class BlockConsumer:
    """Base of the layer consumers that fill per-example results for a block of examples.

    `reset(B)` starts a block; `set_pass(offset, count)` says which examples of the block the
    next backward pass covers (`count` examples, their draws consecutive in the items).
    """

    def __init__(self, layers):
        self.layers = layers
        self.reset(0)

    def reset(self, num_examples: int) -> None:
        self.num_examples = num_examples
        self.set_pass(0, num_examples)

    def set_pass(self, offset: int, count: int) -> None:
        self.part = slice(offset, offset + count)
        self.count = count


class PerExampleGradients(BlockConsumer):
    """A layer consumer that materialises per-example gradients of the tracked parameters.

    After the passes over a block of B examples, `grads()` maps each layer to
    (weight [B, d_out, d_in], bias [B, d_out] or None). For queries and small blocks:
    scoring never materialises all layers at once.
    """

    def reset(self, num_examples: int) -> None:
        super().reset(num_examples)
        self.weight: dict[str, Tensor] = {}
        self.bias: dict[str, Tensor] = {}

    def grads(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """name → (weight [B, d_out, d_in], bias [B, d_out] or None)."""
        return {name: (weight, self.bias.get(name)) for name, weight in self.weight.items()}

    def __call__(self, name: str, call: LayerCall) -> None:
        info = self.layers[name]
        weight, bias = call.example_gradients(self.count)
        if name not in self.weight:
            self.weight[name] = weight.new_zeros(self.num_examples, info.d_out, info.d_in)
            if info.has_bias:
                self.bias[name] = weight.new_zeros(self.num_examples, info.d_out)
        self.weight[name][self.part] += weight
        if bias is not None:
            self.bias[name][self.part] += bias


def draw_passes(
    block: ExampleBlock, base: DrawSpec, batch_size: int
) -> Iterator[tuple[int, ExampleBlock, DrawSpec]]:
    """Split a block's examples × `base.num_draws` draws into passes of ≤ `batch_size` draws.

    Examples are split first; an example whose draws alone exceed `batch_size` has them
    split into consecutive draw ranges. Every (example, draw) pair appears exactly once.
    Yields (offset of the first example within the block, sub-block, draws).
    """
    per_pass = max(1, batch_size // base.num_draws)
    draw_chunk = min(base.num_draws, max(1, batch_size // per_pass))
    for start in range(0, block.ids.numel(), per_pass):
        part = slice(start, start + per_pass)
        sub = ExampleBlock(
            block.ids[part], block.images[part], None if block.cond is None else block.cond[part]
        )
        for offset in range(0, base.num_draws, draw_chunk):
            count = min(draw_chunk, base.num_draws - offset)
            spec = DrawSpec(base.purpose, count, base.seed, base.draw_offset + offset, base.t_range)
            yield start, sub, spec


def run_block(
    capture,
    consumer: BlockConsumer,
    model: nn.Module,
    schedule: NoiseSchedule,
    block: ExampleBlock,
    measurement: Measurement,
    spec: DrawSpec,
    batch_size: int,
) -> None:
    """Fill `consumer` with the gradients of `measurement` (mean over `spec`'s draws) for
    every example of `block`, in passes of at most `batch_size` draws."""
    consumer.reset(block.ids.numel())
    for offset, sub, sub_spec in draw_passes(block, spec, batch_size):
        consumer.set_pass(offset, sub.ids.numel())
        backprop_objective(
            capture, model, schedule, sub, measurement, sub_spec, total_draws=spec.num_draws
        )
