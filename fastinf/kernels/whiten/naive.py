"""PyTorch reference for whiten-and-sketch (DESIGN.md §1, last identity).

out = (coords ∘ W^½).flatten(1) [@ sketch]; computes in float32, or float64 when an input
is float64.
"""

from __future__ import annotations

import torch

from .._inputs import compute_dtype

__all__ = ["whiten_sketch"]


def whiten_sketch(
    coords: torch.Tensor, inv_sqrt_damped: torch.Tensor, sketch: torch.Tensor | None
) -> torch.Tensor:
    """Whiten eigenbasis coordinates and optionally project them to k dimensions.

    Args:
        coords: [B, d_out, d_in] eigenbasis coordinates Q_Sᵀ G Q_A (or Q̂ of queries).
        inv_sqrt_damped: [d_out, d_in] W^½ = (Λ + λ)^-½.
        sketch: None, or a [d_out·d_in, k] projection matrix (rows in row-major (o, i) order).

    Returns:
        [B, d_out·d_in] whitened coordinates if ``sketch`` is None, else [B, k].
    """
    tensors = (coords, inv_sqrt_damped) if sketch is None else (coords, inv_sqrt_damped, sketch)
    dtype = compute_dtype(*tensors)
    whitened = (coords.to(dtype) * inv_sqrt_damped.to(dtype)).flatten(1)
    return whitened if sketch is None else whitened @ sketch.to(dtype)
