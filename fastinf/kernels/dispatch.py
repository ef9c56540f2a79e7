"""The one place that chooses a kernel backend.

Every public op in :mod:`fastinf.kernels` asks :func:`select` for its implementation.
Backends are registered by name in :data:`BACKEND_MODULES`: each op folder holds one module
per backend (``naive.py`` for the PyTorch reference, ``triton_impl.py`` for Triton) with
functions of identical signatures, so tests can parametrise over the registry.

Choice, in order of precedence:

1. the ``backend=`` argument of the op (``None`` means "not given");
2. the environment variable ``FASTINF_KERNEL_BACKEND``;
3. ``"auto"``: Triton when triton imports, every tensor argument is on CUDA and none is
   float64 (the Triton kernels compute in float32; float64 means an exactness check, which
   the reference serves), the reference otherwise.

Forcing ``"triton"`` on CPU tensors works only under the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before triton is imported (triton builds its own @jit
library at import; torch._dynamo, pulled in by diffusers, imports triton early, so in
practice: in the environment). fastinf's Triton modules are imported lazily, on the first
Triton call, so ``import fastinf.kernels`` itself never imports triton.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Literal

import torch

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "BACKEND_MODULES",
    "DOT_PRECISIONS",
    "DOT_PRECISION_ENV_VAR",
    "OPS",
    "dot_precision",
    "resolve_backend",
    "select",
    "triton_available",
    "triton_interpreting",
]

BACKEND_ENV_VAR = "FASTINF_KERNEL_BACKEND"
DOT_PRECISION_ENV_VAR = "FASTINF_DOT_PRECISION"

BackendName = Literal["triton", "reference"]

# Backend name -> module name inside every op folder.
BACKEND_MODULES: dict[str, str] = {"reference": "naive", "triton": "triton_impl"}
BACKENDS: tuple[str, ...] = ("auto", *BACKEND_MODULES)

# Public op -> the folder of fastinf/kernels/ that implements it.
OPS: dict[str, str] = {
    "score_params": "score",
    "eigval_accumulate": "eigval",
    "whiten_sketch": "whiten",
    "topk_merge": "topk",
}

# `tl.dot` input precision for float32 operands on GPUs with tensor cores. "tf32x3" keeps
# float32 accuracy (three tf32 products) at about a third of tf32 speed; "tf32" is faster
# and loses ~3 decimal digits per product; "ieee" avoids tensor cores. The interpreter
# ignores it and computes exact float32.
DOT_PRECISIONS: tuple[str, ...] = ("tf32x3", "tf32", "ieee")

_TRUE_WORDS = frozenset({"1", "true", "on", "yes"})


def dot_precision() -> str:
    """Return the `tl.dot` input precision the Triton kernels use.

    Read from ``FASTINF_DOT_PRECISION`` (default ``"tf32x3"``) at every launch.

    Raises:
        ValueError: the variable names an unknown precision.
    """
    value = os.environ.get(DOT_PRECISION_ENV_VAR, "tf32x3").strip().lower()
    if value not in DOT_PRECISIONS:
        raise ValueError(
            f"{DOT_PRECISION_ENV_VAR}={value!r} is not a tl.dot precision; "
            f"choose one of {', '.join(DOT_PRECISIONS)}"
        )
    return value


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds in this process (cached)."""
    try:
        importlib.import_module("triton")
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_WORDS


def _triton_library_interpreted() -> bool:
    """Whether triton's own @jit library (tl.cdiv, tl.sort, ...) was built for the
    interpreter: triton reads TRITON_INTERPRET once, when triton.language is imported."""
    language = sys.modules.get("triton.language")
    return language is None or type(language.cdiv).__name__ == "InterpretedFunction"


def _requested(backend: str | None) -> tuple[str, str]:
    """Return ``(name, origin)`` of the requested backend, validated."""
    if backend is not None:
        name, origin = backend, "backend= argument"
    else:
        name = os.environ.get(BACKEND_ENV_VAR, "auto")
        origin = f"environment variable {BACKEND_ENV_VAR}"
    normalised = name.strip().lower() if isinstance(name, str) else name
    if normalised not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r} (from the {origin}); "
            f"choose one of {', '.join(BACKENDS)}"
        )
    return normalised, origin


def resolve_backend(backend: str | None, tensors: Sequence[torch.Tensor]) -> BackendName:
    """Decide which backend runs an op on ``tensors``.

    Args:
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` (use the environment
            variable ``FASTINF_KERNEL_BACKEND``, default ``"auto"``).
        tensors: the op's floating-point tensor inputs (outputs that are only written,
            such as the float64 accumulator of ``eigval_accumulate``, are left out).

    Returns:
        ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` was forced but triton does not import, or the tensors are
            on CPU without the Triton interpreter.
        TypeError: ``"triton"`` was forced with a float64 input.
    """
    name, origin = _requested(backend)
    if name == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    has_float64 = any(t.dtype == torch.float64 for t in tensors)
    if name == "auto":
        return "triton" if on_cuda and not has_float64 and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError(
            f"kernel backend 'triton' requested by the {origin}, but triton does not import; "
            "install it (pip install 'fastinf[triton]') or use backend='reference'"
        )
    if has_float64:
        raise TypeError(
            f"kernel backend 'triton' requested by the {origin} with float64 inputs; the "
            "Triton kernels compute in float32: cast the inputs, or use backend='reference'"
        )
    if not on_cuda and not triton_interpreting():
        raise RuntimeError(
            f"kernel backend 'triton' requested by the {origin} for CPU tensors; Triton needs "
            "CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run the "
            "kernels (slowly) on CPU"
        )
    if not on_cuda and not _triton_library_interpreted():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported (possibly indirectly, e.g. "
            "by torch._dynamo), so triton's library was built for GPUs; set it in the "
            "environment before Python starts"
        )
    return "triton"


def select(op: str, backend: str | None, tensors: Sequence[torch.Tensor]) -> Callable:
    """Return the implementation of public op ``op`` for ``tensors``.

    Args:
        op: a key of :data:`OPS`, e.g. ``"score_params"``.
        backend: as for :func:`resolve_backend`.
        tensors: as for :func:`resolve_backend`.

    Returns:
        The function of the chosen backend, with the op's signature minus ``backend``.
    """
    chosen = resolve_backend(backend, tensors)
    module = importlib.import_module(f"{__package__}.{OPS[op]}.{BACKEND_MODULES[chosen]}")
    return getattr(module, op)
