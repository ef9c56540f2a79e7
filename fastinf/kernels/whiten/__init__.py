"""Whiten-and-sketch: eigenbasis coordinates ∘ W^½ → (projected) index vectors."""

from __future__ import annotations

import torch

from .._inputs import check_float, check_shape
from ..dispatch import select

__all__ = ["whiten_sketch"]


def whiten_sketch(
    coords: torch.Tensor,
    inv_sqrt_damped: torch.Tensor,
    sketch: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Whiten eigenbasis coordinates and optionally sketch them (DESIGN.md §1).

    With both sides whitened, ⟨W^½∘Q̂_q, W^½∘Ĝ_n⟩ = ⟨Q̂_q ∘ W, Ĝ_n⟩ is the layer's score, so
    the outputs of train gradients and queries can go into a maximum-inner-product index;
    a shared random ``sketch`` preserves inner products in expectation.

    Args:
        coords: [B, d_out, d_in] eigenbasis coordinates.
        inv_sqrt_damped: [d_out, d_in] W^½ = (Λ + λ)^-½.
        sketch: None, or a dense [d_out·d_in, k] projection; its rows follow the row-major
            (o, i) order of ``coords[b].flatten()``.
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``None``
            (see :mod:`fastinf.kernels.dispatch`).

    Returns:
        [B, d_out·d_in] whitened coordinates when ``sketch`` is None, else [B, k];
        float32 (float64 from the reference when an input is float64).
    """
    check_shape("coords", coords, (None, None, None))
    _, d_out, d_in = coords.shape
    check_shape("inv_sqrt_damped", inv_sqrt_damped, (d_out, d_in))
    check_float("coords", coords)
    check_float("inv_sqrt_damped", inv_sqrt_damped)
    tensors: tuple[torch.Tensor, ...] = (coords, inv_sqrt_damped)
    if sketch is not None:
        check_shape("sketch", sketch, (d_out * d_in, None))
        check_float("sketch", sketch)
        tensors = (*tensors, sketch)
    return select("whiten_sketch", backend, tensors)(coords, inv_sqrt_damped, sketch)
