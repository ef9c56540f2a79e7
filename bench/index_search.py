"""Search-only latency over 1,000,000 stored vectors of the default index size (synthetic).

Run from the repository root (not collected by pytest; ~3 min on a 2-core CPU, plus ~4 min
with `--ivf`):

    .venv/bin/python bench/index_search.py [--ivf]

Synthetic Gaussian vectors of the default `IndexConfig` (dim and storage) are quantised
exactly as the index stores them (per-dimension int8 scales from the first 10,000) and
added to the default flat faiss structure in chunks (peak memory ≈ the structure itself:
N × bytes per example). One query per call, `TrainingIndex.search`'s two searches
(proponents with the query, opponents with its negation), k = 10; the median over 30
queries is reported. With `--ivf`, also IVF (nlist 1,024, nprobe 16/64) with its recall@10
against flat on the same queries; Gaussian vectors have no cluster structure, so this
recall is a worst case. Rows go to `bench/results/index_search_<device>.csv`, the summary
to `index_search_<device>.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import faiss
import numpy as np
import torch
from index_common import RESULTS_DIR, append_rows, environment, markdown_table

from fastinf.index import IndexConfig
from fastinf.index.encode import Quantizer
from fastinf.index.search import SearchIndex

CHUNK = 50_000
QUERIES = 30
TOP_K = 10


def _chunks(total: int, dim: int, quantizer: Quantizer, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, total, CHUNK):
        rows = min(CHUNK, total - start)
        vectors = torch.randn(rows, dim, generator=generator)
        yield quantizer.values(quantizer.store(vectors))


def _time_searches(index: SearchIndex, queries: np.ndarray) -> tuple[float, np.ndarray]:
    times, found = [], []
    index.search(queries[:1], TOP_K)  # warm-up
    for row in range(queries.shape[0]):
        tick = time.perf_counter()
        rows = index.search(queries[row : row + 1], TOP_K)[1]
        index.search(-queries[row : row + 1], TOP_K)
        times.append(time.perf_counter() - tick)
        found.append(rows[0])
    return statistics.median(times), np.stack(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-vectors", type=int, default=1_000_000)
    parser.add_argument("--ivf", action="store_true", help="also build and time IVF")
    args = parser.parse_args()
    env = environment()
    config = IndexConfig()
    dim, total = config.dim, args.num_vectors
    generator = torch.Generator().manual_seed(1)
    quantizer = Quantizer.calibrate(config, torch.randn(10_000, dim, generator=generator))
    queries = torch.randn(QUERIES, dim, generator=generator)
    queries = quantizer.query(queries)
    base = {**env, "N": total, "dim": dim, "storage": config.storage}
    base |= {
        "bytes_per_example": dim * config.bytes_per_value,
        "threads": faiss.omp_get_max_threads(),
    }
    rows = []
    tick = time.perf_counter()
    flat = SearchIndex.build(
        config, dim, total, _chunks(total, dim, quantizer, 0), quantizer.scale_array()
    )
    build = time.perf_counter() - tick
    median, truth = _time_searches(flat, queries)
    rows.append(
        {
            **base,
            "search": "flat",
            "build_seconds": round(build, 1),
            "ms_median": 1e3 * median,
            "recall_vs_flat": 1.0,
        }
    )
    print(rows[-1], flush=True)
    if args.ivf:
        del flat
        for nprobe in (16, 64):
            ivf_config = dataclasses.replace(config, search="ivf", nlist=1024, nprobe=nprobe)
            if nprobe == 16:
                tick = time.perf_counter()
                ivf = SearchIndex.build(
                    ivf_config,
                    dim,
                    total,
                    _chunks(total, dim, quantizer, 0),
                    quantizer.scale_array(),
                )
                build = time.perf_counter() - tick
            ivf.index.nprobe = nprobe
            median, found = _time_searches(ivf, queries)
            recall = np.mean(
                [len(set(f) & set(t)) / TOP_K for f, t in zip(found, truth, strict=True)]
            )
            rows.append(
                {
                    **base,
                    "search": f"ivf nlist=1024 nprobe={nprobe}",
                    "build_seconds": round(build, 1),
                    "ms_median": 1e3 * median,
                    "recall_vs_flat": round(float(recall), 3),
                }
            )
            print(rows[-1], flush=True)
    append_rows(RESULTS_DIR / f"index_search_{env['device']}.csv", rows)
    columns = [
        "search",
        "N",
        "dim",
        "storage",
        "bytes_per_example",
        "build_seconds",
        "ms_median",
        "recall_vs_flat",
    ]
    text = [
        "# Search-only latency, synthetic vectors of the default index size",
        "",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {base['threads']} faiss "
        f"threads, load before {env['load_before']}. Median over {QUERIES} queries of one "
        "query's two searches (proponents and opponents), k = 10. Command: "
        "`.venv/bin/python bench/index_search.py" + (" --ivf`." if args.ivf else "`."),
        "",
        markdown_table(rows, columns),
    ]
    (RESULTS_DIR / f"index_search_{env['device']}.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
