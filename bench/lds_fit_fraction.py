"""How LDS moves with the share of the training set the EK-FAC fit sees.

    .venv/bin/python bench/lds_fit_fraction.py            # ~40 min on 2 cores the first time
    .venv/bin/python bench/lds_fit_fraction.py --quick    # 12 subsets

The digits LDS benchmark of `bench/lds_digits.py` (1,000 training digits, M = 50 subsets
at α = 0.5, 32 generated queries; its retrained models are shared through --run-dir), with
the engine's default method (EK-FAC, its default draws and damping) fitted on a seeded
fraction of the examples (`CurvatureConfig.fraction`; the subsets are nested). Every
fraction is scored against the same queries and training set, so besides each LDS it
reports the paired difference to the full fit (mean over queries of the per-query Spearman
difference ± its standard error), which is far tighter than either LDS's own ± (that is
mostly the spread between queries). It also records the fit's wall time per fraction
(the fit cost is proportional to the examples it sees).

Rows go to `bench/results/lds_fit_fraction.csv` (appended) and `lds_fit_fraction.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
from index_common import RESULTS_DIR, append_rows, environment, markdown_table
from lds_digits import _default

from fastinf.evaluation import lds
from fastinf.lds import LDSConfig, LDSRun, Method

FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02)
COLUMNS = [
    "fraction",
    "fit_examples",
    "fit_seconds",
    "lds",
    "lds_sem",
    "lds_minus_full",
    "lds_minus_full_sem",
]


def _method(fraction: float) -> Method:
    default = _default()
    curvature = dataclasses.replace(
        default.curvature, fraction=None if fraction == 1.0 else fraction
    )
    return dataclasses.replace(default, name=f"EK-FAC, fit on {fraction:g}", curvature=curvature)


def _paired(per_query: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    difference = per_query - full
    difference = difference[~difference.isnan()]
    sem = float(difference.std(unbiased=True) / math.sqrt(difference.numel()))
    return float(difference.mean()), sem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(Path(__file__).resolve().parent / "lds_run"))
    parser.add_argument("--subsets", type=int, default=LDSConfig.num_subsets)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="12 subsets")
    args = parser.parse_args()
    subsets = 12 if args.quick else args.subsets
    # No oracle replicates: this benchmark compares fits, not methods against retraining.
    config = LDSConfig(num_subsets=subsets, oracle_subsets=0)
    run = LDSRun(args.run_dir, config, num_workers=args.workers)
    env = environment()
    started = time.perf_counter()
    run.retrain()
    retrain_seconds = time.perf_counter() - started

    methods = [_method(fraction) for fraction in FRACTIONS]
    run.engine()  # its one-off setup (model, data fingerprint) is not part of any fit
    fit_seconds = {}
    for method in methods:
        mark = time.perf_counter()
        curvature = run._curvature(method.curvature)  # fitted now, or loaded from the run
        fit_seconds[method.key()] = time.perf_counter() - mark
        del curvature
    scores = run.scores(methods)
    main_measurements, _ = run.measurements()
    results = {m.key(): lds(scores[m.key()], run.masks, main_measurements) for m in methods}
    full = results[methods[0].key()].per_query
    rows = []
    for fraction, method in zip(FRACTIONS, methods, strict=True):
        result = results[method.key()]
        difference, difference_sem = _paired(result.per_query, full)
        rows.append(
            {
                **env,
                "subsets": subsets,
                "fraction": fraction,
                "fit_examples": math.ceil(fraction * config.num_train),
                # A fit loaded from an earlier run shows its load time; rerun in a new
                # --run-dir to time every fit.
                "fit_seconds": round(fit_seconds[method.key()], 1),
                "lds": round(result.mean, 4),
                "lds_sem": round(result.sem, 4),
                "lds_minus_full": round(difference, 4),
                "lds_minus_full_sem": round(difference_sem, 4),
            }
        )
    append_rows(RESULTS_DIR / "lds_fit_fraction.csv", rows)
    command = ".venv/bin/python bench/lds_fit_fraction.py" + (" --quick" if args.quick else "")
    text = (
        "# LDS vs the share of the training set the EK-FAC fit sees (digits)\n\n"
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {env['threads']} "
        f"threads, load average {env['load_before']} when it started. `{command}`: "
        f"{config.num_train} training digits, M = {subsets} subsets at α = {config.fraction}, "
        f"{config.num_queries} generated queries; the engine's default method (EK-FAC, "
        "default draws and damping) fitted on a seeded, nested fraction of the examples "
        "(`CurvatureConfig.fraction`). lds_minus_full: the mean over queries of the "
        "per-query Spearman difference to the full fit, ± its standard error (paired: "
        "the same queries and subsets). fit_seconds: wall time of the fit (a fit cached "
        "in the run directory shows its load time). "
        f"Retraining (cached): {retrain_seconds:.0f} s.\n\n" + markdown_table(rows, COLUMNS) + "\n"
    )
    (RESULTS_DIR / "lds_fit_fraction.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
