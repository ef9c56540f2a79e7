"""Kernel tests: Triton vs reference on CUDA when present, else under the interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` on machines without CUDA before anything
imports triton (the interpreter must be chosen before triton builds its own library).
"""

from __future__ import annotations

import functools
import sys
import zlib

import pytest
import torch

import fastinf.kernels
from fastinf.kernels.dispatch import dot_precision, triton_available

ON_GPU = torch.cuda.is_available()

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Relative (to the largest reference magnitude) error allowed between Triton and the
# float32 reference. The interpreter computes exact float32; on GPU "tf32x3" is close to
# float32 and "tf32" keeps ~10 mantissa bits per product.
_TRITON_REL_TOL = {"interpreter": 2e-5, "ieee": 2e-5, "tf32x3": 5e-5, "tf32": 5e-3}


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| ≤ rel · max|expected| elementwise (sums with cancellation make
    per-element relative tolerances meaningless); NaN anywhere in ``actual`` fails."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "output has NaN (an element was never written?)"
    expected = expected.to(device=actual.device, dtype=actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * max(scale, 1e-30))


class Inputs:
    """Seeded random inputs built on the CPU in float64, then cast and moved to DEVICE,
    so a case draws the same numbers on every machine."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = torch.randn(*shape, generator=self.generator, dtype=torch.float64)
        return values.to(dtype=dtype, device=DEVICE)

    def uniform(self, *shape: int, low: float, high: float, dtype=torch.float32):
        values = torch.rand(*shape, generator=self.generator, dtype=torch.float64)
        return (low + (high - low) * values).to(dtype=dtype, device=DEVICE)

    def orthogonal(self, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A [size, size] orthogonal matrix, as eigenvectors are."""
        matrix = torch.randn(size, size, generator=self.generator, dtype=torch.float64)
        return torch.linalg.qr(matrix)[0].to(dtype=dtype, device=DEVICE)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def inputs(request: pytest.FixtureRequest) -> Inputs:
    """Random inputs seeded from the test id (fresh per case, reproducible per case)."""
    return Inputs(seed=zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def assert_close_scaled():
    """``check(actual, expected, rel)``: see :func:`_assert_close_scaled`."""
    return _assert_close_scaled


@pytest.fixture
def triton_tol() -> float:
    """Tolerance for Triton vs the float32 reference on this machine and precision."""
    return _TRITON_REL_TOL["interpreter" if not ON_GPU else dot_precision()]


@pytest.fixture
def needs_triton() -> None:
    """Skip when triton does not import."""
    if not triton_available():
        pytest.skip("triton is not installed")


# Every torch function and Tensor method that allocates a tensor: a kernel's output comes
# from one of these (or from an op that computes every element, like a matmul or a sum).
TORCH_ALLOCATORS = (
    "empty",
    "empty_like",
    "empty_strided",
    "full",
    "full_like",
    "ones",
    "ones_like",
    "zeros",
    "zeros_like",
)
TENSOR_ALLOCATORS = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_zeros")
_KERNELS = fastinf.kernels.__name__


def poison(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place with a value no kernel writes: NaN for floating point, -7
    (below every index, -1 included) for signed integers, the maximum for unsigned ones,
    True for bool."""
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    return tensor.fill_(-7 if tensor.dtype.is_signed else torch.iinfo(tensor.dtype).max)


def _poisoning(allocate):
    """Wrap an allocator so that calls made directly from code of ``fastinf.kernels``
    return poisoned tensors; every other caller (tests, oracles, torch, triton) gets what
    it asked for."""

    @functools.wraps(allocate)
    def allocate_poisoned(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == _KERNELS or caller.startswith(_KERNELS + "."):
            poison(tensor)
        return tensor

    return allocate_poisoned


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every allocation inside ``fastinf.kernels`` (``torch.empty``, ``torch.zeros``,
    ``torch.full``, their ``_like`` forms, ``Tensor.new_*``) return poisoned memory.

    A kernel, reference or launcher that leaves an element of its output unwritten then
    returns NaN (or -7) there, which every comparison rejects, instead of a zero that can
    pass for a correct empty sum. Initial values a kernel needs are written explicitly
    after allocation (``zero_``, ``fill_``; see :mod:`fastinf.kernels`), so they survive.
    Applies to every test in this folder, reference and Triton paths alike.
    """
    for name in TORCH_ALLOCATORS:
        monkeypatch.setattr(torch, name, _poisoning(getattr(torch, name)))
    for name in TENSOR_ALLOCATORS:
        monkeypatch.setattr(torch.Tensor, name, _poisoning(getattr(torch.Tensor, name)))
