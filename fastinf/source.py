"""The gradient source: the one object that runs forward and backward passes over draws.

It owns what every gradient depends on — the model and its tracked layers, the noise
schedule, the training set, the draws (`ScoreConfig`: measurement, draws per example,
seed) and the conditioning of each example — and hands per-block results to a layer
consumer (`fastinf.gradients.BlockConsumer` or any `(name, LayerCall)` callable): per-example
gradients, scores against cached queries, sketches, or the rows of a curvature fit.
Curvature fitting, query preparation, exact scoring and the index all draw from it, so a
gradient means the same thing everywhere.

    source = GradientSource(model, schedule, train_set, ScoreConfig())
    grads = source.query_gradients(images)            # ∇m(θ, x_q), per tracked layer
    for block in source.stream(consumer, source.objective(), source.train_spec()):
        ...                                           # consumer holds this block's results
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .artifacts import dataset_fingerprint, model_fingerprint, tensor_fingerprint
from .config import CurvatureConfig, ScoreConfig
from .data import validate_images
from .diffusion import Measurement, NoiseSchedule, Purpose, resolve_measurement
from .distributed import owned, rank_world
from .gradients import (
    BlockConsumer,
    DrawSpec,
    ExampleBlock,
    PerExampleGradients,
    backprop_curvature_seed,
    example_blocks,
    run_block,
)
from .layers import LayerInfo, LayerSelect, capture_layers, find_layers
from .models import as_eps_model, eval_mode
from .progress import progress_bar

__all__ = ["GradientSource", "LayerGrads"]

LayerGrads = dict[str, tuple[Tensor, Tensor | None]]
"""Per-layer gradients: name → (weight [n, d_out, d_in], bias [n, d_out] or None)."""


class GradientSource:
    """Model + noise schedule + training set + draws: gradients of any example on demand.

    Args:
        model: an ε-prediction model, `model(x_t, t, cond) -> ε̂`, or a diffusers
            `UNet2DModel` (wrapped automatically). Only its nn.Linear / nn.Conv2d layers are
            attributed through (normalisation layers and embeddings are excluded).
        schedule: the noise schedule the model was trained with.
        train_set: a map-style Dataset of `(image [C, H, W], cond)` items (cond -1 or None =
            unconditional) — pixels or VAE latents, in the model's input range.
        config: draws, measurement, damping, block sizes (`ScoreConfig`).
        sample_shape: (C, H, W) of one model input; read from the model or the data if None.
        num_workers: DataLoader workers for streaming the training set.
        verify: how the training set is fingerprinted for provenance: "full" (every item),
            "sample" (64 items) or None (full up to `artifacts.FULL_VERIFY_LIMIT` items).
        layers: which layers are attributed (`fastinf.layers.find_layers`): None for every
            trainable Linear/Conv2d, name globs, or a predicate (name, module) -> bool.
            The chosen names are part of the provenance, so a curvature or an index made
            for other layers is refused.

    Every pass runs with the model in eval mode (restored afterwards).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        train_set: Dataset,
        config: ScoreConfig | None = None,
        *,
        sample_shape: tuple[int, int, int] | None = None,
        num_workers: int = 0,
        verify: str | None = None,
        layers: LayerSelect = None,
    ):
        self.model = as_eps_model(model)
        self.schedule = schedule
        self.train_set = train_set
        self.config = config or ScoreConfig()
        self.num_workers = num_workers
        self.layers: dict[str, LayerInfo] = find_layers(self.model, layers)
        first = train_set[0]
        first_image = first[0] if isinstance(first, (tuple, list)) else first
        self.sample_shape = tuple(
            sample_shape or getattr(self.model, "sample_shape", None) or first_image.shape
        )
        validate_images(first_image, self.sample_shape, what="training image 0")
        self.provenance = {
            "model": model_fingerprint(self.model),
            "dataset": dataset_fingerprint(train_set, verify),
            "schedule": schedule.fingerprint(),
            "layers": list(self.layers),
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def with_config(self, config: ScoreConfig) -> GradientSource:
        """The same model and data with other draws or block sizes."""
        view = copy.copy(self)
        view.config = config
        return view

    def share(self, items: Sequence) -> list:
        """The items this rank works on under torch.distributed (all of them alone)."""
        return owned(items, *rank_world())

    # -- what is differentiated, over which draws ------------------------------------------
    def measurement(self) -> Measurement:
        """The query measurement m (`ScoreConfig.measurement` on [t_min, t_max])."""
        cfg = self.config
        return resolve_measurement(cfg.measurement, cfg.t_min, cfg.t_max)

    def objective(self) -> Measurement:
        """The training objective ℓ whose gradient each training example contributes."""
        return resolve_measurement(self.config.train_objective)

    def query_spec(self) -> DrawSpec:
        t_range = self.measurement().timestep_range(self.schedule.num_timesteps)
        return DrawSpec(
            Purpose.QUERY_GRADIENT, self.config.query_draws, self.config.seed, 0, t_range
        )

    def train_spec(self, draw_offset: int = 0, num_draws: int | None = None) -> DrawSpec:
        """Train draws `draw_offset .. draw_offset + num_draws - 1` (default: the
        configured K from 0)."""
        count = self.config.train_draws if num_draws is None else num_draws
        return DrawSpec(Purpose.TRAIN_GRADIENT, count, self.config.seed, draw_offset)

    # -- examples --------------------------------------------------------------------------
    def query_block(self, queries: Tensor, cond: Tensor | int | None = None) -> ExampleBlock:
        """Validated query images on the model's device, with content ids as draw seeds.

        Args:
            queries: [Q, C, H, W] (or one [C, H, W]) generated samples in the model's range.
            cond: class labels [Q] (or one int) for a class-conditional model; text states
                [Q, L, D] (or one [L, D] for every query) for a cross-attention model.
        """
        images = validate_images(queries, self.sample_shape, what="queries")
        if images.shape[0] == 0:
            raise ValueError(
                f"queries is an empty batch (shape {tuple(images.shape)}); pass at least one "
                f"image [Q >= 1, {', '.join(map(str, self.sample_shape))}]."
            )
        images = images.to(self.device, self.dtype)
        if cond is not None:
            cond = self._query_cond(cond, images.shape[0])
        ids = [
            _content_id(images[row], None if cond is None else cond[row])
            for row in range(images.shape[0])
        ]
        return ExampleBlock(torch.tensor(ids, dtype=torch.int64), images, cond)

    def _query_cond(self, cond, count: int) -> Tensor:
        """Class labels [count] (or text states [count, L, D]) for `count` queries, checked
        against the model."""
        if getattr(self.model, "cond_kind", None) == "states":
            return self._query_states(cond, count)
        conditional = getattr(self.model, "is_conditional", None)
        if conditional is False:
            raise ValueError(
                "cond was given but the model is unconditional, so it would be ignored; drop "
                "cond (or attribute a class-conditional model)."
            )
        try:
            labels = torch.as_tensor(cond)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"cond must be class labels (ints), got {cond!r:.80}.") from error
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"cond must be integer class labels, got dtype {labels.dtype}; pass int64 labels."
            )
        labels = labels.to(torch.int64).reshape(-1)
        if labels.numel() not in (1, count):
            raise ValueError(
                f"cond has {labels.numel()} labels for {count} queries; pass one label per "
                "query or a single label for all."
            )
        classes = getattr(self.model, "num_classes", None)
        if classes is not None and bool(((labels < 0) | (labels >= classes)).any()):
            raise ValueError(
                f"cond labels {sorted(set(labels.tolist()))} are outside the model's classes "
                f"0..{classes - 1}; pass labels in that range."
            )
        return labels.expand(count).to(self.device)

    def _query_states(self, cond, count: int) -> Tensor:
        width = self.model.cond_width
        states = cond if isinstance(cond, Tensor) else None
        if states is None or not states.is_floating_point() or states.dim() not in (2, 3):
            raise ValueError(
                f"this model cross-attends to text states: cond must be a float tensor "
                f"[Q, L, {width}] (or one [L, {width}] for every query), got {cond!r:.80}; "
                "encode the prompt with the pipeline's text encoder."
            )
        if states.dim() == 2:
            states = states.unsqueeze(0).expand(count, *states.shape)
        if states.shape[0] != count or states.shape[-1] != width:
            raise ValueError(
                f"cond has shape {tuple(states.shape)} for {count} queries; pass [Q={count}, "
                f"L, {width}] text states (or one [L, {width}] for all)."
            )
        if not bool(torch.isfinite(states).all()):
            raise ValueError("cond (text states) holds NaN or inf; re-encode the prompt.")
        return states.to(self.device, self.dtype)

    def train_blocks(
        self, indices: Sequence[int] | None = None, block_size: int | None = None
    ) -> Iterator[ExampleBlock]:
        """Blocks of training examples (dataset ids; default every example in order),
        checked and moved to the model's device and dtype."""
        size = block_size or self.config.block_size
        for block in example_blocks(self.train_set, size, indices, self.num_workers):
            yield self._checked(block)

    def _checked(self, block: ExampleBlock) -> ExampleBlock:
        images = block.images
        if images.shape[1:] != self.sample_shape or not images.is_floating_point():
            validate_images(images, self.sample_shape, what=f"training examples {block.ids[0]}..")
        bad = ~torch.isfinite(images.flatten(1)).all(1)
        if bool(bad.any()):
            raise ValueError(
                f"training examples {block.ids[bad].tolist()} contain NaN/Inf pixels; clean or "
                "drop them (pass `indices=` to skip them)."
            )
        return ExampleBlock(block.ids, images.to(self.device, self.dtype), block.cond)

    # -- passes ----------------------------------------------------------------------------
    def gradients(
        self, block: ExampleBlock, measurement: Measurement, spec: DrawSpec
    ) -> LayerGrads:
        """Per-example gradients of `measurement` (mean over `spec`'s draws), materialised."""
        consumer = PerExampleGradients(self.layers)
        with eval_mode(self.model), capture_layers(self.layers, consumer) as capture:
            self._run(capture, consumer, block, measurement, spec, self.config.batch_size)
        return consumer.grads()

    def query_gradients(self, queries: Tensor, cond=None) -> LayerGrads:
        """∇m(θ, x_q) of the configured measurement over K_q draws, per tracked layer."""
        return self.gradients(
            self.query_block(queries, cond), self.measurement(), self.query_spec()
        )

    def train_gradients(self, indices: Sequence[int]) -> LayerGrads:
        """∇ℓ(θ, x_n) for the given training examples (K draws each), materialised."""
        block = next(self.train_blocks(indices, block_size=len(indices)))
        return self.gradients(block, self.objective(), self.train_spec())

    def stream(
        self,
        consumer: BlockConsumer,
        measurement: Measurement,
        spec: DrawSpec,
        *,
        indices: Sequence[int] | None = None,
        block_size: int | None = None,
        batch_size: int | None = None,
        desc: str = "train gradients",
    ) -> Iterator[ExampleBlock]:
        """Run every training example (or `indices`) through `consumer`, block by block.

        Yields each block once `consumer` holds its results (gradients of `measurement`,
        mean over `spec`'s draws, in passes of ≤ `batch_size` draws). Memory is O(block).
        """
        total = len(self.train_set) if indices is None else len(indices)
        batch = batch_size or self.config.batch_size
        with (
            eval_mode(self.model),
            capture_layers(self.layers, consumer) as capture,
            progress_bar(total, desc) as bar,
        ):
            for block in self.train_blocks(indices, block_size):
                self._run(capture, consumer, block, measurement, spec, batch)
                yield block
                bar.update(block.ids.numel())

    def _run(self, capture, consumer, block, measurement, spec, batch_size) -> None:
        run_block(
            capture, consumer, self.model, self.schedule, block, measurement, spec, batch_size
        )

    def curvature_seeds(
        self,
        consumer,
        config: CurvatureConfig,
        purpose: int,
        num_draws: int,
        chunks: Sequence[Sequence[int]],
        *,
        desc: str,
    ) -> Iterator[int]:
        """Back-propagate the GGN seeds (`backprop_curvature_seed`) of every example of
        `chunks` (lists of dataset ids) × `num_draws` draws into `consumer`, in passes of
        ≤ `config.batch_size` items, chunk by chunk.

        Yields each chunk's number of draws (examples × `num_draws`) once `consumer` holds
        the chunk, so that the caller can combine or save it before the next one starts.
        Draw d of example n is seeded by (seed, purpose, n, d): it is the same whichever
        chunk, block or rank runs the example.
        """
        per_item = (
            math.prod(self.sample_shape) if (config.mc, config.ggn) == ("exact", "model") else 1
        )
        examples_per_block = max(1, config.batch_size // (per_item * num_draws))
        spec = DrawSpec(purpose, num_draws, config.seed)
        with (
            eval_mode(self.model),
            capture_layers(self.layers, consumer) as capture,
            progress_bar(sum(len(chunk) for chunk in chunks), desc) as bar,
        ):
            for chunk in chunks:
                for block in self.train_blocks(chunk, examples_per_block):
                    backprop_curvature_seed(
                        capture,
                        self.model,
                        self.schedule,
                        block,
                        spec,
                        ggn=config.ggn,
                        mc=config.mc,
                    )
                    bar.update(block.ids.numel())
                yield len(chunk) * num_draws


def _content_id(image: Tensor, cond: Tensor | None) -> int:
    """A 28-bit id from a query's pixels (and label, or text states): it seeds the query's
    draws, so a query's gradient never depends on which other queries share its batch."""
    if cond is None:
        key = tensor_fingerprint(image)
    elif cond.dim() == 0:
        key = tensor_fingerprint(image) + f":{int(cond)}"
    else:
        key = tensor_fingerprint(image) + ":" + tensor_fingerprint(cond)
    return int(hashlib.sha256(key.encode()).hexdigest()[:7], 16)
