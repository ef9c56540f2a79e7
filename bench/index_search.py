"""Search-only latency over N stored vectors of the default index size (synthetic): flat, IVF.

Run from the repository root (not collected by pytest):

    .venv/bin/python bench/index_search.py                # Gaussian, N = 250,000, ~10 min
    .venv/bin/python bench/index_search.py --structured   # clustered, IVF at N = 1,000,000

Vectors of the default `IndexConfig` (dim and storage) are quantised exactly as the index
stores them (per-dimension scales from the first 10,000) and searched with the faiss
structures of `fastinf.index.search`. One query per call runs `TrainingIndex.search`'s two
searches (proponents with the query, opponents with its negation), k = 10; the median over
the queries is reported.

Default: i.i.d. Gaussian vectors in the flat structure (peak memory ≈ N × bytes per
example), with the flat scan time extrapolated linearly to 1,000,000 vectors; then IVF
(256 lists, nprobe 4 and 16) with its recall@10 against flat. Gaussian vectors have no
cluster structure, so that recall is a worst case.

--structured: IVF (1,024 lists) over 1,000,000 clustered vectors (16 GB of codes; needs
~19 GB free), with no flat structure beside it. Vector n is s_n·σ_n·(c_{k_n} + e_n): one of
N / 512 random Gaussian centres c_k (entries of variance 1), chosen uniformly; noise e_n of
the same variance (the centre carries half the energy); a random sign σ_n, so that opponents
cluster as proponents do; a log-normal norm factor s_n (log-std 0.5), as per-example
gradient norms vary. Every pass regenerates the same vectors from fixed seeds, 2,048 at a
time; the queries are 12 more draws of the same law. The structure is the one
`SearchIndex.build` makes for search="ivf" (IndexIVFScalarQuantizer, int4 codes pinned to
the stored integers, vectors not residuals, inner product), trained with faiss's spherical
k-means (10 iterations) on the first 20 vectors per list (`SearchIndex.build` takes up to
64 and holds them, as float32, while it adds: 8.6 GB beside the 16 GB of lists), and filled
by faiss's own add (exact assignment to the centroids). Exact
top-10 lists per query and sign are kept while adding, for recall@10. Build time is split
into k-means (train) and assignment + encoding (add); generating and quantising the data is
not part of it.

Rows go to `bench/results/index_search_<device>.csv`; `index_search_<device>.md` shows the
latest run of each mode.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch
from index_common import RESULTS_DIR, append_rows, environment, markdown_table

from fastinf.index import IndexConfig
from fastinf.index.encode import Quantizer
from fastinf.index.search import SearchIndex, _make, _pin_ranges

CHUNK = 8192
QUERIES = 12
TOP_K = 10
TARGET = 1_000_000
NLIST = 256
CALIBRATION = 10_000
# --structured
VECTORS_PER_CENTER = 512
NOISE_STD = 1.0
SCALE_LOG_STD = 0.5
STRUCTURED_CHUNK = 2048  # 0.25 GB per float32 buffer: the IVF lists take the rest of memory
TRAIN_PER_LIST = 20
STRUCTURED_NLIST = 1024
NPROBES = (1, 4, 8, 16, 32, 64)
GAUSSIAN_COLUMNS = ["search", "N", "dim", "storage", "bytes_per_example", "build_seconds"]
GAUSSIAN_COLUMNS += ["ms_median", "recall_vs_flat", "note"]
STRUCTURED_COLUMNS = ["search", "N", "train_seconds", "add_seconds", "ms_median"]
STRUCTURED_COLUMNS += ["recall_proponents", "recall_opponents", "peak_rss_gb"]


def _chunks(total: int, dim: int, quantizer: Quantizer, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, total, CHUNK):
        vectors = torch.randn(min(CHUNK, total - start), dim, generator=generator)
        yield quantizer.values(quantizer.store(vectors))


def _clustered(total: int, centers: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """[rows, dim] float32 chunks s·σ·(centre + noise); the same seed gives the same vectors."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, total, STRUCTURED_CHUNK):
        rows = min(STRUCTURED_CHUNK, total - start)
        cluster = torch.randint(centers.shape[0], (rows,), generator=generator)
        sign = 2.0 * torch.randint(2, (rows,), generator=generator) - 1.0
        norm = torch.exp(SCALE_LOG_STD * torch.randn(rows, generator=generator))
        vectors = torch.randn(rows, centers.shape[1], generator=generator).mul_(NOISE_STD)
        vectors += centers[cluster]
        yield vectors.mul_((sign * norm)[:, None])


def _first(chunks: Iterator, count: int) -> np.ndarray:
    """The first `count` rows of a stream of chunks."""
    taken, held = [], 0
    for chunk in chunks:
        taken.append(np.asarray(chunk))
        held += chunk.shape[0]
        if held >= count:
            break
    return np.concatenate(taken)[:count]


def _fold_top(best: tuple, scores: torch.Tensor, first_row: int) -> tuple:
    """Running top-k (scores, rows) [Q, k] merged with the scores [Q, n] of rows first_row…."""
    rows = torch.arange(first_row, first_row + scores.shape[1]).expand_as(scores)
    merged_scores, merged_rows = torch.cat([best[0], scores], 1), torch.cat([best[1], rows], 1)
    top = merged_scores.topk(TOP_K, dim=1)
    return top.values, merged_rows.gather(1, top.indices)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / TOP_K for f, t in zip(found, truth, strict=True)]))


def _return_freed_memory() -> None:
    """glibc: serve every allocation of 1 MiB or more by mmap. The inverted lists grow by
    reallocation; with the default adaptive threshold the freed buffers fragment the heap
    (~10 % more resident memory than the codes)."""
    with contextlib.suppress(AttributeError):  # not glibc
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _time_searches(index: SearchIndex, queries: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Median seconds of one query's two searches; rows found [Q, k] for +query and −query."""
    times, proponents, opponents = [], [], []
    index.search(queries[:1], TOP_K)  # warm-up
    for row in range(queries.shape[0]):
        tick = time.perf_counter()
        found = index.search(queries[row : row + 1], TOP_K)[1]
        negated = index.search(-queries[row : row + 1], TOP_K)[1]
        times.append(time.perf_counter() - tick)
        proponents.append(found[0])
        opponents.append(negated[0])
    return statistics.median(times), np.stack(proponents), np.stack(opponents)


def gaussian_flat_and_ivf(total: int, base: dict) -> list[dict]:
    """Flat scan (and its extrapolation to TARGET) and IVF over i.i.d. Gaussian vectors."""
    config = IndexConfig()
    dim = config.dim
    generator = torch.Generator().manual_seed(1)
    quantizer = Quantizer.calibrate(config, torch.randn(CALIBRATION, dim, generator=generator))
    queries = quantizer.query(torch.randn(QUERIES, dim, generator=generator))
    command = "bench/index_search.py" + (f" --num-vectors {total}" if total != 250_000 else "")
    base = {**base, "data": "gaussian", "command": command}
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
    median, truth, _ = _time_searches(flat, queries)
    report("flat", build, median, 1.0)
    if total != TARGET:
        note = f"flat scan time × {TARGET:,} / {total:,} (linear in N)"
        report(f"flat, extrapolated to N={TARGET:,}", 0.0, median * TARGET / total, 1.0, note)
    del flat
    ivf = None
    for nprobe in (4, 16):
        ivf_config = dataclasses.replace(config, search="ivf", nlist=NLIST, nprobe=nprobe)
        if ivf is None:
            tick = time.perf_counter()
            ivf = SearchIndex.build(
                ivf_config, dim, total, _chunks(total, dim, quantizer, 0), quantizer.scale_array()
            )
            build = time.perf_counter() - tick
        ivf.index.nprobe = nprobe
        median, found, _ = _time_searches(ivf, queries)
        report(f"ivf nlist={NLIST} nprobe={nprobe}", build, median, _recall(found, truth))
    return rows


def structured_ivf(total: int, nlist: int, base: dict) -> list[dict]:
    """IVF over `total` clustered vectors, recall@10 against exact top-10 kept while adding."""
    _return_freed_memory()
    config = dataclasses.replace(IndexConfig(), search="ivf", nlist=nlist)
    dim = config.dim
    num_centers = max(1, total // VECTORS_PER_CENTER)
    centers = torch.randn(num_centers, dim, generator=torch.Generator().manual_seed(1))
    calibration = _first(_clustered(total, centers, 0), CALIBRATION)
    quantizer = Quantizer.calibrate(config, torch.from_numpy(calibration))
    del calibration
    queries = quantizer.query(next(_clustered(QUERIES, centers, 2)))

    def stored() -> Iterator[np.ndarray]:
        for vectors in _clustered(total, centers, 0):
            yield quantizer.values(quantizer.store(vectors))

    index = _make(config, dim, total)
    tick = time.perf_counter()
    index.train(_first(stored(), TRAIN_PER_LIST * index.nlist))
    train_seconds = time.perf_counter() - tick
    _pin_ranges(index, config.storage, quantizer.scale_array())
    best = {
        sign: (torch.full((QUERIES, TOP_K), -torch.inf), torch.full((QUERIES, TOP_K), -1))
        for sign in (1.0, -1.0)
    }
    add_seconds, tick_all = 0.0, time.perf_counter()
    for values in stored():
        tick = time.perf_counter()
        index.add(values)
        add_seconds += time.perf_counter() - tick
        scores = torch.from_numpy(queries) @ torch.from_numpy(values).T
        for sign in best:
            best[sign] = _fold_top(best[sign], sign * scores, int(index.ntotal) - len(values))
        if index.ntotal % (50 * STRUCTURED_CHUNK) == 0:
            print(f"{index.ntotal:,} added, {time.perf_counter() - tick_all:.0f} s", flush=True)
    command = "bench/index_search.py --structured"
    command += f" --num-vectors {total}" if total != TARGET else ""
    command += f" --nlist {nlist}" if nlist != STRUCTURED_NLIST else ""
    base = {**base, "N": total, "data": "structured", "command": command}
    base |= {"train_seconds": round(train_seconds, 1), "add_seconds": round(add_seconds, 1)}
    searcher = SearchIndex(index, config)
    rows = []
    for nprobe in [nprobe for nprobe in NPROBES if nprobe <= index.nlist]:
        searcher.index.nprobe = nprobe
        median, proponents, opponents = _time_searches(searcher, queries)
        rows.append(
            {
                **base,
                "search": f"ivf nlist={index.nlist} nprobe={nprobe}",
                "ms_median": round(1e3 * median, 1),
                "recall_proponents": round(_recall(proponents, best[1.0][1].numpy()), 3),
                "recall_opponents": round(_recall(opponents, best[-1.0][1].numpy()), 3),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _describe(row: dict) -> str:
    """The paragraph above a run's table."""
    command = row.get("command") or "bench/index_search.py"  # the only run before that column
    text = (
        f"Run {row['run']}, commit {row['git_commit']}, {row['device']}, {row['threads']} faiss "
        f"threads, load before {row['load_before']}. Median over {QUERIES} queries of one "
        f"query's two searches (proponents and opponents), k = {TOP_K}. "
        f"Command: `.venv/bin/python {command}`."
    )
    if row.get("data") != "structured":
        return text
    return text + (
        f" Vectors s·σ·(c + e): {int(row['N']) // VECTORS_PER_CENTER:,} random Gaussian "
        "centres c, noise e of the same variance, a random sign σ, a log-normal norm factor s "
        f"(log-std {SCALE_LOG_STD}); the queries are drawn alike. The structure is "
        "`SearchIndex`'s IVF (int4 codes equal to the stored integers, vectors not residuals), "
        f"its centroids faiss's spherical k-means on the first {TRAIN_PER_LIST} vectors per "
        "list, filled by faiss's add; recall@10 is against the exact top-10 of the same "
        "stored values. These clusters are an assumption: their recall says nothing about "
        "real gradients, whose IVF recall `bench/index_latency.py` measures (digits)."
    )


def write_summary(out: Path, device: str) -> None:
    """The markdown summary: the latest run of each mode, read back from the CSV."""
    with open(out / f"index_search_{device}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    text = ["# Search-only latency, synthetic vectors of the default index size"]
    modes = {
        "gaussian": ("i.i.d. Gaussian vectors, flat and IVF", GAUSSIAN_COLUMNS),
        "structured": ("Clustered vectors, IVF", STRUCTURED_COLUMNS),
    }
    for data, (title, columns) in modes.items():
        mine = [row for row in rows if (row.get("data") or "gaussian") == data]
        if mine:
            latest = max(row["run"] for row in mine)
            mine = [row for row in mine if row["run"] == latest]
            text += ["", f"## {title}", "", _describe(mine[0]), "", markdown_table(mine, columns)]
    (out / f"index_search_{device}.md").write_text("\n".join(text) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-vectors", type=int, help="stored vectors (default 250,000; --structured 10⁶)"
    )
    parser.add_argument("--structured", action="store_true", help="clustered vectors, IVF only")
    parser.add_argument(
        "--nlist", type=int, default=STRUCTURED_NLIST, help="--structured: IVF lists"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args()
    env = environment()
    config = IndexConfig()
    base = {**env, "dim": config.dim, "storage": config.storage}
    base |= {"bytes_per_example": config.bytes_per_example(config.dim)}
    base |= {"threads": faiss.omp_get_max_threads()}
    if args.structured:
        rows = structured_ivf(args.num_vectors or TARGET, args.nlist, base)
    else:
        total = args.num_vectors or 250_000
        rows = gaussian_flat_and_ivf(total, {**base, "N": total})
    append_rows(args.out / f"index_search_{env['device']}.csv", rows)
    write_summary(args.out, env["device"])


if __name__ == "__main__":
    main()
