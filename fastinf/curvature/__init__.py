"""Curvature strategies: approximations G of the GGN that precondition query gradients.

Each strategy is a module with `fit(source, config, passes) -> Curvature`, registered in
`STRATEGIES` with the loader of what it saves; none imports another. `passes`
(`passes.FitPasses`) says which examples the fit goes through and runs each of its passes
in fixed chunks: shared by torch.distributed ranks, all-reduced in float64 and, with a
checkpoint folder, saved after every chunk so that an interrupted fit resumes
(`checkpoint.FitProgress`). None: every example, one process's view, no checkpoints.

| strategy   | fitted object         | eigenbasis | what it is                                    |
|------------|-----------------------|------------|-----------------------------------------------|
| `ekfac`    | `EigenbasisCurvature` | yes        | K-FAC eigenbasis, eigenvalues re-estimated    |
| `kfac`     | `EigenbasisCurvature` | yes        | Λ = λ_S λ_Aᵀ from the factors                 |
| `identity` | `EigenbasisCurvature` | yes        | G = I: the gradient dot product baseline      |
| `trak`     | `SketchedCurvature`   | no         | F of randomly sketched gradients (TRAK/D-TRAK)|
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..artifacts import check_provenance, load_artifact
from ..config import CurvatureConfig, stored_curvature_config
from ..layers import LayerInfo
from ..models import eval_mode
from ..source import GradientSource
from . import ekfac, identity, kfac, trak
from .base import (
    ARTIFACT,
    Curvature,
    CurvatureError,
    EigenbasisCurvature,
    LayerCurvature,
    require_eigenbasis,
)
from .kfac import as_kfac
from .memory import KRONECKER_STRATEGIES, check_layer_memory
from .passes import FitPasses, open_passes
from .trak import SketchedCurvature

__all__ = [
    "STRATEGIES",
    "Curvature",
    "CurvatureError",
    "EigenbasisCurvature",
    "LayerCurvature",
    "SketchedCurvature",
    "Strategy",
    "as_kfac",
    "fit_curvature",
    "load_curvature",
    "require_eigenbasis",
]


@dataclass(frozen=True)
class Strategy:
    """How to fit a strategy's curvature, and how to rebuild it from a saved artifact."""

    fit: Callable[[GradientSource, CurvatureConfig, FitPasses | None], Curvature]
    load: Callable[[dict, dict, CurvatureConfig, dict[str, LayerInfo]], Curvature]


STRATEGIES: dict[str, Strategy] = {
    "ekfac": Strategy(ekfac.fit, EigenbasisCurvature.from_artifact),
    "kfac": Strategy(kfac.fit, EigenbasisCurvature.from_artifact),
    "identity": Strategy(identity.fit, EigenbasisCurvature.from_artifact),
    "trak": Strategy(trak.fit, SketchedCurvature.from_artifact),
}


def fit_curvature(
    source: GradientSource,
    config: CurvatureConfig | None = None,
    indices: Sequence[int] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Curvature:
    """Fit `config.strategy` on the source's training set (or `indices`; or the subset
    `config.fraction` / `max_examples` draw from them), model in eval mode.

    Under torch.distributed every rank runs its share of the examples and returns the same
    curvature. With `checkpoint_dir`, rank 0 saves the passes' sums after every chunk of
    `config.chunk_examples` examples in `checkpoint_dir/fit_progress` and resumes from there
    (the progress of another fit there is an `ArtifactMismatchError`); the progress is kept
    afterwards (`passes.finish_fit` writes the curvature and deletes it).

    Returns the strategy's `Curvature` on the model's device. EK-FAC and K-FAC refuse
    first a layer over `config.max_layer_bytes` (`memory.check_layer_memory`).
    """
    config = config or CurvatureConfig()
    if config.strategy in KRONECKER_STRATEGIES:
        check_layer_memory(source.layers, config.max_layer_bytes)
    with eval_mode(source.model), open_passes(source, config, indices, checkpoint_dir) as passes:
        return STRATEGIES[config.strategy].fit(source, config, passes)


def load_curvature(
    directory: str | os.PathLike,
    expected_provenance: dict | None,
    layer_info: dict[str, LayerInfo],
) -> Curvature:
    """Load a curvature saved by `Curvature.save`, with the strategy it was fitted with.

    Raises:
        ArtifactMismatchError: it was fitted for another model, dataset or schedule.
        ArtifactCorruptError / FileNotFoundError: the files are damaged or missing.
    """
    tensors, meta = load_artifact(directory, ARTIFACT)
    if expected_provenance is not None:
        check_provenance("curvature", meta["provenance"], expected_provenance)
    config = stored_curvature_config(meta["config"])
    return STRATEGIES[config.strategy].load(tensors, meta, config, layer_info)
