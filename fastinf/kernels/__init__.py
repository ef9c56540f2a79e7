"""Triton kernels for fastinf's hot loops, each beside its PyTorch reference.

Every op lives in a folder (``score/``, ``eigval/``, ``whiten/``, ``topk/``) with
``naive.py`` (the reference, used on CPU and as the oracle), ``triton_impl.py`` (Triton
kernels and a launcher with the reference's signature) and ``__init__.py`` (the public op:
validates inputs, then asks :mod:`fastinf.kernels.dispatch` for a backend). The folders are
not named after the ops so that ``fastinf.kernels.<op>`` is always the function.

Allocation and initial value are separate steps in this package: buffers come from
``torch.empty``, and a value a kernel relies on before writing (the zeros of an empty sum,
the ∓inf of an empty top-k) is written by an explicit in-place step (``zero_``,
``fill_``). The kernel tests poison every allocation made here, so an output element that
no kernel writes shows up as NaN (or -7 for integers) instead of a plausible zero.
"""

from .eigval import eigval_accumulate
from .score import score_params
from .topk import empty_topk, topk_merge
from .whiten import whiten_sketch

__all__ = [
    "eigval_accumulate",
    "empty_topk",
    "score_params",
    "topk_merge",
    "whiten_sketch",
]
