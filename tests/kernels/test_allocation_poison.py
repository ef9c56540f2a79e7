"""The ``poison_allocations`` fixture (conftest.py): allocations made inside
``fastinf.kernels`` come back poisoned, everyone else's as asked, explicit initial values
survive. If it stopped poisoning, the kernel tests could no longer see unwritten outputs."""

from __future__ import annotations

import pytest
import torch

# Every allocator the fixture wraps, called the way kernel code would; ``like`` is a
# float32 tensor of 3 elements.
ALLOCATIONS = [
    "torch.empty(3)",
    "torch.empty_like(like)",
    "torch.empty_strided((3,), (1,))",
    "torch.full((3,), 2.0)",
    "torch.full_like(like, 2.0)",
    "torch.ones(3)",
    "torch.ones_like(like)",
    "torch.zeros(3)",
    "torch.zeros_like(like)",
    "like.new_empty(3)",
    "like.new_empty_strided((3,), (1,))",
    "like.new_full((3,), 2.0)",
    "like.new_ones(3)",
    "like.new_zeros(3)",
]


def allocate_in(module: str, expression: str):
    """A function defined in module ``module`` that returns ``expression``."""
    namespace = {"__name__": module, "torch": torch}
    exec(f"def allocate(like):\n    return {expression}\n", namespace)
    return namespace["allocate"]


@pytest.mark.parametrize("expression", ALLOCATIONS)
def test_kernel_allocations_are_poisoned(expression):
    allocate = allocate_in("fastinf.kernels.score.triton_impl", expression)
    assert torch.isnan(allocate(torch.ones(3))).all()


@pytest.mark.parametrize("module", ["fastinf.kernels", "fastinf.kernels._probe"])
def test_integer_allocations_are_poisoned_below_every_index(module):
    allocate = allocate_in(module, "torch.full((3,), -1, dtype=torch.int64)")
    assert (allocate(None) == -7).all()


@pytest.mark.parametrize("module", [__name__, "fastinf.kernelsextra", "fastinf.engine"])
@pytest.mark.parametrize("expression", [e for e in ALLOCATIONS if "empty" not in e])
def test_other_callers_get_what_they_asked_for(module, expression):
    value = allocate_in(module, expression)(torch.ones(3))
    assert not torch.isnan(value).any()


def test_explicit_initial_values_survive():
    allocate = allocate_in("fastinf.kernels.topk", "torch.empty(3).fill_(2.0)")
    assert torch.equal(allocate(None), torch.full((3,), 2.0))
