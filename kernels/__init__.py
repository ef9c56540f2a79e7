"""Triton kernels for fastinf's hot loops, each beside its PyTorch reference.

Every op lives in a folder (``score/``, ``eigval/``, ``whiten/``, ``topk/``) with
``naive.py`` (the reference, used on CPU and as the oracle), ``triton_impl.py`` (Triton
kernels and a launcher with the reference's signature) and ``__init__.py`` (the public op:
validates inputs, then asks :mod:`fastinf.kernels.dispatch` for a backend). The folders are
not named after the ops so that ``fastinf.kernels.<op>`` is always the function.
"""

from .eigval import eigval_accumulate
from .score import project_score, project_score_dense, score_params
from .topk import empty_topk, topk_merge
from .whiten import whiten_sketch

__all__ = [
    "eigval_accumulate",
    "empty_topk",
    "project_score",
    "project_score_dense",
    "score_params",
    "topk_merge",
    "whiten_sketch",
]
