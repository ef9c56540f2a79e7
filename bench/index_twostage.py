"""Two-stage search (search="twostage"): recall on ≥ 100,000 real gradient vectors, latency
and memory at 1,000,000.

Run from the repository root (not collected by pytest):

    .venv/bin/python bench/index_twostage.py real        # ~15 min, after the index exists
    .venv/bin/python bench/index_twostage.py synthetic   # N = 1,000,000: ~40 min, 19 GB disk

`real`: 100,000 deformed digits (`bench/deformed_digits.py`: seeded affine + elastic warps
of the 1,797 sklearn digits) are indexed with the shipped digits DDPM and its EK-FAC
(`default_engine()`), the default `IndexConfig` (countsketch, 32,768 int4 values = 16 KB per
image) and K = 4 train draws per image instead of the default 32 (a build at K = 32 would
take hours on 2 cores); the index is cached in `.fastinf_cache/index_twostage_digits100000`
(1.6 GB, reused when present; build it on both cores with `OMP_NUM_THREADS=1 .venv/bin/python
-m torch.distributed.run --nproc_per_node=2 bench/index_twostage.py real --build-only`, ~50
min on a loaded machine). 64 generated queries (`sample_ddpm`, seed 2024, 50 steps; K_q =
128) are encoded like any query. The truth is the flat search over the same stored vectors
(`TrainingIndex.search` with search="flat"), per sign, k = 10. Then:

- first stage alone: for each projection (pca fitted on 4,096 evenly spread stored vectors,
  as a build does; countsketch) and sketch size, every row's fp16 sketch is computed from
  the shards exactly as a build stores it, and the top-C rows of an exhaustive search over
  the sketches (both signs) are taken: recall@10 = the share of the flat top-10 found in
  the union of the two candidate lists (the second stage scores the union exactly, so this
  is the two-stage recall of an exact first stage);
- the two stages together: `TwoStageSearch` over the sketches in each faiss structure
  (flat, hnsw, ivf, built as `_finalize` builds them), its candidates' stored vectors read
  from the memory-mapped shards; recall@10 per sign and ms per query (both signs, one query
  per call, median and p95).

`synthetic`: 1,000,000 vectors drawn to match the real ones (see `synthetic_vectors`),
written as an index's shards and sketches (16 GB + the sketches); the first-stage structure
is built as a build's `_finalize` does and searched by `TwoStageSearch` with the 64 real
queries: build time, peak RSS, disk, ms per query (median, p95) with the shards in the page
cache and with them evicted before each query, and the recall against an exact scan made
while the vectors are written. 10,000,000 vectors (160 GB of codes) do not fit the disk.

Rows go to `bench/results/index_twostage.csv`; `index_twostage.md` is rewritten from them.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import mmap
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from index_common import REPO_ROOT, RESULTS_DIR, append_rows, environment, markdown_table

from fastinf.config import ScoreConfig
from fastinf.engine import InfluenceEngine, default_engine
from fastinf.index import IndexConfig, TrainingIndex
from fastinf.index.build import fit_sample
from fastinf.index.encode import Quantizer, as_float64
from fastinf.index.search import SearchIndex
from fastinf.index.store import BuildPlan, IndexStore
from fastinf.index.twostage import FirstStageProjection, TwoStageSearch, principal_directions
from fastinf.sampling import sample_ddpm

IMAGES = 100_000
DRAWS = 4
QUERIES = 64
QUERY_SEED = 2024
TOP_K = 10
CACHE = REPO_ROOT / ".fastinf_cache"
CSV_PATH = RESULTS_DIR / "index_twostage.csv"


# -- the real index ---------------------------------------------------------------------------
def real_engine(count: int) -> InfluenceEngine:
    """The digits DDPM and its EK-FAC over `count` deformed digits, K = DRAWS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deformed_digits import deformed_digits

    base = default_engine()
    engine = InfluenceEngine(
        base.model,
        base.schedule,
        deformed_digits(count),
        config=ScoreConfig(train_draws=DRAWS),
    )
    engine.curvature = base.curvature  # fitted on the 1,797 digits the model learnt
    return engine


def index_dir(count: int) -> Path:
    return CACHE / f"index_twostage_digits{count}"


def real_index(engine: InfluenceEngine, count: int) -> TrainingIndex:
    """The default-config index of the deformed digits (built, or resumed, when missing)."""
    directory = index_dir(count)
    tick = time.perf_counter()
    engine.build_index(directory, IndexConfig(), load=False)
    print(f"index ready in {time.perf_counter() - tick:.0f} s", flush=True)
    return TrainingIndex.load(directory, engine.source, engine.curvature, verify=False)


def query_vectors(engine: InfluenceEngine, index: TrainingIndex, count: int) -> np.ndarray:
    """[count, dim] float32 query vectors of generated samples (cached beside the index)."""
    path = CACHE / f"index_twostage_queries{count}_seed{QUERY_SEED}.npy"
    if path.exists():
        return np.load(path)
    samples = sample_ddpm(
        engine.model, engine.schedule, count, seed=QUERY_SEED, num_inference_steps=50
    )
    source = engine.source
    parts = []
    for start in range(0, count, 8):
        block = source.query_block(samples[start : start + 8])
        grads = source.gradients(block, source.measurement(), source.query_spec())
        parts.append(index.encoder.encode(as_float64(grads)))
    vectors = index.quantizer.query(torch.cat(parts))
    np.save(path, vectors)
    return vectors


def flat_truth(index: TrainingIndex, queries: np.ndarray, count: int) -> dict[float, np.ndarray]:
    """Rows [Q, TOP_K] of the flat search over the stored vectors, per sign (cached)."""
    path = CACHE / f"index_twostage_truth{count}_queries{len(queries)}.npz"
    if path.exists():
        saved = np.load(path)
        return {1.0: saved["proponents"], -1.0: saved["opponents"]}
    flat = index.search_index
    rows = {sign: flat.search(sign * queries, TOP_K)[1] for sign in (1.0, -1.0)}
    np.savez(path, proponents=rows[1.0], opponents=rows[-1.0])
    return rows


def decoded_shards(index: TrainingIndex):
    """Each shard's stored vectors as searched (float32 [rows, dim])."""
    for values in index.shards:
        yield index.quantizer.values(values)


def fit_rows(index: TrainingIndex, count: int) -> np.ndarray:
    """Stored vectors of the build's `fit_sample` (the build order is the row order here)."""
    rows = fit_sample(np.arange(index.num_examples), count)
    starts = np.cumsum([0] + [len(values) for values in index.shards])
    shard = np.searchsorted(starts, rows, side="right") - 1
    return np.concatenate(
        [
            index.quantizer.values(index.shards[which][rows[shard == which] - starts[which]])
            for which in np.unique(shard)
        ]
    )


def projections(index: TrainingIndex, fitted: np.ndarray, basis: torch.Tensor) -> dict:
    """Per (projection, dim): the build's `FirstStageProjection` (scale set on `fitted`)."""
    out = {}
    for kind, dims in (("pca", PCA_DIMS), ("countsketch", COUNTSKETCH_DIMS)):
        for dim in dims:
            config = twostage_config(dim, projection=kind)
            rows = None if kind != "pca" else basis[:dim]
            unscaled = FirstStageProjection(config, index.dim, basis=rows)
            scale = FirstStageProjection.scale_for(unscaled.project(fitted))
            out[kind, dim] = FirstStageProjection(config, index.dim, scale, rows)
    return out


def twostage_config(dim: int, **options) -> IndexConfig:
    projection = options.pop("projection", "pca")
    return IndexConfig(
        search="twostage", first_stage_dim=dim, first_stage_projection=projection, **options
    )


def union_recall(plus, minus, truth) -> dict[str, float]:
    """Share of the flat top-k of each sign inside the union of a query's candidates."""
    out = {}
    for sign, name in ((1.0, "proponents"), (-1.0, "opponents")):
        hits = [
            np.isin(truth[sign][row], np.union1d(plus[row], minus[row])).mean()
            for row in range(len(plus))
        ]
        out[f"recall_{name}"] = round(float(np.mean(hits)), 4)
        out[f"recall_{name}_min"] = round(float(np.min(hits)), 4)
    return out


def exhaustive_rows(projection, sketches, queries, truth, base) -> list[dict]:
    """Recall of an exact first stage (every sketch scored) for each candidate count."""
    everything = torch.from_numpy(np.concatenate(sketches).astype(np.float32))
    scores = torch.from_numpy(projection.project(queries)) @ everything.T
    rows = []
    for count in EXHAUSTIVE_CANDIDATES:
        plus = scores.topk(count, dim=1).indices.numpy()
        minus = (-scores).topk(count, dim=1).indices.numpy()
        rows.append(
            {
                **base,
                "table": "first stage alone (exhaustive)",
                "projection": projection.kind,
                "first_stage_dim": projection.sketch_dim,
                "structure": "exhaustive",
                "candidates": count,
                **union_recall(plus, minus, truth),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _found_recall(found: list[np.ndarray], truth: np.ndarray) -> tuple[float, float]:
    hits = [np.isin(t, f).mean() for f, t in zip(found, truth, strict=True)]
    return round(float(np.mean(hits)), 4), round(float(np.min(hits)), 4)


def time_two_stage(search: TwoStageSearch, queries, truth, count: int, prepare=None) -> dict:
    """One query per call: ms per query (both signs, median and p95), recall@10 per sign,
    and the first stage's time (timed right after the whole search). `prepare(query)` runs
    untimed before each query (None: one warm-up search before all of them)."""
    if prepare is None:
        search.search(queries[:1], TOP_K, count)  # warm-up
    total, first, plus, minus = [], [], [], []
    for row in range(len(queries)):
        query = queries[row : row + 1]
        if prepare is not None:
            prepare(query)
        tick = time.perf_counter()
        (_, pro), (_, opp) = search.search(query, TOP_K, count)
        total.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        search.candidates(query, count)
        first.append(time.perf_counter() - tick)
        plus.append(pro[0])
        minus.append(opp[0])
    recall_pro, recall_pro_min = _found_recall(plus, truth[1.0])
    recall_opp, recall_opp_min = _found_recall(minus, truth[-1.0])
    return {
        "candidates": count,
        "ms_median": round(1e3 * statistics.median(total), 1),
        "ms_p95": round(1e3 * float(np.percentile(total, 95)), 1),
        "first_stage_ms_median": round(1e3 * statistics.median(first), 1),
        "recall_proponents": recall_pro,
        "recall_opponents": recall_opp,
        "recall_proponents_min": recall_pro_min,
        "recall_opponents_min": recall_opp_min,
    }


def first_stage_structure(config: IndexConfig, sketches: list[np.ndarray], total: int):
    """The faiss structure `_finalize` builds over the sketches, and its build seconds."""
    tick = time.perf_counter()
    batches = (np.asarray(part, dtype=np.float32) for part in sketches)
    search = SearchIndex.build(config.first_stage_config(), config.first_stage_dim, total, batches)
    return search, time.perf_counter() - tick


def structure_rows(index, projection, sketches, queries, truth, base) -> list[dict]:
    """Both stages: each faiss structure over the sketches, then the stored vectors."""
    rows = []
    dim = projection.sketch_dim
    for label, options, counts in STRUCTURES[dim]:
        options = {"first_stage_search": "hnsw", **options}
        config = twostage_config(dim, **options)
        structure, seconds = first_stage_structure(config, sketches, index.num_examples)
        search = TwoStageSearch(
            structure, projection, index.shards, config, index.quantizer.scale_array()
        )
        for count in counts:
            rows.append(
                {
                    **base,
                    "table": "two stages",
                    "projection": projection.kind,
                    "first_stage_dim": dim,
                    "structure": label,
                    "build_seconds": round(seconds, 1),
                    **time_two_stage(search, queries, truth, count),
                }
            )
            print(rows[-1], flush=True)
        del search, structure
    return rows


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# -- the spectrum of the real vectors, for the synthetic ones -------------------------------
def spectrum(index, basis, fitted, queries, wide_stats) -> dict:
    """What `synthetic_vectors` draws from (saved beside the index):

    - `mu` [d]: mean over rows of (P v)_i² / ‖v‖², the share of a vector's energy on each
      principal direction (d = the default first_stage_dim);
    - `norm`, `captured` [N]: each real row's ‖v‖ and ‖P v‖ / ‖v‖ (resampled in pairs);
    - `query_sketch` [Q, d], `query_residual` [Q]: the real queries' P q and ‖q − PᵀP q‖;
    - `d_eff`: 1 / mean c², c = ⟨q_⊥, v_⊥⟩ / (‖q_⊥‖ ‖v_⊥‖) over the fitted rows and the
      queries: the dimension of an isotropic residual whose inner products spread as much
      as the real residuals' do.
    """
    sketch = basis.double()
    rows = torch.from_numpy(fitted).double()
    query = torch.from_numpy(queries).double()
    query_sketch, row_sketch = query @ sketch.T, rows @ sketch.T
    residual_scores = query @ rows.T - query_sketch @ row_sketch.T
    query_residual = (query.square().sum(1) - query_sketch.square().sum(1)).clamp_min(0).sqrt()
    row_residual = (rows.square().sum(1) - row_sketch.square().sum(1)).clamp_min(0).sqrt()
    cosines = residual_scores / (query_residual[:, None] * row_residual[None, :])
    cosines = cosines[:, row_residual > 0]  # rows rounded to 0 have no residual direction
    return {
        "mu": wide_stats["mu"],
        "zero_rows": wide_stats["zero_rows"],
        "norm": wide_stats["norm"],
        "captured": wide_stats["captured"],
        "query_sketch": query_sketch.float().numpy(),
        "query_residual": query_residual.float().numpy(),
        "d_eff": float(1.0 / cosines.square().mean()),
        "residual_cosine_mean": float(cosines.mean()),
    }


def spectrum_path(count: int) -> Path:
    return CACHE / f"index_twostage_spectrum{count}.npz"


# -- main: real ------------------------------------------------------------------------------
PCA_DIMS = (256, 512, 1024, 1536, 2048)
COUNTSKETCH_DIMS = (1024, 4096)
EXHAUSTIVE_CANDIDATES = (250, 500, 1000, 2000, 4000, 8000)
FIT_EXAMPLES = IndexConfig.first_stage_fit
STRUCTURES = {
    2048: [
        ("flat", dict(first_stage_search="flat"), (500, 1000, 2000)),
        ("hnsw M=16 ef=C", dict(hnsw_neighbors=16, first_stage_ef_search=1), (1000, 2000)),
        ("hnsw M=32 ef=C", dict(first_stage_ef_search=1), (500, 1000, 2000)),
        ("hnsw M=32 ef=2000", dict(first_stage_ef_search=2000), (1000,)),
        ("hnsw M=32 ef=4000", dict(first_stage_ef_search=4000), (1000, 1500)),
        ("hnsw M=48 ef=4000", dict(hnsw_neighbors=48, first_stage_ef_search=4000), (1000,)),
        ("ivf nlist=4√N nprobe=128", dict(first_stage_search="ivf", nprobe=128), (1000,)),
    ],
    1024: [("hnsw M=32 ef=C", dict(first_stage_ef_search=1), (2000, 4000))],
}


def run_real(count: int, build_only: bool, spectrum_only: bool = False) -> list[dict]:
    rank = int(os.environ.get("RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        # A build of hours: a barrier must outwait the slowest rank's share.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    engine = real_engine(count)
    index = real_index(engine, count)
    if build_only or rank != 0:
        return []
    env = environment()
    base = {**env, "phase": "real", "N": index.num_examples, "K": DRAWS}
    base |= {"dim": index.dim, "storage": index.config.storage, "queries": QUERIES}
    queries = query_vectors(engine, index, QUERIES)
    tick = time.perf_counter()
    truth = None if spectrum_only else flat_truth(index, queries, count)
    print(f"flat truth in {time.perf_counter() - tick:.0f} s", flush=True)
    index.search_index = None  # the flat structure (1.6 GB) is not needed any more
    fitted = fit_rows(index, FIT_EXAMPLES)
    basis = principal_directions(fitted, max(PCA_DIMS))
    chosen = projections(index, fitted, basis)
    sketches, stats = all_sketches_with_stats(index, chosen)
    np.savez(spectrum_path(count), **spectrum(index, basis, fitted, queries, stats))
    del fitted
    if spectrum_only:
        return []
    rows = []
    for key, projection in chosen.items():
        rows += exhaustive_rows(projection, sketches[key], queries, truth, base)
    for dim in STRUCTURES:
        rows += structure_rows(
            index, chosen["pca", dim], sketches["pca", dim], queries, truth, base
        )
    return rows


def all_sketches_with_stats(index: TrainingIndex, chosen: dict):
    """`all_sketches`, plus each row's ‖v‖ and ‖P v‖/‖v‖ and the mean (P v)²/‖v‖² on
    the default first_stage_dim principal directions (for `spectrum`)."""
    dim = IndexConfig.first_stage_dim
    norms, captured, mu = [], [], torch.zeros(dim, dtype=torch.float64)
    nonzero = 0
    sketches = {key: [] for key in chosen}
    widest = chosen["pca", max(PCA_DIMS)]
    for values in decoded_shards(index):
        wide = torch.from_numpy(values) @ widest.basis.T
        norm = torch.from_numpy(values).double().norm(dim=1)
        part = wide[:, :dim].double()
        # A row whose every value rounds to 0 in int4 has no direction: captured 0, and
        # it does not enter the energy shares.
        safe = norm.clamp_min(1e-30)
        norms.append(norm)
        captured.append(torch.where(norm > 0, part.norm(dim=1) / safe, 0.0))
        mu += (part.square() / safe.square()[:, None])[norm > 0].sum(0)
        nonzero += int((norm > 0).sum())
        for (kind, size), projection in chosen.items():
            if kind == "pca":
                sketch = (wide[:, :size] * projection.scale).numpy().astype(np.float16)
            else:
                sketch = projection.sketch(values)
            sketches[kind, size].append(sketch)
    norms = torch.cat(norms)
    stats = {
        "norm": norms.numpy(),
        "captured": torch.cat(captured).numpy(),
        "mu": (mu / nonzero).numpy(),
        "zero_rows": len(norms) - nonzero,
    }
    return sketches, stats


# -- main: synthetic -------------------------------------------------------------------------
SYNTHETIC = 1_000_000
SYNTHETIC_CALIBRATION = IndexConfig.calibration_examples


def synthetic_vectors(spectrum: dict, rows: int, stored_dim: int, generator) -> torch.Tensor:
    """[rows, stored_dim] float32 vectors drawn like the real stored vectors.

    In a basis whose first d coordinates are the principal directions (the synthetic
    index's P = [I_d 0], what a pca fit of these vectors finds): a real row is drawn at
    random for its norm s = ‖v‖ and captured share f = ‖P v‖/‖v‖; the first d coordinates
    are Gaussian with the real per-direction energy shares `mu`, scaled to norm s·f; the
    residual is isotropic Gaussian on the next `d_eff` coordinates, scaled to norm
    s·√(1 − f²), so that its inner products with a query spread as the real residuals' do;
    the remaining coordinates are 0.
    """
    mu = torch.from_numpy(spectrum["mu"]).float()
    dim, residual_dim = len(mu), int(spectrum["residual_dim"])
    pick = torch.randint(len(spectrum["norm"]), (rows,), generator=generator)
    norm = torch.from_numpy(spectrum["norm"]).float()[pick]
    captured = torch.from_numpy(spectrum["captured"]).float()[pick]
    head = torch.randn(rows, dim, generator=generator) * mu.sqrt()
    head *= (norm * captured / head.norm(dim=1))[:, None]
    tail = torch.randn(rows, residual_dim, generator=generator)
    tail *= (norm * (1 - captured.square()).clamp_min(0).sqrt() / tail.norm(dim=1))[:, None]
    out = torch.zeros(rows, stored_dim)
    out[:, :dim], out[:, dim : dim + residual_dim] = head, tail
    return out


def synthetic_queries(spectrum: dict, stored_dim: int, generator) -> np.ndarray:
    """The real queries in the synthetic basis: P q, then ‖q_⊥‖ on a random residual direction."""
    sketch = torch.from_numpy(spectrum["query_sketch"])
    dim, residual_dim = sketch.shape[1], int(spectrum["residual_dim"])
    direction = torch.randn(len(sketch), residual_dim, generator=generator)
    direction /= direction.norm(dim=1, keepdim=True)
    out = torch.zeros(len(sketch), stored_dim)
    out[:, :dim] = sketch
    out[:, dim : dim + residual_dim] = (
        torch.from_numpy(spectrum["query_residual"])[:, None] * direction
    )
    return out.numpy()


def _evict(shards: list[np.ndarray]) -> None:
    """Drop the shards' pages from this process and from the page cache (only these files)."""
    for values in shards:
        values._mmap.madvise(mmap.MADV_DONTNEED)
        fd = os.open(values.filename, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_synthetic(total: int, keep: bool, spectrum_images: int = IMAGES) -> list[dict]:
    saved = np.load(spectrum_path(spectrum_images))
    spectrum = {key: saved[key] for key in saved.files}
    config = IndexConfig(search="twostage")
    dim, stored_dim = config.first_stage_dim, config.dim
    spectrum["residual_dim"] = min(2 * round(spectrum["d_eff"] / 2), stored_dim - dim)
    directory = CACHE / f"index_twostage_synthetic{total}"
    store = IndexStore(directory)
    store.remove()
    generator = torch.Generator().manual_seed(7)
    queries = synthetic_queries(spectrum, stored_dim, generator)
    calibration = synthetic_vectors(spectrum, SYNTHETIC_CALIBRATION, stored_dim, generator)
    quantizer = Quantizer.calibrate(config, calibration)
    basis = torch.eye(dim, stored_dim)
    projection = FirstStageProjection(config, stored_dim, basis=basis)
    scale = FirstStageProjection.scale_for(
        projection.project(quantizer.values(quantizer.store(calibration)))
    )
    projection = FirstStageProjection(config, stored_dim, scale, basis)
    nonzero = dim + int(spectrum["residual_dim"])  # even: whole bytes of int4 codes
    head = Quantizer(config.storage, quantizer.scale[:nonzero])
    query_part = torch.from_numpy(queries[:, :nonzero]).double()
    best = {
        sign: (
            torch.full((len(queries), TOP_K), -torch.inf, dtype=torch.float64),
            torch.full((len(queries), TOP_K), -1),
        )
        for sign in (1.0, -1.0)
    }
    plan = BuildPlan(total, config.shard_size)
    tick = time.perf_counter()
    for shard in plan.shards():
        vectors = synthetic_vectors(spectrum, shard.rows, stored_dim, generator)
        stored = quantizer.store(vectors)
        # The nonzero columns as the search sees them (the rest decode to exactly 0).
        decoded = torch.from_numpy(head.values(stored[:, : nonzero // 2]))
        sketches = (decoded[:, :dim] * scale).numpy().astype(np.float16)
        scores = (decoded.double() @ query_part.T).T
        for sign in best:
            merged = torch.cat([best[sign][0], sign * scores], 1)
            ids = torch.cat(
                [best[sign][1], torch.arange(shard.start, shard.stop).expand(len(queries), -1)], 1
            )
            top = merged.topk(TOP_K, dim=1)
            best[sign] = (top.values, ids.gather(1, top.indices))
        store.write_shard(shard, stored, "synthetic", sketches)
        if shard.number % 100 == 0:
            print(f"{shard.stop:,} written, {time.perf_counter() - tick:.0f} s", flush=True)
    write_seconds = time.perf_counter() - tick
    records = [json.loads(store.record_path(s.number).read_text()) for s in plan.shards()]
    shards = [store.open_shard(record, verify=False) for record in records]
    sketch_files = [store.open_sketches(record, dim, verify=False) for record in records]
    structure, build_seconds = first_stage_structure(config, sketch_files, total)
    rss_after_build = peak_rss_gb()
    search = TwoStageSearch(structure, projection, shards, config, quantizer.scale_array())
    truth = {sign: best[sign][1].numpy() for sign in best}
    disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**30
    env = environment()
    base = {**env, "phase": "synthetic", "N": total, "dim": stored_dim, "storage": config.storage}
    base |= {"queries": len(queries), "projection": "pca (ideal)", "first_stage_dim": dim}
    base |= {
        "structure": f"hnsw M={config.hnsw_neighbors}",
        "write_seconds": round(write_seconds, 1),
    }
    base |= {"build_seconds": round(build_seconds, 1), "disk_gb": round(disk, 2)}
    base |= {"residual_dim": int(spectrum["residual_dim"]), "spectrum_images": spectrum_images}
    rows = []
    for count in SYNTHETIC_CANDIDATES:
        for cache in ("cached", "evicted"):
            timed = time_synthetic(search, queries, truth, count, shards, cache)
            rows.append(
                {
                    **base,
                    "table": "synthetic",
                    "page_cache": cache,
                    **timed,
                    "peak_rss_gb": max(rss_after_build, peak_rss_gb()),
                }
            )
            print(rows[-1], flush=True)
    if not keep:
        store.remove()
    return rows


SYNTHETIC_CANDIDATES = (1000, 2000)


def time_synthetic(search, queries, truth, count, shards, cache: str) -> dict:
    """`time_two_stage` with the candidates' pages cached (each query run once untimed
    first) or evicted from the page cache before each query."""
    if cache == "cached":
        return time_two_stage(
            search, queries, truth, count, lambda query: search.search(query, TOP_K, count)
        )
    return time_two_stage(search, queries, truth, count, lambda query: _evict(shards))


# -- summary ---------------------------------------------------------------------------------
EXHAUSTIVE_COLUMNS = ["projection", "first_stage_dim", "candidates", "recall_proponents"]
EXHAUSTIVE_COLUMNS += ["recall_opponents", "recall_proponents_min", "recall_opponents_min"]
TWO_STAGE_COLUMNS = ["first_stage_dim", "structure", "build_seconds", "candidates", "ms_median"]
TWO_STAGE_COLUMNS += ["ms_p95", "first_stage_ms_median", "recall_proponents", "recall_opponents"]
TWO_STAGE_COLUMNS += ["recall_proponents_min", "recall_opponents_min"]
SYNTHETIC_COLUMNS = ["N", "first_stage_dim", "structure", "candidates", "page_cache"]
SYNTHETIC_COLUMNS += ["ms_median", "ms_p95", "first_stage_ms_median", "recall_proponents"]
SYNTHETIC_COLUMNS += ["recall_opponents", "write_seconds", "build_seconds", "peak_rss_gb"]
SYNTHETIC_COLUMNS += ["disk_gb"]


def _latest(rows: list[dict], phase: str) -> list[dict]:
    mine = [row for row in rows if row.get("phase") == phase]
    if not mine:
        return []
    latest = max(row["run"][:13] for row in mine)  # one run: rows of the same hour
    return [row for row in mine if row["run"][:13] == latest]


def _environment(row: dict) -> str:
    return (
        f"Run {row['run']}, commit {row['git_commit']}, {row['device']}, {row['threads']} "
        f"threads, load average {row['load_before']} when the run started"
    )


def write_summary() -> None:
    """`index_twostage.md`: the latest run of each phase, read back from the CSV."""
    with open(CSV_PATH, newline="") as handle:
        rows = list(csv.DictReader(handle))
    text = ["# Two-stage search: recall on 100,000 real gradient vectors, latency at 1,000,000"]
    text += ["", SUMMARY_INTRO]
    real = _latest(rows, "real")
    if real:
        first = real[0]
        text += ["", "## Real vectors: the first stage alone (exhaustive over the sketches)", ""]
        text += [
            f"{_environment(first)}. N = {first['N']} deformed digits, K = {first['K']} draws, "
            f"{first['queries']} generated queries, recall@10 against the flat search over the "
            "same stored vectors. Command: `.venv/bin/python bench/index_twostage.py real`.",
            "",
            markdown_table(
                [r for r in real if r["table"].startswith("first stage")], EXHAUSTIVE_COLUMNS
            ),
            "",
            "## Real vectors: both stages (faiss structure over the pca sketches, then the "
            "stored vectors from the memory-mapped shards)",
            "",
            "One query per call; ms per query for both signs (median, p95) and of the first "
            "stage alone; build_seconds: the first-stage structure.",
            "",
            markdown_table([r for r in real if r["table"] == "two stages"], TWO_STAGE_COLUMNS),
        ]
    synthetic = [row for row in rows if row.get("phase") == "synthetic"]
    for total in sorted({int(row["N"]) for row in synthetic}):
        latest = max(row["run"] for row in synthetic if int(row["N"]) == total)
        group = [row for row in synthetic if int(row["N"]) == total and row["run"] == latest]
        first = group[0]
        spectrum_images = int(first.get("spectrum_images") or IMAGES)
        text += [
            "",
            f"## {total:,} synthetic vectors drawn like the real ones",
            "",
            f"{_environment(first)}. Command: `.venv/bin/python bench/index_twostage.py "
            f"synthetic --num-vectors {total} --spectrum-images {spectrum_images}` (after "
            f"`real --num-images {spectrum_images} --spectrum-only`). "
            + SYNTHETIC_NOTE.format(
                residual=first["residual_dim"], spectrum_images=spectrum_images
            ),
            "",
            markdown_table(group, SYNTHETIC_COLUMNS),
        ]
    (RESULTS_DIR / "index_twostage.md").write_text("\n".join(text) + "\n")


SUMMARY_INTRO = (
    "How many candidates a low-dimensional first stage must hand to the second stage (the "
    "16 KB stored vectors) for the two-stage lists to hold the flat search's top-10, and at "
    "what cost. See the docstring of `bench/index_twostage.py` for the method; all rows are "
    "in `index_twostage.csv`."
)
SYNTHETIC_NOTE = (
    "Vectors drawn from the spectrum of the real ones (`synthetic_vectors`): per-vector "
    "norm and captured share resampled from the {spectrum_images:,} real rows, Gaussian "
    "coordinates on the first-stage directions with the real energy shares, an isotropic "
    "residual on {residual} more coordinates (the dimension whose inner products spread "
    "like the real residuals'), int4 as the index stores them; the first stage is the "
    "default (pca on those directions, hnsw); the 64 real queries mapped into the same "
    "basis; recall against an exact scan of the stored values made while writing them. "
    "page_cache: 'cached' times each query's second run, 'evicted' drops the shards from "
    "the page cache first. Peak RSS of the whole run; disk: codes and sketches. "
    "10,000,000 vectors would need 160 GB of codes (this machine has about 76 GB free)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["real", "synthetic", "summary"])
    parser.add_argument("--num-images", type=int, default=IMAGES, help="real: deformed digits")
    parser.add_argument("--build-only", action="store_true", help="real: only build the index")
    parser.add_argument("--num-vectors", type=int, default=SYNTHETIC, help="synthetic: N")
    parser.add_argument("--keep", action="store_true", help="synthetic: keep the 20 GB of files")
    parser.add_argument(
        "--spectrum-only",
        action="store_true",
        help="real: build the index and save its spectrum for `synthetic`, nothing else",
    )
    parser.add_argument(
        "--spectrum-images",
        type=int,
        default=IMAGES,
        help="synthetic: draw like the spectrum of the real index of this many images",
    )
    args = parser.parse_args()
    if args.phase == "real":
        rows = run_real(args.num_images, args.build_only, args.spectrum_only)
    elif args.phase == "synthetic":
        rows = run_synthetic(args.num_vectors, args.keep, args.spectrum_images)
    else:
        rows = []
    if rows:
        append_rows(CSV_PATH, rows)
    if args.phase == "summary" or rows:
        write_summary()


if __name__ == "__main__":
    main()
