"""Shared by the index benchmarks: environment columns, CSV/markdown writers, recall@k."""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict[str, object]:
    """Columns every row carries: when, where, which code, how loaded the machine was."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "run": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_commit": commit,
        "load_before": round(os.getloadavg()[0], 2),
    }


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append long-format rows to a CSV; a new column rewrites the file with the union."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    if path.exists():
        with open(path, newline="") as handle:
            old = list(csv.DictReader(handle))
    columns = list(dict.fromkeys(key for row in [*old, *rows] for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows([*old, *rows])


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(name: str, title: str, paragraph: str, rows: list[dict], columns) -> None:
    """`results/<name>.md`: the title, what the run was (`paragraph`) and its table."""
    text = [f"# {title}", "", paragraph, "", markdown_table(rows, columns)]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(text) + "\n")


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor, k: int, candidates: int | None = None):
    """Mean and min over queries of |exact top-k ∩ approx top-`candidates`| / k, for the
    largest scores (proponents) and the smallest (opponents). approx, exact: [Q, N]."""
    candidates = candidates or k
    out = {}
    for sign, name in ((1.0, "proponents"), (-1.0, "opponents")):
        truth = (sign * exact).topk(k, dim=1).indices
        found = (sign * approx).topk(candidates, dim=1).indices
        hits = (truth.unsqueeze(2) == found.unsqueeze(1)).any(2).double().mean(1)
        out[name] = (float(hits.mean()), float(hits.min()))
    return out
