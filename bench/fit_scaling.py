"""Fit time against the training-set size and against the sampled fit budget, per draw
against the forward+backward floor.

Run from the repository root (not collected by pytest):

    .venv/bin/python bench/fit_scaling.py                         # ≤ 9 min (--budget-s)
    .venv/bin/python bench/fit_scaling.py --threads 1 --budget-s 300

On the embedded digits DDPM with the default `CurvatureConfig` (EK-FAC, 4 + 4 draws per
example), in this one process:

- `n`: `engine.fit(config, indices=range(N))` for N = 250, 500, 1000, 1797;
- `fraction`: `engine.fit(CurvatureConfig(fraction=f))` on all 1,797 digits, f = 0.1, 0.25,
  0.5 — the seeded subset of round(f·N) examples (f = 1.0 is the N = 1,797 fit);
- `checkpoint`: the N = 100 fit in chunks of 20 examples, saving its progress after every
  chunk (10 saves) into a temporary folder, against the same chunks without saving;
- `floor`: plain forward + `loss.backward()` (e2e.py's `floor_pass`) over 250 examples × 4
  draws in the fit's passes (64 examples × 4 draws = 256 draws per pass): the cost of a
  draw without fastinf. `ratio_to_floor` = fit seconds per draw / floor seconds per draw,
  a fit having factor_draws + eigval_draws draws per example.

The run is bounded: points go from the cheapest up (the checkpoint pair first), and a
point whose predicted time (its examples × the seconds per example measured so far) would
overrun `--budget-s` is skipped and named in the summary. Fits of ≤ 250 examples are
repeated (`--repeats`) while the budget allows, the floor three times; medians are
reported. Other processes may load the machine: every row records the 1-minute load
average before the run (`load_before`) and the highest seen around its timing
(`load_max`); on busy cores one thread (`--threads 1`) is faster than two. Rows are
appended to `bench/results/fit_scaling.csv`; the summary `bench/results/fit_scaling.md`
shows the latest row of every point in the CSV (bounded runs on a busy machine fill in the
points an earlier run's budget skipped; each row keeps its own run time, threads and load).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time

import torch
from e2e import floor_pass
from index_common import RESULTS_DIR, append_rows, environment, write_summary

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.curvature.passes import fit_examples
from fastinf.data import load_digits_dataset
from fastinf.engine import InfluenceEngine
from fastinf.models import default_schedule, load_digits_model

SIZES = (250, 500, 1000, 1797)
FRACTIONS = (0.1, 0.25, 0.5)
CHEAP_EXAMPLES = 250  # fits of at most this many examples are repeated
FLOOR_EXAMPLES = 250
CHECKPOINT = (100, 20)  # (examples, chunk_examples) of the checkpoint comparison


def timed(fn, repeats: int) -> tuple[list[float], float]:
    """Wall seconds of `repeats` calls of `fn`, and the highest 1-minute load around them."""
    seconds, load = [], os.getloadavg()[0]
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
        load = max(load, os.getloadavg()[0])
    return seconds, load


def latest_rows() -> list[dict]:
    """The latest row of every point (bench, N, fraction, checkpointed) in the CSV, in the
    order of the points' first appearance."""
    with open(RESULTS_DIR / "fit_scaling.csv", newline="") as handle:
        saved = list(csv.DictReader(handle))
    latest: dict[tuple, dict] = {}
    for row in saved:
        key = (row["bench"], row["N"], row.get("fraction", ""), row.get("checkpointed", ""))
        latest[key] = row
    return list(latest.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="time bound of the run")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the cheap fits")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(f"fit_scaling: torch {env['torch']}, {env['threads']} threads, load {env['load_before']}")
    model, schedule, data = load_digits_model(), default_schedule(), load_digits_dataset()
    engine = InfluenceEngine(model, schedule, data)
    config = CurvatureConfig()
    draws = config.factor_draws + config.eigval_draws

    # The floor: forward + backward over the fit's draws, in its passes.
    per_pass = config.batch_size // config.factor_draws
    floor_config = ScoreConfig(
        train_draws=config.factor_draws, block_size=per_pass, batch_size=config.batch_size
    )
    floor_pass(model, schedule, data.images, per_pass, floor_config)  # warm-up
    floor_seconds, floor_load = timed(
        lambda: floor_pass(model, schedule, data.images, FLOOR_EXAMPLES, floor_config), 3
    )
    model.zero_grad(set_to_none=True)
    floor_per_draw = statistics.median(floor_seconds) / (FLOOR_EXAMPLES * config.factor_draws)
    rows = [
        {
            "bench": "floor",
            "N": FLOOR_EXAMPLES,
            "examples": FLOOR_EXAMPLES,
            "draws": FLOOR_EXAMPLES * config.factor_draws,
            "seconds_median": round(statistics.median(floor_seconds), 3),
            "seconds_min": round(min(floor_seconds), 3),
            "repeats": len(floor_seconds),
            "floor_ms_per_draw": round(floor_per_draw * 1e3, 4),
            "load_max": round(floor_load, 2),
            **env,
        }
    ]
    # Warm-up of the fit's path; its rate predicts the first point's time.
    warm, _ = timed(lambda: engine.fit(config, indices=range(per_pass)), 1)
    rates = [warm[0] / per_pass]

    def fit_row(bench, num_train, examples, seconds, load, **extra) -> dict:
        median = statistics.median(seconds)
        per_draw = median / (examples * draws)
        rates.append(median / examples)
        row = {
            "bench": bench,
            "N": num_train,
            "examples": examples,
            "draws": examples * draws,
            "seconds_median": round(median, 3),
            "seconds_min": round(min(seconds), 3),
            "repeats": len(seconds),
            "ms_per_draw": round(per_draw * 1e3, 4),
            "floor_ms_per_draw": round(floor_per_draw * 1e3, 4),
            "ratio_to_floor": round(per_draw / floor_per_draw, 2),
            "strategy": config.strategy,
            "factor_draws": config.factor_draws,
            "eigval_draws": config.eigval_draws,
            "load_max": round(load, 2),
            **extra,
            **env,
        }
        shown = ("bench", "N", "fraction", "examples", "seconds_median", "ratio_to_floor")
        print({key: row.get(key) for key in shown})
        rows.append(row)
        return row

    def affordable(examples: int, fits: int = 1) -> int:
        """How many of `fits` runs of `examples` the remaining budget predicts room for."""
        left = args.budget_s - (time.perf_counter() - started)
        return max(0, min(fits, int(left // (examples * statistics.median(rates)))))

    # (bench, examples, N, fraction): cheapest first (the checkpoint pair, which compares
    # two fits, before all), so a tight budget keeps the small ones.
    points = [("n", size, size, 1.0) for size in SIZES if size <= len(data)]
    for fraction in FRACTIONS:
        examples = len(fit_examples(len(data), CurvatureConfig(fraction=fraction)))
        points.append(("fraction", examples, len(data), fraction))
    points.append(("checkpoint", 2 * CHECKPOINT[0], CHECKPOINT[0], 1.0))
    points.sort(key=lambda point: (point[0] != "checkpoint", point[1]))
    skipped = []
    for bench, examples, num_train, fraction in points:
        wanted = args.repeats if examples <= CHEAP_EXAMPLES else 1
        repeats = affordable(examples, wanted)
        if repeats == 0:
            skipped.append(f"{bench} N={num_train} f={fraction} ({examples} examples)")
            continue
        if bench == "n":
            seconds, load = timed(lambda n=num_train: engine.fit(config, indices=range(n)), repeats)
            row = fit_row(bench, num_train, examples, seconds, load, fraction=fraction)
            if num_train == len(data):
                rows.append({**row, "bench": "fraction"})  # f = 1.0 of the budget axis
        elif bench == "fraction":
            budget = CurvatureConfig(fraction=fraction)
            seconds, load = timed(lambda b=budget: engine.fit(b), repeats)
            fit_row(bench, num_train, examples, seconds, load, fraction=fraction)
        else:
            size, chunk = CHECKPOINT
            chunked, subset = CurvatureConfig(chunk_examples=chunk), range(size)
            with tempfile.TemporaryDirectory() as folder:
                saved, load = timed(
                    lambda c=chunked, i=subset, f=folder: engine.fit(c, i, checkpoint_dir=f), 1
                )
            plain, load_plain = timed(lambda c=chunked, i=subset: engine.fit(c, i), 1)
            extra = {"fraction": 1.0, "chunk_examples": chunk}
            fit_row(bench, size, size, saved, load, checkpointed=True, **extra)
            fit_row(bench, size, size, plain, load_plain, checkpointed=False, **extra)

    append_rows(RESULTS_DIR / "fit_scaling.csv", rows)
    wall = time.perf_counter() - started
    paragraph = (
        f"Embedded digits DDPM, default `CurvatureConfig` (EK-FAC, {config.factor_draws} + "
        f"{config.eigval_draws} draws per example), the latest row of each point in "
        "`fit_scaling.csv` (each with its run, threads and the 1-minute load average before "
        "its run: other processes shared the machine; `load_max` is the highest seen around "
        "each timing). `floor_ms_per_draw`: plain forward + `loss.backward()` per draw in the "
        "fit's passes (e2e.py's floor, measured in the same run); `ratio_to_floor`: fit time "
        "per draw over it. `fraction` rows fit the seeded subset of round(f·N) of the 1,797 "
        "digits (`CurvatureConfig.fraction`); `checkpoint` rows fit N = "
        f"{CHECKPOINT[0]} in chunks of {CHECKPOINT[1]} examples with and without saving the "
        f"progress after each chunk. The last run ({env['run']}, commit "
        f"{env['git_commit']}) took {wall:.0f} s of a {args.budget_s:.0f} s budget; skipped as "
        f"over budget: {', '.join(skipped) or 'none'}. Command: "
        f"`.venv/bin/python bench/fit_scaling.py"
        f"{f' --threads {args.threads}' if args.threads else ''} --budget-s {args.budget_s:g}`."
    )
    columns = [
        "bench",
        "N",
        "fraction",
        "examples",
        "draws",
        "seconds_median",
        "repeats",
        "ms_per_draw",
        "floor_ms_per_draw",
        "ratio_to_floor",
        "checkpointed",
        "threads",
        "load_before",
        "load_max",
        "run",
    ]
    write_summary(
        "fit_scaling", "Fit time vs N and vs the fit budget", paragraph, latest_rows(), columns
    )
    print(f"{wall:.0f} s; rows appended to {RESULTS_DIR / 'fit_scaling.csv'}")


if __name__ == "__main__":
    main()
