"""Triton whiten-and-sketch: (coords ∘ W^½).flatten(1) [@ sketch].

Plan:

* Without a sketch, ``_whiten_kernel`` is one elementwise pass over the flattened
  [B, d_out·d_in] coordinates (int64 flat offsets: B·d_out·d_in can pass 2³¹).
* With a sketch, ``_whiten_sketch_kernel`` is a split-K GEMM whose A operand is whitened
  on load: program (output tile, split) loads a [BLOCK_B, BLOCK_K] block of coordinates,
  scales it by the matching W^½ entries in registers and feeds it to ``tl.dot`` with the
  [BLOCK_K, BLOCK_N] sketch block. The whitened coordinates are never written. The
  reduction dimension d_out·d_in is long and B·k often small, so it is split over
  programs; each writes its tile of partial[n_split, B, k] once and the launcher sums
  the splits in a fixed order (no atomics, reproducible run to run).
* Precision: float32 operands (fp16/bf16 upcast on load), ``dot_precision()`` on GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, split_count
from ..dispatch import dot_precision

__all__ = ["whiten_sketch"]

BLOCK_FLAT = 1024
BLOCK_B = 32
BLOCK_N = 64
BLOCK_K = 32
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _whiten_kernel(coords_ptr, scale_ptr, out_ptr, n_elements, n_features, BLOCK: tl.constexpr):
    i_e = tl.program_id(0)
    o_e = i_e.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < n_elements
    b_c = tl.load(coords_ptr + o_e, mask=m_e, other=0.0).to(tl.float32)
    b_w = tl.load(scale_ptr + o_e % n_features, mask=m_e, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_e, b_c * b_w, mask=m_e)


@triton.jit
def _whiten_sketch_kernel(
    coords_ptr,
    scale_ptr,
    sketch_ptr,
    partial_ptr,
    n_b,
    n_features,
    n_out,
    features_per_split,
    s_cb,
    s_sf,
    s_sn,
    s_ps,
    s_pb,
    s_pn,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_bn = tl.program_id(0)
    i_s = tl.program_id(1)
    n_nb = tl.cdiv(n_out, BLOCK_N)
    i_b = i_bn // n_nb
    i_n = i_bn % n_nb
    o_b = (i_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_b = o_b < n_b
    m_n = o_n < n_out

    f_lo = i_s * features_per_split
    f_hi = tl.minimum(f_lo + features_per_split, n_features)
    # [BLOCK_B, BLOCK_N]
    b_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for f0 in range(f_lo, f_hi, BLOCK_K):
        o_f = (f0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_f = o_f < f_hi
        # [BLOCK_K]
        b_w = tl.load(scale_ptr + o_f, mask=m_f, other=0.0).to(tl.float32)
        # [BLOCK_B, BLOCK_K], whitened in registers
        b_c = tl.load(
            coords_ptr + o_b[:, None] * s_cb + o_f[None, :],
            mask=m_b[:, None] & m_f[None, :],
            other=0.0,
        ).to(tl.float32)
        b_c = b_c * b_w[None, :]
        # [BLOCK_K, BLOCK_N]
        b_s = tl.load(
            sketch_ptr + o_f[:, None] * s_sf + o_n[None, :] * s_sn,
            mask=m_f[:, None] & m_n[None, :],
            other=0.0,
        ).to(tl.float32)
        b_acc = tl.dot(b_c, b_s, b_acc, input_precision=DOT_PRECISION)

    p_out = partial_ptr + i_s.to(tl.int64) * s_ps + o_b[:, None] * s_pb + o_n[None, :] * s_pn
    tl.store(p_out, b_acc, mask=m_b[:, None] & m_n[None, :])


def whiten_sketch(
    coords: torch.Tensor, inv_sqrt_damped: torch.Tensor, sketch: torch.Tensor | None
) -> torch.Tensor:
    """Triton version of :func:`fastinf.kernels.whiten.naive.whiten_sketch`.

    Returns float32.
    """
    n_b = coords.shape[0]
    n_features = inv_sqrt_damped.numel()
    scale = inv_sqrt_damped.reshape(n_features).contiguous()
    if sketch is None:
        flat = coords.reshape(n_b, n_features).contiguous()
        out = torch.empty(n_b, n_features, dtype=torch.float32, device=coords.device)
        if out.numel():
            _whiten_kernel[(cdiv(out.numel(), BLOCK_FLAT),)](
                flat, scale, out, out.numel(), n_features, BLOCK=BLOCK_FLAT
            )
        return out
    # [B, d_out·d_in] with a unit feature stride; any row stride (a view when possible)
    flat = coords.reshape(n_b, n_features)
    if n_features > 1 and flat.stride(1) != 1:
        flat = flat.contiguous()
    n_out = sketch.shape[1]
    if n_b == 0 or n_out == 0:
        return torch.empty(n_b, n_out, dtype=torch.float32, device=coords.device)
    if n_features == 0:
        # nothing to project: every output is an empty sum
        return torch.empty(n_b, n_out, dtype=torch.float32, device=coords.device).zero_()
    n_tiles = cdiv(n_b, BLOCK_B) * cdiv(n_out, BLOCK_N)
    n_split = split_count(coords.device, n_tiles, cdiv(n_features, BLOCK_K))
    features_per_split = cdiv(cdiv(n_features, n_split), BLOCK_K) * BLOCK_K
    n_split = cdiv(n_features, features_per_split)
    partial = torch.empty(n_split, n_b, n_out, dtype=torch.float32, device=coords.device)
    _whiten_sketch_kernel[(n_tiles, n_split)](
        flat,
        scale,
        sketch,
        partial,
        n_b,
        n_features,
        n_out,
        features_per_split,
        flat.stride(0),
        *sketch.stride(),
        *partial.stride(),
        BLOCK_B=BLOCK_B,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        DOT_PRECISION=dot_precision(),
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return partial[0] if n_split == 1 else partial.sum(dim=0)
