"""Backend choice: the registry, auto rules, env var and argument overrides, clear errors."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import torch

import fastinf.kernels
from fastinf.kernels import dispatch

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.DOT_PRECISION_ENV_VAR, raising=False)


def implementation(op: str, backend: str):
    module = importlib.import_module(
        f"fastinf.kernels.{dispatch.OPS[op]}.{dispatch.BACKEND_MODULES[backend]}"
    )
    return getattr(module, op)


def test_public_api_is_pinned():
    assert fastinf.kernels.__all__ == [
        "eigval_accumulate",
        "empty_topk",
        "score_params",
        "topk_merge",
        "whiten_sketch",
    ]
    assert set(dispatch.OPS) <= set(fastinf.kernels.__all__)


@pytest.mark.parametrize("backend", list(dispatch.BACKEND_MODULES))
@pytest.mark.parametrize("op", list(dispatch.OPS))
def test_every_backend_implements_every_op_with_the_reference_signature(op, backend):
    if backend == "triton" and not dispatch.triton_available():
        pytest.skip("triton is not installed")
    reference = inspect.signature(implementation(op, "reference"))
    assert inspect.signature(implementation(op, backend)) == reference
    public = inspect.signature(getattr(fastinf.kernels, op))
    assert list(public.parameters) == [*reference.parameters, "backend"]


def test_auto_uses_reference_on_cpu():
    cpu = torch.zeros(2)
    assert dispatch.resolve_backend(None, [cpu]) == "reference"
    assert dispatch.select("score_params", "auto", [cpu]) is implementation(
        "score_params", "reference"
    )


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.usefixtures("needs_triton")
def test_auto_uses_triton_on_cuda_except_float64():
    assert dispatch.resolve_backend(None, [torch.zeros(2, device="cuda")]) == "triton"
    mixed = [torch.zeros(2, device="cuda"), torch.zeros(2, device="cuda", dtype=torch.float64)]
    assert dispatch.resolve_backend(None, mixed) == "reference"
    assert dispatch.resolve_backend(None, [torch.zeros(2, device="cuda"), torch.zeros(2)]) == (
        "reference"
    )


def test_environment_variable_and_argument(monkeypatch):
    cpu = [torch.zeros(2)]
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "reference")
    assert dispatch.resolve_backend(None, cpu) == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "Triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="environment variable FASTINF_KERNEL_BACKEND"):
        dispatch.resolve_backend(None, cpu)
    # the argument wins over the environment
    assert dispatch.resolve_backend("reference", cpu) == "reference"


@pytest.mark.usefixtures("needs_triton")
def test_forced_triton_runs_the_triton_module(monkeypatch):
    cpu = [torch.zeros(2)]
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        cpu = [torch.zeros(2, device="cuda")]
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "triton")
    assert dispatch.select("topk_merge", None, cpu) is implementation("topk_merge", "triton")
    assert dispatch.select("topk_merge", "triton", cpu) is implementation("topk_merge", "triton")


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_unknown_backend_is_a_clear_error(monkeypatch, source):
    cpu = [torch.zeros(2)]
    if source == "environment":
        monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "cuda")
        backend = None
    else:
        backend = "cuda"
    with pytest.raises(ValueError, match=r"unknown kernel backend 'cuda'.*auto, reference, triton"):
        dispatch.resolve_backend(backend, cpu)


def test_unknown_backend_through_a_public_op():
    values, indices = fastinf.kernels.empty_topk(1, 2)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        fastinf.kernels.topk_merge(values, indices, torch.zeros(3, 1), 0, backend="fast")


def test_forced_triton_errors(monkeypatch):
    cpu = [torch.zeros(2)]
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton does not import"):
        dispatch.resolve_backend("triton", cpu)
    assert dispatch.resolve_backend("auto", cpu) == "reference"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        dispatch.resolve_backend("triton", [torch.zeros(2, dtype=torch.float64)])


def test_dot_precision(monkeypatch):
    assert dispatch.dot_precision() == "tf32x3"
    monkeypatch.setenv(dispatch.DOT_PRECISION_ENV_VAR, "TF32")
    assert dispatch.dot_precision() == "tf32"
    monkeypatch.setenv(dispatch.DOT_PRECISION_ENV_VAR, "fp64")
    with pytest.raises(ValueError, match="tf32x3, tf32, ieee"):
        dispatch.dot_precision()


def test_interpreter_flag_set_too_late_is_a_clear_error(monkeypatch):
    class GpuBuiltFunction:
        pass

    class FakeLanguage:
        cdiv = GpuBuiltFunction()

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton.language", FakeLanguage())
    with pytest.raises(RuntimeError, match="set after triton was imported"):
        dispatch.resolve_backend("triton", [torch.zeros(2)])
