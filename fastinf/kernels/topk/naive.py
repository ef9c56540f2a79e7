"""PyTorch reference for the streaming top-k merge (DESIGN.md §2, step 3a).

Order: by value (descending for ``largest``, ascending otherwise), ties by smaller example
index, empty slots (index -1) after every example of equal value. NaN counts as larger
than +inf, as in ``torch.sort``.
"""

from __future__ import annotations

import torch

__all__ = ["topk_merge"]


def topk_merge(
    run_values: torch.Tensor,
    run_indices: torch.Tensor,
    block_scores: torch.Tensor,
    block_offset: int,
    *,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k per query with a block of new scores.

    Args:
        run_values: [Q, k] current best values per query (∓inf in empty slots).
        run_indices: [Q, k] int64 example indices of ``run_values`` (-1 in empty slots).
        block_scores: [B, Q] scores of examples block_offset … block_offset + B - 1.
        block_offset: global index of the block's first example.
        largest: keep the k largest (True) or the k smallest (False).

    Returns:
        ``(values, indices)``, both [Q, k], sorted best first; values in run_values' dtype.
    """
    n_q, k = run_values.shape
    n_b = block_scores.shape[0]
    new_indices = torch.arange(
        block_offset, block_offset + n_b, dtype=torch.int64, device=run_indices.device
    )
    values = torch.cat([run_values, block_scores.T.to(run_values.dtype)], dim=1)
    indices = torch.cat([run_indices, new_indices.expand(n_q, n_b)], dim=1)
    # Stable sorts: first by index (empty slots last), then by value.
    tie_order = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    order = torch.argsort(tie_order, dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.argsort(values, dim=1, descending=largest, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)
