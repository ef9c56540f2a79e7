"""Search-only latency over N stored vectors of the default index size (synthetic), and IVF.

Run from the repository root (not collected by pytest; ~10 min on a 2-core CPU):

    .venv/bin/python bench/index_search.py                 # N = 250,000 (4 GB of codes)
    .venv/bin/python bench/index_search.py --num-vectors 1000000   # needs ~20 GB free

Synthetic Gaussian vectors of the default `IndexConfig` (dim and storage) are quantised
exactly as the index stores them (per-dimension scales from the first 10,000) and added to
the default flat faiss structure in chunks (peak memory ≈ the structure: N × bytes per
example). One query per call runs `TrainingIndex.search`'s two searches (proponents with the
query, opponents with its negation), k = 10; the median over the queries is reported, and
for the flat scan, which is linear in N, also its extrapolation to 1,000,000 vectors. Then
IVF (256 lists — k-means over 32,768-dimensional vectors is what bounds the build on 2
cores —, nprobe 4 and 16) with its recall@10 against flat on the same queries; Gaussian
vectors have no cluster structure, so that recall is a worst case.
Rows go to `bench/results/index_search_<device>.csv`, the summary to `index_search_<device>.md`.
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

CHUNK = 8192
QUERIES = 12
TOP_K = 10
TARGET = 1_000_000
NLIST = 256


def _chunks(total: int, dim: int, quantizer: Quantizer, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, total, CHUNK):
        vectors = torch.randn(min(CHUNK, total - start), dim, generator=generator)
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
    parser.add_argument("--num-vectors", type=int, default=250_000)
    args = parser.parse_args()
    env = environment()
    config = IndexConfig()
    dim, total = config.dim, args.num_vectors
    generator = torch.Generator().manual_seed(1)
    quantizer = Quantizer.calibrate(config, torch.randn(10_000, dim, generator=generator))
    queries = quantizer.query(torch.randn(QUERIES, dim, generator=generator))
    base = {**env, "N": total, "dim": dim, "storage": config.storage}
    base |= {"bytes_per_example": config.bytes_per_example(dim)}
    base |= {"threads": faiss.omp_get_max_threads()}
    rows = []

    def report(search: str, build: float, median: float, recall: float, note: str = "") -> None:
        rows.append(
            {
                **base,
                "search": search,
                "build_seconds": round(build, 1),
                "ms_median": round(1e3 * median, 1),
                "recall_vs_flat": round(recall, 3),
                "note": note,
            }
        )
        print(rows[-1], flush=True)

    tick = time.perf_counter()
    flat = SearchIndex.build(
        config, dim, total, _chunks(total, dim, quantizer, 0), quantizer.scale_array()
    )
    build = time.perf_counter() - tick
    median, truth = _time_searches(flat, queries)
    report("flat", build, median, 1.0)
    if total != TARGET:
        note = f"flat scan time × {TARGET:,} / {total:,} (linear in N)"
        report(f"flat, extrapolated to N={TARGET:,}", 0.0, median * TARGET / total, 1.0, note)
    del flat
    nlist = NLIST
    ivf = None
    for nprobe in (4, 16):
        ivf_config = dataclasses.replace(config, search="ivf", nlist=nlist, nprobe=nprobe)
        if ivf is None:
            tick = time.perf_counter()
            ivf = SearchIndex.build(
                ivf_config, dim, total, _chunks(total, dim, quantizer, 0), quantizer.scale_array()
            )
            build = time.perf_counter() - tick
        ivf.index.nprobe = nprobe
        median, found = _time_searches(ivf, queries)
        hits = [len(set(f) & set(t)) / TOP_K for f, t in zip(found, truth, strict=True)]
        report(f"ivf nlist={nlist} nprobe={nprobe}", build, median, float(np.mean(hits)))
    append_rows(RESULTS_DIR / f"index_search_{env['device']}.csv", rows)
    columns = ["search", "N", "dim", "storage", "bytes_per_example", "build_seconds"]
    columns += ["ms_median", "recall_vs_flat", "note"]
    command = "`.venv/bin/python bench/index_search.py`"
    if total != 250_000:
        command = f"`.venv/bin/python bench/index_search.py --num-vectors {total}`"
    text = [
        "# Search-only latency, synthetic vectors of the default index size",
        "",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {base['threads']} faiss "
        f"threads, load before {env['load_before']}. Median over {QUERIES} queries of one "
        f"query's two searches (proponents and opponents), k = {TOP_K}. Command: {command}.",
        "",
        markdown_table(rows, columns),
    ]
    (RESULTS_DIR / f"index_search_{env['device']}.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
