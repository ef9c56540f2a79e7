"""Launch-size helpers shared by the Triton launchers (no triton import here)."""

from __future__ import annotations

import torch

__all__ = ["cdiv", "split_count"]

# Programs per streaming multiprocessor to aim for when splitting a reduction: enough to
# hide latency, few enough that the partial sums stay small.
_PROGRAMS_PER_SM = 4
# Under the interpreter programs run one after another; two splits still exercise the
# split-and-reduce path.
_INTERPRETER_SPLITS = 2


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-numerator // denominator)


def split_count(device: torch.device, other_programs: int, max_splits: int) -> int:
    """Number of splits of a reduction so that the grid roughly fills the device.

    Args:
        device: where the kernel runs.
        other_programs: programs the grid already has without splitting (≥ 1).
        max_splits: upper bound, e.g. the number of reduction tiles (≥ 1).

    Returns:
        An integer in [1, max_splits].
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = cdiv(_PROGRAMS_PER_SM * sms, max(other_programs, 1))
    else:
        wanted = _INTERPRETER_SPLITS
    return max(1, min(wanted, max_splits))
