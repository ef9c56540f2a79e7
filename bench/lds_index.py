"""LDS of EK-FAC read through the persistent index, beside exact EK-FAC scores (digits).

Run from the repository root after `bench/lds_digits.py`, whose cached base model, retrained
models, measurements and curvature in `bench/lds_run/` it reuses (~3 min on a 2-core CPU):

    .venv/bin/python bench/lds_index.py

For the engine-default EK-FAC method, it builds indexes of the 1,000 training digits with the
default `IndexConfig` (count sketch into 32,768 buckets, int4: 16 KB per image) and with
smaller sketches. Each index's scores of every training digit against the 32 queries (the
inner products a search ranks by) are evaluated like any method. It reports the LDS, and the
Spearman correlation per query between index and exact scores over all 1,000 digits. The
question is whether the compression that makes search fast keeps the attribution's quality,
not only its top-10. Rows go to `bench/results/lds_index.csv`, the summary to `lds_index.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from index_common import RESULTS_DIR, append_rows, environment, write_summary

from fastinf.evaluation import lds, spearman
from fastinf.index import IndexConfig
from fastinf.lds import LDSConfig, LDSRun, default_methods

SKETCH_SIZES = (32768, 8192, 2048)  # the default first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(Path(__file__).resolve().parent / "lds_run"))
    args = parser.parse_args()
    env = environment()
    run = LDSRun(args.run_dir, LDSConfig())
    method = default_methods()[0]
    main_measurements, _ = run.measurements()
    exact = run.scores([method])[method.key()]
    rows = []

    def report(label: str, scores, bytes_per_example, seconds: float) -> None:
        result = lds(scores, run.masks, main_measurements)
        agreement = spearman(scores.T, exact.T)
        rows.append(
            env
            | {
                "scores": label,
                "bytes_per_example": bytes_per_example,
                "lds": round(result.mean, 4),
                "lds_sem": round(result.sem, 4),
                "spearman_vs_exact_mean": round(float(agreement.mean()), 4),
                "spearman_vs_exact_min": round(float(agreement.min()), 4),
                "seconds": round(seconds, 1),
                "num_queries": exact.shape[0],
                "num_train": exact.shape[1],
            }
        )
        print(rows[-1], flush=True)

    report("exact EK-FAC (engine.score)", exact, "", 0.0)
    for dim in SKETCH_SIZES:
        config = IndexConfig(dim=dim)
        start = time.perf_counter()
        scores = run.index_scores(method, config)
        label = f"index: {config.compression} {dim} × {config.storage}"
        label += " (default)" if dim == IndexConfig.dim else ""
        report(label, scores, config.bytes_per_example(dim), time.perf_counter() - start)
    append_rows(RESULTS_DIR / "lds_index.csv", rows)
    columns = ["scores", "bytes_per_example", "lds", "lds_sem"]
    columns += ["spearman_vs_exact_mean", "spearman_vs_exact_min", "seconds"]
    write_summary(
        "lds_index",
        "LDS of EK-FAC through the index (digits)",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {env['threads']} "
        f"threads. Engine-default EK-FAC on the `bench/lds_run/` benchmark "
        f"({exact.shape[1]:,} training digits, {run.config.num_subsets} half subsets, "
        f"{exact.shape[0]} queries). `spearman_vs_exact`: per query, index scores against "
        "exact scores over every training digit. `seconds`: index build and scoring (0 when "
        "cached). Command: `.venv/bin/python bench/lds_index.py`.",
        rows,
        columns,
    )


if __name__ == "__main__":
    main()
