"""Triton streaming top-k merge: one program per query, sorting packed 64-bit keys.

Plan:

* Every candidate (value, example index) becomes one int64 key whose signed order is the
  wanted order: high 32 bits = the float32 value mapped to an order-preserving int32
  (negative floats get their magnitude bits flipped; -0.0 is first folded into +0.0; NaN
  maps to the top, like ``torch.sort``; bitwise-not reverses the order for smallest-k),
  low 32 bits = 2³²-1-index, so a smaller index wins a tie and an empty slot (index -1)
  loses to every example. Hence example indices must lie in [0, 2³²-2].
* ``_topk_merge_kernel``: the program keeps its query's running top-k as K_PAD keys in
  registers (K_PAD = next power of two ≥ k; lanes ≥ k hold the smallest int64). It
  walks the block in chunks of (ROWS-1)·K_PAD scores: a [ROWS, K_PAD] tile holds the
  running keys in row 0 and the chunk in the other rows, is sorted descending with
  ``tl.sort`` (bitonic, power-of-two length), and row 0 of the result is the new running
  top-k. Decoding the first k keys gives values and indices.
* Values go through float32: fp16/bf16 running values are exact in it; float64 is refused
  by the dispatcher. Block scores are first rounded to the running values' dtype (by
  torch, before the launch), as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv

__all__ = ["MAX_INDEX", "topk_merge"]

MAX_INDEX = 2**32 - 2
# A merge step sorts ROWS·K_PAD keys; aim for about this many when k is small. The
# interpreter's bitonic sort costs ~2 ms per key, so it gets short sorts.
_SORT_TARGET = {"cuda": 512, "cpu": 32}
_LOW_MASK = tl.constexpr(2**32 - 1)
_KEY_FLOOR = tl.constexpr(-(2**63))  # below every encoded candidate


@triton.jit
def _encode(b_v, b_idx, b_low_mask, LARGEST: tl.constexpr):
    """Pack float32 values and int64 indices into order-preserving int64 keys."""
    b_v = tl.where(b_v == 0.0, 0.0, b_v)
    b_bits = b_v.to(tl.int32, bitcast=True)
    b_key = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)
    b_key = tl.where(b_v != b_v, 0x7FFFFFFF, b_key)
    if not LARGEST:
        b_key = ~b_key
    b_low = tl.where(b_idx < 0, 0, b_low_mask - b_idx)
    return (b_key.to(tl.int64) << 32) | b_low


@triton.jit
def _topk_merge_kernel(
    run_v_ptr,
    run_i_ptr,
    scores_ptr,
    out_v_ptr,
    out_i_ptr,
    n_k,
    n_b,
    n_chunks,
    block_offset,
    s_rvq,
    s_rvk,
    s_riq,
    s_rik,
    s_sb,
    s_sq,
    s_ovq,
    s_oiq,
    LARGEST: tl.constexpr,
    K_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    i_q = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < n_k
    b_low_mask = tl.full([K_PAD], _LOW_MASK, tl.int64)
    b_floor = tl.full([K_PAD], _KEY_FLOOR, tl.int64)

    b_v = tl.load(run_v_ptr + i_q * s_rvq + o_k * s_rvk, mask=m_k, other=0.0)
    b_i = tl.load(run_i_ptr + i_q * s_riq + o_k * s_rik, mask=m_k, other=-1)
    # [K_PAD] running keys, best first after the first merge
    b_run = tl.where(m_k, _encode(b_v.to(tl.float32), b_i, b_low_mask, LARGEST), b_floor)

    o_row = tl.arange(0, ROWS)[:, None]
    o_col = tl.arange(0, K_PAD)[None, :]
    b_low_mask2 = tl.full([ROWS, K_PAD], _LOW_MASK, tl.int64)
    b_floor2 = tl.full([ROWS, K_PAD], _KEY_FLOOR, tl.int64)
    chunk = (ROWS - 1) * K_PAD
    for i_c in range(0, n_chunks):
        # [ROWS, K_PAD] block positions; row 0 is reserved for the running keys
        o_b = i_c * chunk + (o_row - 1) * K_PAD + o_col
        m_b = (o_row >= 1) & (o_b < n_b)
        b_s = tl.load(scores_ptr + o_b.to(tl.int64) * s_sb + i_q * s_sq, mask=m_b, other=0.0)
        b_s = b_s.to(tl.float32)
        b_new = _encode(b_s, block_offset + o_b.to(tl.int64), b_low_mask2, LARGEST)
        b_tile = tl.where(o_row == 0, b_run[None, :], tl.where(m_b, b_new, b_floor2))
        b_sorted = tl.reshape(
            tl.sort(tl.reshape(b_tile, [ROWS * K_PAD]), descending=True), [ROWS, K_PAD]
        )
        b_run = tl.max(tl.where(o_row == 0, b_sorted, b_floor2), axis=0)

    # decode: high word → value, low word → index
    b_key = (b_run >> 32).to(tl.int32)
    if not LARGEST:
        b_key = ~b_key
    b_bits = tl.where(b_key < 0, b_key ^ 0x7FFFFFFF, b_key)
    b_low = b_run & b_low_mask
    b_idx = tl.where(b_low == 0, -1, b_low_mask - b_low)
    tl.store(out_v_ptr + i_q * s_ovq + o_k, b_bits.to(tl.float32, bitcast=True), mask=m_k)
    tl.store(out_i_ptr + i_q * s_oiq + o_k, b_idx, mask=m_k)


def topk_merge(
    run_values: torch.Tensor,
    run_indices: torch.Tensor,
    block_scores: torch.Tensor,
    block_offset: int,
    *,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`fastinf.kernels.topk.naive.topk_merge`.

    Raises:
        ValueError: an index of the block would exceed :data:`MAX_INDEX`.
    """
    n_q, k = run_values.shape
    n_b = block_scores.shape[0]
    if block_offset + n_b - 1 > MAX_INDEX:
        raise ValueError(
            f"the Triton top-k packs example indices in 32 bits; block_offset={block_offset} "
            f"with {n_b} scores passes {MAX_INDEX}: use backend='reference'"
        )
    # Round scores to the running dtype here: torch rounds to nearest even on every device,
    # while the interpreter truncates fp32 → bf16.
    block_scores = block_scores.to(run_values.dtype)
    out_v = torch.empty(n_q, k, dtype=run_values.dtype, device=run_values.device)
    out_i = torch.empty(n_q, k, dtype=torch.int64, device=run_values.device)
    if n_q == 0 or k == 0:
        return out_v, out_i
    k_pad = triton.next_power_of_2(k)
    sort_target = _SORT_TARGET.get(run_values.device.type, 512)
    rows = max(2, min(triton.next_power_of_2(cdiv(n_b, k_pad) + 1), sort_target // k_pad))
    n_chunks = max(1, cdiv(n_b, (rows - 1) * k_pad))
    _topk_merge_kernel[(n_q,)](
        run_values,
        run_indices,
        block_scores,
        out_v,
        out_i,
        k,
        n_b,
        n_chunks,
        block_offset,
        *run_values.stride(),
        *run_indices.stride(),
        *block_scores.stride(),
        out_v.stride(0),
        out_i.stride(0),
        LARGEST=largest,
        K_PAD=k_pad,
        ROWS=rows,
        num_warps=8 if rows * k_pad >= 2048 else 4,
    )
    return out_v, out_i
