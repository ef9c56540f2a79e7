"""The Linear Data-modelling Score (LDS) and the measurements it compares (DESIGN §5).

Protocol (Park et al., TRAK; Mlodozeniec et al., §5): draw M random subsets S_m holding a
fraction α of the training set, retrain a model on each, and measure each query under each
retrained model with draws shared across models. An attribution method predicts the
measurement of query q under S_m from the scores of the *removed* examples,
Σ_{n ∉ S_m} τ(q, n) (removing a proponent, τ > 0, is predicted to raise the query's loss),
and the LDS of q is the Spearman rank correlation between predictions and measurements
over the M subsets. The reported figure is the mean over queries ± its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from .data import batch_cond
from .diffusion import NoiseSchedule, Purpose, resolve_measurement
from .gradients import DrawSpec, ExampleBlock, draw_passes, forward_draws
from .models import as_eps_model, eval_mode

__all__ = [
    "LDSResult",
    "lds",
    "measure_queries",
    "oracle_lds",
    "spearman",
    "subset_masks",
    "subset_predictions",
]


def subset_masks(num_examples: int, num_subsets: int, fraction: float, seed: int) -> Tensor:
    """[M, N] bool masks of the kept examples: each subset keeps exactly round(α·N)
    examples, drawn uniformly without replacement, independently per subset."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the subset fraction must be in (0, 1), got {fraction}; 0.5 is usual.")
    if num_subsets < 2:
        raise ValueError(f"LDS needs at least 2 subsets (50 or more is usual), got {num_subsets}.")
    kept = round(fraction * num_examples)
    if not 0 < kept < num_examples:
        raise ValueError(
            f"fraction {fraction} of {num_examples} examples keeps {kept}: "
            "every subset must keep some and remove some examples."
        )
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_examples, dtype=torch.bool)
    for row in range(num_subsets):
        masks[row, torch.randperm(num_examples, generator=generator)[:kept]] = True
    return masks


def subset_predictions(scores: Tensor, masks: Tensor) -> Tensor:
    """[M, Q] predicted measurement changes: Σ over each subset's removed examples of
    τ(q, n), from scores [Q, N] and kept-masks [M, N]."""
    if scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores cover {scores.shape[1]} training examples but the subsets {masks.shape[1]}: "
            "score the same training set the subsets were drawn from."
        )
    removed = (~masks).to(torch.float64)
    return removed @ scores.to(torch.float64).T


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation of each column of two [M, Q] matrices (average ranks for
    ties), [Q] float64; NaN for a column that is constant in either matrix."""
    if first.shape != second.shape or first.dim() != 2:
        raise ValueError(
            f"need two [M, Q] matrices of one shape, got {first.shape}, {second.shape}"
        )
    ranks = [torch.from_numpy(rankdata(m.double().cpu().numpy(), axis=0)) for m in (first, second)]
    centred = [r - r.mean(0, keepdim=True) for r in ranks]
    numerator = (centred[0] * centred[1]).sum(0)
    denominator = (centred[0].square().sum(0) * centred[1].square().sum(0)).sqrt()
    return numerator / denominator


@dataclass(frozen=True)
class LDSResult:
    """Per-query Spearman correlations [Q] and their mean ± standard error."""

    per_query: Tensor

    @property
    def mean(self) -> float:
        return float(self.per_query.nanmean())

    @property
    def sem(self) -> float:
        valid = self.per_query[~self.per_query.isnan()]
        if valid.numel() < 2:
            return math.nan
        return float(valid.std(unbiased=True) / math.sqrt(valid.numel()))

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sem:.3f}"


def lds(scores: Tensor, masks: Tensor, measurements: Tensor) -> LDSResult:
    """LDS of attribution scores [Q, N] against measurements [M, Q] under retrained models
    on the subsets `masks` [M, N] (kept examples)."""
    if measurements.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"measurements must be [subsets, queries] = {(masks.shape[0], scores.shape[0])}, "
            f"got {tuple(measurements.shape)}."
        )
    return LDSResult(spearman(subset_predictions(scores, masks), measurements))


def oracle_lds(measurements: Tensor, replicate: Tensor) -> LDSResult:
    """The seed-to-seed oracle: the LDS of "exact retraining", i.e. of predicting the
    measurements [M, Q] of one set of retrained models by those of models retrained on the
    same subsets with another seed."""
    return LDSResult(spearman(replicate, measurements))


@torch.no_grad()
def measure_queries(
    model: nn.Module,
    schedule: NoiseSchedule,
    queries: Tensor,
    *,
    measurement: str = "loss",
    num_draws: int = 512,
    seed: int = 0,
    cond: Tensor | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """m(θ, x_q) [Q] float64: the measurement averaged over `num_draws` draws per query.

    The draws depend only on the query's position, `seed` and `num_draws`, so every model
    measured with the same arguments sees the same (t, ε): differences between retrained
    models are not masked by draw noise (common random numbers).
    """
    model = as_eps_model(model)
    measure = resolve_measurement(measurement)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    t_range = measure.timestep_range(schedule.num_timesteps)
    totals = torch.zeros(queries.shape[0], dtype=torch.float64)
    # Draws are keyed by the query's position, so any batching sees the same (t, ε).
    block = ExampleBlock(
        torch.arange(queries.shape[0]),
        queries.to(device, dtype),
        None if cond is None else batch_cond(torch.as_tensor(cond)),
    )
    spec = DrawSpec(Purpose.EVALUATION, num_draws, seed, 0, t_range)
    with eval_mode(model):
        for offset, part, part_spec in draw_passes(block, spec, batch_size):
            eps_pred, noise, timesteps = forward_draws(model, schedule, part, part_spec)
            values = measure.per_draw(eps_pred, noise, timesteps, schedule).double().cpu()
            rows = slice(offset, offset + part.ids.numel())
            totals[rows] += values.reshape(part.ids.numel(), part_spec.num_draws).sum(1)
    return totals / num_draws
