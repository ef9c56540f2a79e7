"""Configuration as small frozen dataclasses, validated on construction and saved as JSON.

Fields that change a result are part of an artifact's fingerprint; fields that only change
speed or memory (batch and block sizes) are not, so artifacts stay reusable across machines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DIGITS_STEPS",
    "STRATEGY_NAMES",
    "CurvatureConfig",
    "ScoreConfig",
    "config_from_dict",
    "stored_curvature_config",
]

DIGITS_STEPS = 5000
"""Optimiser steps of the shipped digits weights (their sidecar records them)."""

STRATEGY_NAMES = ("ekfac", "kfac", "identity", "trak")
"""The curvature strategies (`fastinf.curvature.STRATEGIES` implements each)."""


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {choices}; pick one of those.")


def _check_positive(owner: str, name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} must be a positive integer.")


@dataclass(frozen=True)
class CurvatureConfig:
    """How the (E)K-FAC approximation of the GGN is fitted (DESIGN §1, §2 step 1)."""

    strategy: str = field(
        default="ekfac",
        metadata={
            "help": "'ekfac' or 'kfac'; baselines: 'identity' (gradient dot product), 'trak' "
            "(GGN^loss of randomly projected per-example gradients, TRAK / D-TRAK)"
        },
    )
    ggn: str = field(
        default="model",
        metadata={
            "help": "'model': GGN of the network under the per-pixel-mean squared error; "
            "'loss': empirical Fisher (back-propagate the real loss gradient)"
        },
    )
    mc: str = field(
        default="sample",
        metadata={
            "help": "GGN^model only: 'sample' back-propagates √(2/P)·η, η~N(0,I) per draw; "
            "'exact' back-propagates every output direction (tiny models only)"
        },
    )
    kfac_approx: str = field(default="expand", metadata={"help": "'expand' or 'reduce'"})
    factor_draws: int = field(
        default=4, metadata={"help": "draws per training example for the K-FAC factors"}
    )
    eigval_draws: int = field(
        default=4, metadata={"help": "fresh draws per example for the EK-FAC eigenvalues"}
    )
    projection_dim: int = field(
        default=4096,
        metadata={"help": "'trak': dimension of the random projection of the gradients"},
    )
    objective: str = field(
        default="loss",
        metadata={
            "help": "'trak': the per-example gradient projected and whose Fisher is fitted: "
            "'loss' (TRAK) or 'square_norm' (D-TRAK); `factor_draws` draws per example"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the fitting draws and of the sampled examples"}
    )
    fraction: float | None = field(
        default=None,
        metadata={
            "help": "fit on this fraction (0 < f <= 1) of the training examples: a subset "
            "drawn from `seed`, the same on any number of ranks, nested across fractions "
            "(None: every example)"
        },
    )
    max_examples: int | None = field(
        default=10_000,
        metadata={
            "help": "fit on at most this many training examples, drawn like `fraction` "
            "(None: no limit); with both, the smaller subset. The curvature is an average "
            "over examples: on digits, fitting 250 of 1,000 cost 0.004 LDS and 100 cost "
            "0.009 (bench/results/lds_fit_fraction.md), so 10,000 bounds the fit's cost at "
            "any N with a wide margin"
        },
    )
    batch_size: int = field(
        default=256, metadata={"help": "draws per forward/backward pass (speed only)"}
    )
    chunk_examples: int = field(
        default=4096,
        metadata={
            "help": "examples per chunk of a fitting pass: ranks sum their chunk's results "
            "and a checkpointed fit saves its progress after each chunk (speed and resume "
            "granularity only)"
        },
    )
    max_layer_bytes: int | None = field(
        default=1 << 30,
        metadata={
            "help": "EK-FAC/K-FAC: refuse, before any pass, a layer whose float64 state "
            "(factors, eigenbases, eigenvalues) exceeds this many bytes (None: no limit)"
        },
    )

    def __post_init__(self) -> None:
        owner = "CurvatureConfig"
        _check_choice(owner, "strategy", self.strategy, STRATEGY_NAMES)
        _check_choice(owner, "objective", self.objective, ("loss", "square_norm"))
        _check_positive(owner, "projection_dim", self.projection_dim)
        _check_choice(owner, "ggn", self.ggn, ("model", "loss"))
        _check_choice(owner, "mc", self.mc, ("sample", "exact"))
        _check_choice(owner, "kfac_approx", self.kfac_approx, ("expand", "reduce"))
        _check_positive(owner, "factor_draws", self.factor_draws)
        _check_positive(owner, "eigval_draws", self.eigval_draws)
        _check_positive(owner, "batch_size", self.batch_size)
        if self.fraction is not None and not (
            isinstance(self.fraction, (int, float))
            and not isinstance(self.fraction, bool)
            and 0.0 < self.fraction <= 1.0
        ):
            raise ValueError(
                f"{owner}.fraction={self.fraction!r} must be in (0, 1], or None for every example."
            )
        if self.max_examples is not None:
            _check_positive(owner, "max_examples", self.max_examples)
        _check_positive(owner, "chunk_examples", self.chunk_examples)
        if self.max_layer_bytes is not None:
            _check_positive(owner, "max_layer_bytes", self.max_layer_bytes)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change the fitted curvature (the subset fields only when set, so
        that a fit of every example keeps the fingerprint it had before they existed;
        `stored_curvature_config` reads such a record back with them None)."""
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in _SPEED_FIELDS and not (k in _SUBSET_FIELDS and v is None)
        }


_SPEED_FIELDS = ("batch_size", "chunk_examples", "max_layer_bytes")
_SUBSET_FIELDS = ("fraction", "max_examples")


def stored_curvature_config(fields: dict) -> CurvatureConfig:
    """The `CurvatureConfig` a saved fingerprint describes: a subset field it does not name
    was None (every example), whatever the field's default is now."""
    return config_from_dict(CurvatureConfig, dict.fromkeys(_SUBSET_FIELDS) | fields)


@dataclass(frozen=True)
class ScoreConfig:
    """How gradients are estimated, damped and scored (DESIGN §1 Score, §2 steps 2–3)."""

    train_draws: int = field(default=32, metadata={"help": "K: draws per train gradient"})
    query_draws: int = field(default=128, metadata={"help": "K_q: draws per query gradient"})
    measurement: str = field(
        default="loss",
        metadata={"help": "query measurement: loss, timestep_loss, elbo_simplified, square_norm"},
    )
    t_min: int | None = field(default=None, metadata={"help": "timestep_loss: lowest t"})
    t_max: int | None = field(default=None, metadata={"help": "timestep_loss: highest t"})
    train_objective: str = field(
        default="loss", metadata={"help": "'loss' or 'square_norm' (D-TRAK)"}
    )
    damping: float = field(
        default=1e-4,
        metadata={"help": "λ in W = 1/(Λ + λ); the default is chosen by LDS (README)"},
    )
    damping_mode: str = field(
        default="relative",
        metadata={"help": "'absolute': λ as given; 'relative': λ = damping · mean(Λ) per block"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the gradient draws"})
    block_size: int = field(
        default=64, metadata={"help": "training examples per scoring block (speed/memory only)"}
    )
    query_batch_size: int = field(
        default=16, metadata={"help": "queries preconditioned together (speed/memory only)"}
    )
    batch_size: int = field(
        default=512, metadata={"help": "draws per forward/backward pass (speed/memory only)"}
    )

    def __post_init__(self) -> None:
        owner = "ScoreConfig"
        _check_positive(owner, "train_draws", self.train_draws)
        _check_positive(owner, "query_draws", self.query_draws)
        _check_positive(owner, "block_size", self.block_size)
        _check_positive(owner, "query_batch_size", self.query_batch_size)
        _check_positive(owner, "batch_size", self.batch_size)
        _check_choice(owner, "train_objective", self.train_objective, ("loss", "square_norm"))
        _check_choice(owner, "damping_mode", self.damping_mode, ("absolute", "relative"))
        if not (0.0 <= self.damping < math.inf):
            raise ValueError(f"ScoreConfig.damping={self.damping!r} must be finite and >= 0.")

    def query_fingerprint(self) -> dict[str, Any]:
        """The fields that change a cached preconditioned query."""
        keys = ("query_draws", "measurement", "t_min", "t_max", "damping", "damping_mode", "seed")
        return {k: getattr(self, k) for k in keys}


def config_from_dict(cls, values: dict[str, Any]):
    """Rebuild a config dataclass from JSON, naming unknown keys instead of ignoring them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{cls.__name__} does not know {unknown}; the artifact was written by another "
            "version of fastinf — refit it with this version."
        )
    return cls(**values)
