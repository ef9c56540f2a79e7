"""End-to-end `topk_influencers` latency with the index on the digits model, and its recall.

Run from the repository root (not collected by pytest; ~8 min on a 2-core CPU, plus the
build when the index is not there yet):

    .venv/bin/python bench/index_latency.py [--rebuild]

Builds (or reuses) the default `IndexConfig` index of the 1,797 digits in `--dir` (default
`.fastinf_cache/index_digits`; rebuilt when it was made for other engine settings), timing
the build. Then, for 16 generated queries (`sample_ddpm`, seed 99, 50 steps — not the
queries of `index_recall.py`), one query per call, it times `topk_influencers(query, k=10,
engine=engine)` end to end (query gradient with the engine's K_q draws, projection,
whitening, compression, both searches) without re-rank, with the bounded re-rank (only the
candidates whose place in or out of the top-10 is uncertain at ± z standard deviations of
the index error are re-scored; `rescored_mean` counts them) and with an exact re-rank of
all top-C candidates (the variants alternate query by query), and splits the search-only
call into its parts. Recall@10 of every variant against exact EK-FAC scores (`engine.score` without
the index) is reported beside its latency. Rows go to
`bench/results/index_latency_<device>.csv`, the summary to `index_latency_<device>.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from index_common import RESULTS_DIR, append_rows, environment, write_summary

from fastinf.artifacts import ArtifactMismatchError
from fastinf.engine import default_engine, topk_influencers
from fastinf.index import IndexConfig
from fastinf.index.search import SearchIndex
from fastinf.sampling import sample_ddpm
from fastinf.scoring import ExactScorer

# (label, exact_rerank C, rerank_sigmas z): search only; the bounded re-rank (the default
# and two wider bounds); re-scoring all top-C candidates.
DEFAULT = IndexConfig()
VARIANTS = (
    (" (search only)", 0, 0.0),
    (
        f", bounded re-rank z = {DEFAULT.rerank_sigmas:g} (default), C ≤ {DEFAULT.exact_rerank}",
        DEFAULT.exact_rerank,
        DEFAULT.rerank_sigmas,
    ),
    (", bounded re-rank z = 1.5, C ≤ 32", 32, 1.5),
    (", bounded re-rank z = 2, C ≤ 32", 32, 2.0),
    (" + exact re-rank of all top-15", 15, 0.0),
    (" + exact re-rank of all top-20", 20, 0.0),
)
IVF_LISTS = 42  # ≈ √N for the 1,797 digits
TOP_K = 10


def _recall(found, truth) -> float:
    hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return sum(hits) / len(hits)


def approximate_structures(index, vectors, truth_pro, truth_opp, base) -> list[dict]:
    """Search-only recall and time of IVF and HNSW over the same stored digits vectors."""
    values = index.quantizer.values(index.vectors())
    scale = index.quantizer.scale_array()
    queries = index.quantizer.query(vectors)
    variants = [(f"ivf nlist={IVF_LISTS} nprobe={p}", "ivf", p) for p in (1, 4, 16)]
    variants.append(("hnsw M=32 efSearch=128", "hnsw", 0))
    rows = []
    for label, search, nprobe in variants:
        config = dataclasses.replace(
            index.config, search=search, nlist=IVF_LISTS, nprobe=nprobe or 1
        )
        structure = SearchIndex.build(config, index.dim, index.num_examples, iter([values]), scale)
        times, pro, opp = [], [], []
        for row in range(queries.shape[0]):
            tick = time.perf_counter()
            pro_rows = structure.search(queries[row : row + 1], TOP_K)[1]
            opp_rows = structure.search(-queries[row : row + 1], TOP_K)[1]
            times.append(time.perf_counter() - tick)
            pro += [int(index.order[r]) if r >= 0 else -1 for r in pro_rows[0]]
            opp += [int(index.order[r]) if r >= 0 else -1 for r in opp_rows[0]]
        rows.append(
            {
                **base,
                "what": f"search only, {label}",
                "seconds_median": statistics.median(times),
                "repeats": len(times),
                "recall_proponents": round(_recall(_split(pro), truth_pro), 4),
                "recall_opponents": round(_recall(_split(opp), truth_opp), 4),
            }
        )
    return rows


def _split(flat: list[int]) -> list[list[int]]:
    return [flat[i : i + TOP_K] for i in range(0, len(flat), TOP_K)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".fastinf_cache/index_digits")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--rebuild", action="store_true", help="build the index from scratch")
    args = parser.parse_args()
    env = environment()
    engine = default_engine()
    config = IndexConfig()
    existed = (Path(args.dir) / "index.json").exists() and not args.rebuild
    start = time.perf_counter()
    try:
        engine.build_index(Path(args.dir), config, overwrite=args.rebuild)
    except ArtifactMismatchError:  # built for other engine defaults: start again
        existed = False
        engine.build_index(Path(args.dir), config, overwrite=True)
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
    score = engine.config
    base = {**env, "N": index.num_examples, "dim": index.dim, "storage": config.storage}
    base |= {"compression": config.compression, "bytes_per_example": index.bytes_per_example}
    base |= {"K": score.train_draws, "K_q": score.query_draws}
    base |= {"damping": score.damping, "damping_mode": score.damping_mode}
    what = "reopen the existing index (checks, no rebuild)" if existed else "build the index"
    rows.append({**base, "what": what, "seconds_median": build_seconds, "repeats": 1})
    topk_influencers(queries[:1], k=TOP_K, engine=engine)  # warm-up
    rescored: list[int] = []  # examples re-scored exactly by the index's ExactScorer
    originals = ExactScorer.scores, ExactScorer.topk

    def counted_scores(self, cache, examples):
        rescored.append(len(examples))
        return originals[0](self, cache, examples)

    def counted_topk(self, queries, k=10, **options):
        if options.get("indices") is not None:
            rescored.append(len(options["indices"]))
        return originals[1](self, queries, k, **options)

    ExactScorer.scores, ExactScorer.topk = counted_scores, counted_topk
    # Variants alternate query by query, so a change in machine load hits them all alike.
    times = {variant: [] for variant in VARIANTS}
    found = {variant: ([], []) for variant in VARIANTS}
    counts = {variant: [] for variant in VARIANTS}
    for row in range(args.queries):
        for variant in VARIANTS:
            _, rerank, sigmas = variant
            rescored.clear()
            tick = time.perf_counter()
            result = topk_influencers(
                queries[row : row + 1],
                k=TOP_K,
                engine=engine,
                exact_rerank=rerank,
                rerank_sigmas=sigmas,
            )
            times[variant].append(time.perf_counter() - tick)
            counts[variant].append(sum(rescored))
            found[variant][0].extend(result.proponents.indices.tolist())
            found[variant][1].extend(result.opponents.indices.tolist())
    ExactScorer.scores, ExactScorer.topk = originals
    for variant in VARIANTS:
        label, rerank, sigmas = variant
        rows.append(
            {
                **base,
                "what": f"topk_influencers{label}",
                "exact_rerank": rerank,
                "rerank_sigmas": sigmas,
                "seconds_median": statistics.median(times[variant]),
                "seconds_max": max(times[variant]),
                "repeats": len(times[variant]),
                "rescored_mean": statistics.mean(counts[variant]) if rerank else 0,
                "recall_proponents": round(_recall(found[variant][0], truth_pro), 4),
                "recall_opponents": round(_recall(found[variant][1], truth_opp), 4),
            }
        )
        print(rows[-1]["what"], f"{rows[-1]['seconds_median'] * 1e3:.0f} ms", flush=True)
    parts = {"query gradient": [], "project + whiten + compress": [], "search (both signs)": []}
    query_vectors = []
    for row in range(args.queries):
        query = queries[row : row + 1]
        tick = time.perf_counter()
        grads = engine.query_gradients(query)
        parts["query gradient"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        grads = {n: (w.double(), None if b is None else b.double()) for n, (w, b) in grads.items()}
        vectors = index.encoder.encode(grads)
        parts["project + whiten + compress"].append(time.perf_counter() - tick)
        query_vectors.append(vectors)
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
    rows += approximate_structures(index, torch.cat(query_vectors), truth_pro, truth_opp, base)
    append_rows(RESULTS_DIR / f"index_latency_{env['device']}.csv", rows)
    for row in rows:
        row["ms_median"] = round(1e3 * row["seconds_median"], 1)
    columns = ["what", "ms_median", "repeats", "rescored_mean", "recall_proponents"]
    columns += ["recall_opponents"]
    write_summary(
        f"index_latency_{env['device']}",
        "`topk_influencers` latency with the index (digits, 1,797 images, one query per call)",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {env['threads']} "
        f"threads, load before {env['load_before']}. Index: {config.compression}, "
        f"{index.dim} {config.storage} values = {index.bytes_per_example} bytes per image, "
        f"{config.search} search; K = {score.train_draws}, K_q = {score.query_draws}, damping "
        f"{score.damping_mode} {score.damping:g}. Command: "
        "`.venv/bin/python bench/index_latency.py`. Recall@10 against exact EK-FAC scores of "
        "the same queries; the variants alternate query by query.",
        rows,
        columns,
    )


if __name__ == "__main__":
    main()
