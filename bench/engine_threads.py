"""One engine, many callers: concurrent calls vs a lock vs one batched call.

Run from the repository root (not collected by pytest; ~1 min on a 2-core CPU):

    .venv/bin/python bench/engine_threads.py [--repeats 3]

The engine keeps its capture state per call, so threads may call `engine.score` at once;
the alternatives are to serialise calls behind a lock, or to batch queries into one call
(what `fastinf serve`'s micro-batcher does). On the digits default with its index, search
only (`exact_rerank=0`), 16 distinct queries (`sample_ddpm`, seed 23, 50 steps) are
answered (a) one after another, (b) from 4 threads at once, (c) from 4 threads under one
lock, (d) as one batched call of 16; (a) and (d) both from a worker thread and from the
main thread. torch ran the same calls markedly slower from a worker thread than from the
main thread on this 2-core machine (2026-12-07, near idle: 1.4-1.7×), which is why `fastinf
serve` scores on the main thread and answers HTTP on another. The variants alternate round
by round; each reports the median wall time of `--repeats` rounds and queries per second.
Every variant's top-10 must equal the sequential answers (indices exactly, scores to 1e-6
relative), otherwise its row says so and no rate is reported.

Rows are appended to `bench/results/engine_threads.csv`; the summary is
`engine_threads.md`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from index_common import RESULTS_DIR, append_rows, environment, write_summary

from fastinf.engine import default_engine, default_index
from fastinf.sampling import sample_ddpm

QUERIES, THREADS, TOP_K, SEED = 16, 4, 10, 23


def run_sequential(engine, queries):
    return [_one(engine, query) for query in queries]


def run_threads(engine, queries, lock: threading.Lock | None = None):
    def call(query):
        if lock is None:
            return _one(engine, query)
        with lock:
            return _one(engine, query)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(call, queries))


def run_batched(engine, queries):
    result = engine.score(queries, TOP_K, exact_rerank=0)
    return [
        (result.proponents.indices[row], result.proponents.scores[row])
        for row in range(queries.shape[0])
    ]


def off_main_thread(run):
    """`run` called from one worker thread, as the service's batcher calls the engine."""

    def wrapped(engine, queries):
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(run, engine, queries).result()

    return wrapped


def _one(engine, query):
    result = engine.score(query.unsqueeze(0), TOP_K, exact_rerank=0)
    return result.proponents.indices[0], result.proponents.scores[0]


VARIANTS = {
    "one after another": off_main_thread(run_sequential),
    "one after another, main thread": run_sequential,
    f"{THREADS} threads, concurrent": run_threads,
    f"{THREADS} threads, one lock": lambda engine, queries: run_threads(
        engine, queries, threading.Lock()
    ),
    f"one batched call of {QUERIES}": off_main_thread(run_batched),
    f"one batched call of {QUERIES}, main thread": run_batched,
}


def same_answers(answers, reference) -> bool:
    return all(
        torch.equal(indices, ref_indices)
        and torch.allclose(scores, ref_scores, rtol=1e-6, atol=0.0)
        for (indices, scores), (ref_indices, ref_scores) in zip(answers, reference, strict=True)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    engine = default_engine()
    default_index(engine)
    queries = sample_ddpm(engine.model, engine.schedule, QUERIES, seed=SEED, num_inference_steps=50)
    env = environment() | {"nice": os.nice(0)}
    reference = VARIANTS["one after another"](engine, queries)  # also the warm-up
    times = {name: [] for name in VARIANTS}
    agree = dict.fromkeys(VARIANTS, True)
    for _ in range(args.repeats):  # alternate, so a change in machine load hits all alike
        for name, run in VARIANTS.items():
            tick = time.perf_counter()
            answers = run(engine, queries)
            times[name].append(time.perf_counter() - tick)
            agree[name] &= same_answers(answers, reference)
    base = times["one after another"]
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        row = {**env, "what": name, "queries": QUERIES, "exact_rerank": 0}
        row |= {"seconds_median": round(median, 3), "seconds_min": round(min(seconds), 3)}
        row |= {"repeats": args.repeats, "same_as_sequential": agree[name]}
        if agree[name]:
            row["queries_per_s"] = round(QUERIES / median, 2)
            row["speedup_vs_sequential"] = round(statistics.median(base) / median, 2)
        rows.append(row)
        print(f"{name:<28} {median:6.2f} s  {row.get('queries_per_s', 'answers differ')}")
    append_rows(RESULTS_DIR / "engine_threads.csv", rows)
    prefix = f"nice -n {env['nice']} " if env["nice"] else ""
    columns = ["what", "seconds_median", "seconds_min", "queries_per_s", "speedup_vs_sequential"]
    write_summary(
        "engine_threads",
        "One engine, many callers: threads, a lock, or one batched call (digits, index)",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, torch {env['torch']} "
        f"with {env['threads']} threads, load before {env['load_before']}, niceness "
        f"{env['nice']}. "
        f"{QUERIES} distinct generated queries, `engine.score(..., k={TOP_K}, exact_rerank=0)` "
        "(the default index, search only), each call from a worker thread (as `fastinf serve "
        "--score-thread worker` scores) unless its row says main thread (as `fastinf serve` "
        f"scores by default); median of {args.repeats} rounds, the variants "
        "alternating. Every variant's top-10 equals the sequential answers: "
        f"{all(agree.values())}. Command: `{prefix}.venv/bin/python bench/engine_threads.py`.",
        rows,
        columns,
    )


if __name__ == "__main__":
    main()
