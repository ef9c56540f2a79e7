"""Streaming top-k: merge a running top-k per query with a new block of scores."""

from __future__ import annotations

import torch

from .._inputs import check_float, check_shape
from ..dispatch import select

__all__ = ["empty_topk", "topk_merge"]


def empty_topk(
    n_queries: int,
    k: int,
    *,
    largest: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k state before any block: values ∓inf, indices -1, both [n_queries, k]."""
    values = torch.empty(n_queries, k, dtype=dtype, device=device)
    values.fill_(float("-inf") if largest else float("inf"))
    indices = torch.empty(n_queries, k, dtype=torch.int64, device=device)
    indices.fill_(-1)
    return values, indices


def topk_merge(
    run_values: torch.Tensor,
    run_indices: torch.Tensor,
    block_scores: torch.Tensor,
    block_offset: int,
    *,
    largest: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k per query with a block of scores (DESIGN.md §2, step 3a).

    Row b of ``block_scores`` belongs to global example ``block_offset + b``. Order: by
    value (descending when ``largest``, ascending otherwise), ties by the smaller example
    index, empty slots (index -1) after every example; NaN counts as larger than +inf, as
    in ``torch.sort``; -0.0 ties with +0.0 (the Triton backend returns it as +0.0). With
    ``largest=True`` on influence scores the result lists proponents; with
    ``largest=False``, opponents. Fewer than k examples seen so far leaves the last slots
    empty (value ∓inf, index -1).

    Args:
        run_values: [Q, k] running values (start from :func:`empty_topk`).
        run_indices: [Q, k] int64 running example indices.
        block_scores: [B, Q] scores of the new block.
        block_offset: global index of the block's first example (≥ 0; the Triton backend
            packs indices in 32 bits, so indices must stay ≤ 2³²-2).
        largest: keep the k largest (True) or the k smallest (False).
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``None``
            (see :mod:`fastinf.kernels.dispatch`).

    Returns:
        ``(values, indices)``, new [Q, k] tensors sorted best first; values in
        run_values' dtype.
    """
    check_shape("run_values", run_values, (None, None))
    n_q, k = run_values.shape
    check_shape("run_indices", run_indices, (n_q, k))
    check_shape("block_scores", block_scores, (None, n_q))
    check_float("run_values", run_values)
    check_float("block_scores", block_scores)
    if run_indices.dtype != torch.int64:
        raise TypeError(f"run_indices must be int64, got {run_indices.dtype}")
    if block_offset < 0:
        raise ValueError(f"block_offset must be ≥ 0, got {block_offset}")
    impl = select("topk_merge", backend, (run_values, block_scores))
    return impl(run_values, run_indices, block_scores, int(block_offset), largest=largest)
