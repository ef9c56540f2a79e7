"""Benchmark plumbing: long-format result rows appended to ``kernels_<device>.csv``.

Rows go to ``$FASTINF_BENCH_DIR`` when set (``bench/gpu_check.sh`` points it at ``$OUT``),
else to ``bench/results/``. One row per (op, backend, shape, dtype) measurement, so plots
and regression checks come from saved data; speed-ups are derived from rows, never stored,
and only printed for ops whose correctness check passed.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pytest
import torch

RESULTS_DIR_ENV_VAR = "FASTINF_BENCH_DIR"


@dataclass(frozen=True)
class BenchRow:
    """One timing: median seconds per call over ``rounds`` timed calls."""

    op: str
    backend: str
    shape: str
    dtype: str
    median_s: float
    min_s: float
    rounds: int
    device: str
    torch: str
    triton: str
    dot_precision: str
    verified: bool


def device_tag() -> str:
    """``cpu`` or the CUDA device name with spaces turned into dashes (file-name safe)."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", torch.cuda.get_device_name()).strip("-")


def triton_version() -> str:
    try:
        import triton
    except Exception:  # a broken install raises more than ImportError
        return "absent"
    return triton.__version__


def results_path() -> Path:
    root = os.environ.get(RESULTS_DIR_ENV_VAR) or Path(__file__).parent / "results"
    return Path(root) / f"kernels_{device_tag()}.csv"


class BenchLog:
    """Rows of this session; appended to the CSV at the end of the session."""

    def __init__(self) -> None:
        self.rows: list[BenchRow] = []

    def record(
        self,
        *,
        op: str,
        backend: str,
        shape: str,
        dtype: torch.dtype,
        stats,
        dot_precision: str,
        verified: bool,
    ) -> None:
        """Add one timing from pytest-benchmark ``stats`` (seconds per call)."""
        self.rows.append(
            BenchRow(
                op=op,
                backend=backend,
                shape=shape,
                dtype=str(dtype).removeprefix("torch."),
                median_s=stats.median,
                min_s=stats.min,
                rounds=stats.rounds,
                device=device_tag(),
                torch=torch.__version__,
                triton=triton_version(),
                dot_precision=dot_precision,
                verified=verified,
            )
        )

    def write(self, path: Path) -> None:
        if not self.rows:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(BenchRow)])
            if new_file:
                writer.writeheader()
            writer.writerows(asdict(row) for row in self.rows)

    def speedups(self) -> list[str]:
        """Lines "op shape dtype: reference / triton = x" for verified Triton rows."""
        reference = {(r.op, r.shape, r.dtype): r for r in self.rows if r.backend == "reference"}
        lines = []
        for row in self.rows:
            base = reference.get((row.op, row.shape, row.dtype))
            if row.backend == "triton" and row.verified and base is not None:
                ratio = base.median_s / row.median_s
                lines.append(
                    f"{row.op:20s} {row.shape:44s} {row.dtype:8s} "
                    f"reference {base.median_s * 1e3:9.3f} ms  triton "
                    f"{row.median_s * 1e3:9.3f} ms  speed-up {ratio:6.2f}x"
                )
        return lines


_LOG = BenchLog()


@pytest.fixture(scope="session")
def bench_log() -> Iterator[BenchLog]:
    """The session's :class:`BenchLog`; rows are written when the session ends."""
    yield _LOG


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _LOG.write(results_path())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config) -> None:
    if not _LOG.rows:
        return
    terminalreporter.section("kernel speed-ups (verified Triton vs reference, same process)")
    for line in _LOG.speedups() or ["(no verified Triton timings in this session)"]:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"rows appended to {results_path()}")
