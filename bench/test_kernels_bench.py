"""Every kernel against its reference, side by side in one process (``pytest bench/``).

On CUDA: CIFAR-size DDPM UNet layer shapes (conv 3x3 layers unfold to d_in = 9·C_in up to
4608, d_out up to 512, 16²–32² positions, up to 1024 queries), Triton and reference.
A Triton timing is taken only after its output matched the reference on the same inputs;
a mismatch fails the case and no speed-up is reported. On CPU only the reference runs, at
small shapes (the Triton interpreter is a correctness tool, not a speed measurement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastinf.kernels as kernels
from fastinf.kernels.dispatch import dot_precision, triton_available

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Error allowed between Triton and the float32 reference, relative to max|reference|.
_REL_TOL = {"tf32x3": 1e-4, "ieee": 1e-4, "tf32": 1e-2}


@dataclass(frozen=True)
class Case:
    """One benchmark: ``make()`` builds inputs on DEVICE; ``run(inputs, backend)`` calls
    the public op and returns what the correctness check compares."""

    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], dict]
    run: Callable[[dict, str], object]


def _normal(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _orthogonal(size: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, device=DEVICE))[0]


def _params_case(b: int, m: int, d_in: int, d_out: int, q: int, dtype=torch.float32) -> Case:
    def make() -> dict:
        return {
            "act": _normal(b, m, d_in, dtype=dtype),
            "grad": _normal(b, m, d_out, dtype=dtype),
            "queries": _normal(q, d_out, d_in, dtype=dtype),
        }

    shape = f"B={b} M={m} d_in={d_in} d_out={d_out} Q={q}"
    return Case(
        "score_params", shape, dtype, make, lambda x, be: kernels.score_params(**x, backend=be)
    )


def _eigval_case(d: int, r: int, d_in: int, d_out: int) -> Case:
    def make() -> dict:
        return {
            "act": _normal(d, r, d_in),
            "grad": _normal(d, r, d_out),
            "eigvecs_act": _orthogonal(d_in),
            "eigvecs_grad": _orthogonal(d_out),
        }

    def run(x: dict, backend: str) -> torch.Tensor:
        out = torch.zeros(x["grad"].shape[2], x["act"].shape[2], device=DEVICE)
        return kernels.eigval_accumulate(**x, out=out, backend=backend)

    shape = f"D={d} R={r} d_in={d_in} d_out={d_out}"
    return Case("eigval_accumulate", shape, torch.float32, make, run)


def _whiten_case(b: int, d_out: int, d_in: int, k: int | None, dtype=torch.float32) -> Case:
    def make() -> dict:
        return {
            "coords": _normal(b, d_out, d_in, dtype=dtype),
            "inv_sqrt_damped": torch.rand(d_out, d_in, device=DEVICE) + 0.1,
            "sketch": None if k is None else _normal(d_out * d_in, k, dtype=dtype),
        }

    shape = f"B={b} d_out={d_out} d_in={d_in} k={k or 'none'}"
    return Case(
        "whiten_sketch", shape, dtype, make, lambda x, be: kernels.whiten_sketch(**x, backend=be)
    )


def _topk_case(q: int, k: int, b: int) -> Case:
    def make() -> dict:
        values, indices = kernels.empty_topk(q, k, device=DEVICE)
        values, indices = kernels.topk_merge(values, indices, _normal(b, q), 0, backend="reference")
        return {"run_values": values, "run_indices": indices, "block_scores": _normal(b, q)}

    def run(x: dict, backend: str):
        return kernels.topk_merge(**x, block_offset=b, backend=backend)

    return Case("topk_merge", f"Q={q} k={k} B={b}", torch.float32, make, run)


if ON_GPU:
    CASES = [
        _params_case(32, 1024, 1152, 128, 256),  # conv 128→128 at 32²
        _params_case(16, 256, 4608, 512, 128),  # conv 512→512 at 16²
        _params_case(256, 8, 512, 512, 1024),  # time-embedding linear, 8 draws
        _params_case(64, 256, 2304, 256, 256, dtype=torch.float16),
        _eigval_case(64, 1024, 1152, 128),
        _eigval_case(32, 256, 4608, 512),
        _whiten_case(256, 256, 2304, 1024),
        _whiten_case(256, 256, 2304, 1024, dtype=torch.float16),
        _whiten_case(256, 256, 2304, None),
        _topk_case(1024, 100, 4096),
        _topk_case(1024, 1000, 4096),
    ]
else:
    CASES = [
        _params_case(8, 16, 288, 32, 16),
        _eigval_case(8, 64, 288, 32),
        _whiten_case(32, 32, 288, 64),
        _topk_case(16, 10, 512),
    ]


def _max_error(got: object, expected: object) -> tuple[float, float]:
    """(max |got - expected|, max |expected|) over the tensors of an output."""
    pairs = zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]
    error, scale = 0.0, 0.0
    for a, b in pairs:
        if a.is_floating_point():
            error = max(error, (a.float() - b.float()).abs().max().item())
            scale = max(scale, b.float().abs().max().item())
        elif not torch.equal(a, b):
            return float("inf"), 0.0
    return error, scale


def _synchronised(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        fn()
        if ON_GPU:
            torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape}|{c.dtype}]")
def test_kernel_speed(benchmark, bench_log, case: Case, backend: str) -> None:
    if backend == "triton" and not ON_GPU:
        pytest.skip("no CUDA: the Triton interpreter is not a speed measurement")
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    inputs = case.make()
    verified = False
    if backend == "triton":
        error, scale = _max_error(case.run(inputs, "triton"), case.run(inputs, "reference"))
        tolerance = _REL_TOL[dot_precision()] * max(scale, 1e-30)
        if not error <= tolerance:
            pytest.fail(
                f"{case.op} [{case.shape}]: Triton differs from the reference by {error:.3g} "
                f"(allowed {tolerance:.3g}); refusing to report a speed-up"
            )
        verified = True
    call = _synchronised(lambda: case.run(inputs, backend))
    benchmark.group = f"{case.op} {case.shape} {case.dtype}"
    benchmark.pedantic(call, rounds=10 if ON_GPU else 5, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    bench_log.record(
        op=case.op,
        backend=backend,
        shape=case.shape,
        dtype=case.dtype,
        stats=benchmark.stats.stats,
        dot_precision=dot_precision(),
        verified=verified,
    )
