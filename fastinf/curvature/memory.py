"""What a fit holds per layer, estimated before it starts, and the per-layer budget.

An EK-FAC or K-FAC fit keeps, per tracked layer and in float64, the
factors A [d_in, d_in] and S [d_out, d_out], their eigenvectors (the same sizes), their
eigenvalues and the corrected eigenvalues Λ [d_out, d_in] (+ d_out for a bias). At
Stable-Diffusion size one layer can outgrow memory (a 1,280-channel 3×3 convolution has
d_in = 11,520: 2.3 GB), so a layer over `CurvatureConfig.max_layer_bytes` is refused
before any gradient is computed, with the fix named: track fewer layers, or a LoRA.
"""

from __future__ import annotations

from ..layers import LayerInfo

__all__ = ["KRONECKER_STRATEGIES", "check_layer_memory", "layer_state_bytes", "memory_report"]

KRONECKER_STRATEGIES = ("ekfac", "kfac")
"""The strategies that hold Kronecker factors and their eigenbases per layer."""

_FLOAT64 = 8


def layer_state_bytes(info: LayerInfo) -> int:
    """Bytes of one layer's float64 fit state (factors, eigenbases, eigenvalues)."""
    d_in, d_out = info.d_in, info.d_out
    values = 2 * d_in * d_in + 2 * d_out * d_out + d_in * d_out + d_in + d_out
    values += d_out if info.has_bias else 0
    return _FLOAT64 * values


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def memory_report(layers: dict[str, LayerInfo], shown: int = 5) -> str:
    """Lines for a person: the total, then the largest layers with their sizes."""
    sizes = sorted(
        ((layer_state_bytes(info), name, info) for name, info in layers.items()), reverse=True
    )
    total = sum(size for size, _, _ in sizes)
    lines = [f"curvature memory estimate: {_size(total)} over {len(layers)} layers (float64)"]
    for size, name, info in sizes[:shown]:
        shape = f"{info.kind}, d_in {info.d_in}, d_out {info.d_out}"
        lines.append(f"  {_size(size):>9}  {name}  ({shape})")
    if len(sizes) > shown:
        lines.append(f"  … {len(sizes) - shown} smaller layers")
    return "\n".join(lines)


def check_layer_memory(layers: dict[str, LayerInfo], budget: int | None) -> None:
    """Refuse a fit whose largest layer's state exceeds `budget` bytes (None: no limit)."""
    if budget is None:
        return
    sizes = [(layer_state_bytes(info), name, info) for name, info in layers.items()]
    over = [entry for entry in sizes if entry[0] > budget]
    if not over:
        return
    size, name, info = max(over)
    others = f" (and {len(over) - 1} more layers)" if len(over) > 1 else ""
    raise ValueError(
        f"layer {name!r} ({info.kind}, d_in {info.d_in}, d_out {info.d_out}) needs "
        f"{_size(size)} of curvature state, over the {_size(budget)} per-layer budget"
        f"{others}; attribute a subset of layers (--layers / layers='*attn2*'), a LoRA "
        "adapter, or raise CurvatureConfig.max_layer_bytes (--max-layer-bytes)."
    )
