"""Input conventions shared by the ops: shape checks (the public ops validate, backends
assume valid inputs) and the reference compute dtype."""

from __future__ import annotations

import torch

__all__ = ["check_float", "check_shape", "compute_dtype"]


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Raise ValueError unless ``tensor`` has ``len(expected)`` dims matching ``expected``.

    ``None`` entries match any size.
    """
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        want is None or got == want for got, want in zip(shape, expected, strict=False)
    )
    if not ok:
        spec = ", ".join("*" if want is None else str(want) for want in expected)
        raise ValueError(f"{name} must have shape [{spec}], got {list(shape)}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise TypeError unless ``tensor`` is floating point."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any tensor is float64, else float32 (the references' compute dtype)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
