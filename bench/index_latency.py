"""End-to-end `topk_influencers` latency with the index on the digits model, and its recall.

Run from the repository root (not collected by pytest; ~5 min on a 2-core CPU, more when
the index is not built yet):

    .venv/bin/python bench/index_latency.py

Builds (or resumes, or reuses) the default `IndexConfig` index of the 1,797 digits in
`--dir` (default `.fastinf_cache/index_digits`), timing the build. Then, for 16 generated
queries (`sample_ddpm`, seed 99, 50 steps — not the queries of `index_recall.py`), one query
per call, it times `topk_influencers(query, k=10, engine=engine)` end to end (query
gradient with K_q = 64 draws, projection, whitening, compression, both searches) with and
without an exact re-rank of the top-C candidates, and splits the search-only call into its
parts. Recall@10 of every variant against exact EK-FAC scores (`engine.score` without the
index) is reported beside its latency. Rows go to `bench/results/index_latency_<device>.csv`,
the summary to `index_latency_<device>.md`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from index_common import RESULTS_DIR, append_rows, environment, markdown_table

from fastinf.engine import default_engine, topk_influencers
from fastinf.index import IndexConfig
from fastinf.sampling import sample_ddpm

RERANKS = (0, 10, 20, 50)
TOP_K = 10


def _recall(found, truth) -> float:
    hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".fastinf_cache/index_digits")
    parser.add_argument("--queries", type=int, default=16)
    args = parser.parse_args()
    env = environment()
    engine = default_engine()
    config = IndexConfig()
    start = time.perf_counter()
    engine.build_index(Path(args.dir), config)
    build_seconds = time.perf_counter() - start
    index = engine.index
    queries = sample_ddpm(
        engine.model, engine.schedule, args.queries, seed=99, num_inference_steps=50
    )
    engine.unload_index()
    exact = engine.score(queries, k=TOP_K)
    engine.load_index(args.dir)
    truth_pro, truth_opp = exact.proponents.indices.tolist(), exact.opponents.indices.tolist()

    rows = []
    base = {**env, "N": index.num_examples, "dim": index.dim, "storage": config.storage}
    base |= {"compression": config.compression, "bytes_per_example": index.bytes_per_example}
    rows.append({**base, "what": "build", "seconds_median": build_seconds, "repeats": 1})
    topk_influencers(queries[:1], k=TOP_K, engine=engine)  # warm-up
    for rerank in RERANKS:
        times, pro, opp = [], [], []
        for row in range(args.queries):
            tick = time.perf_counter()
            result = topk_influencers(
                queries[row : row + 1], k=TOP_K, engine=engine, exact_rerank=rerank
            )
            times.append(time.perf_counter() - tick)
            pro += result.proponents.indices.tolist()
            opp += result.opponents.indices.tolist()
        rows.append(
            {
                **base,
                "what": "topk_influencers"
                + (f" + exact re-rank of top-{rerank}" if rerank else ""),
                "exact_rerank": rerank,
                "seconds_median": statistics.median(times),
                "seconds_max": max(times),
                "repeats": len(times),
                "recall_proponents": round(_recall(pro, truth_pro), 4),
                "recall_opponents": round(_recall(opp, truth_opp), 4),
            }
        )
        print(rows[-1]["what"], f"{rows[-1]['seconds_median'] * 1e3:.0f} ms", flush=True)
    parts = {"query gradient": [], "project + whiten + compress": [], "search (both signs)": []}
    for row in range(args.queries):
        query = queries[row : row + 1]
        tick = time.perf_counter()
        grads = engine.query_gradients(query)
        parts["query gradient"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        grads = {n: (w.double(), None if b is None else b.double()) for n, (w, b) in grads.items()}
        vectors = index.encoder.encode(grads)
        parts["project + whiten + compress"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        index.search(vectors, TOP_K)
        parts["search (both signs)"].append(time.perf_counter() - tick)
    for name, times in parts.items():
        rows.append(
            {
                **base,
                "what": f"part: {name}",
                "seconds_median": statistics.median(times),
                "seconds_max": max(times),
                "repeats": len(times),
            }
        )
    append_rows(RESULTS_DIR / f"index_latency_{env['device']}.csv", rows)
    for row in rows:
        row["ms_median"] = round(1e3 * row["seconds_median"], 1)
    columns = ["what", "ms_median", "repeats", "recall_proponents", "recall_opponents"]
    text = [
        "# `topk_influencers` latency with the index (digits, 1,797 images, one query per call)",
        "",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {env['threads']} "
        f"threads, load before {env['load_before']}. Index: {config.compression}, "
        f"{index.dim} {config.storage} values = {index.bytes_per_example} bytes per image, "
        f"{config.search} search. Command: `.venv/bin/python bench/index_latency.py`. "
        "Recall@10 against exact EK-FAC scores of the same queries.",
        "",
        markdown_table(rows, columns),
    ]
    (RESULTS_DIR / f"index_latency_{env['device']}.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
