"""Building an index: stream the training set once, store every train gradient's index vector.

Each example's gradient (K = `ScoreConfig.train_draws` draws, the same draws as
`engine.score`) is rotated into the EK-FAC eigenbasis, whitened by W^½, compressed and
stored in its shard (DESIGN §2 step 3b). Under `torch.distributed` (e.g. `torchrun
--nproc_per_node=2 -m fastinf index ...`) rank r computes shards r, r + W, r + 2W, …; rank 0
prepares the build (calibration, compressor), and after a barrier verifies every shard and
writes the manifest. Shards are fixed row ranges of the build order, so the stored vectors
do not depend on the number of ranks, and a killed build resumes where it stopped.
With search="twostage" each shard also stores the first-stage sketches of its stored
vectors (`fastinf.index.twostage`), and the faiss structure is built over those.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from ..artifacts import save_artifact
from ..curvature import Curvature, require_eigenbasis
from ..distributed import barrier, rank_world
from ..locks import writer_lock
from ..progress import progress_bar
from ..source import GradientSource
from .compress import CoordinateLayout, damped_ratio, make_compressor
from .config import IndexConfig
from .encode import Quantizer, VectorEncoder
from .identity import build_id, check_identity, index_identity, load_encoder, load_projection
from .recall import first_stage_recall
from .search import SearchIndex
from .store import COMPRESSOR, BuildPlan, IndexStore, npy_bytes
from .twostage import FirstStageProjection, principal_directions

__all__ = ["build_index"]


def _train_blocks(source: GradientSource, positions: Sequence[int]):
    """(dataset indices, LayerGrads) per block of `ScoreConfig.block_size` examples."""
    step = source.config.block_size
    for begin in range(0, len(positions), step):
        chunk = [int(i) for i in positions[begin : begin + step]]
        yield chunk, source.train_gradients(chunk)


def _calibrate(source: GradientSource, curvature, config: IndexConfig, layout, order: np.ndarray):
    """The encoder (its compressor ranked by calibration energy when asked), the quantizer,
    and the calibration examples' index vectors."""
    score = source.config
    ranking = damped_ratio(curvature, score.damping, score.damping_mode)
    calibration = order[: config.calibration_examples]
    if config.compression in ("truncate", "hybrid") and config.rank_by == "energy":
        exact = VectorEncoder(
            curvature,
            score.damping,
            score.damping_mode,
            make_compressor(layout, IndexConfig(compression="exact"), None),
        )
        energy = {b.key: torch.zeros(b.size, dtype=torch.float64) for b in layout}
        with progress_bar(len(calibration), "index calibration (energy)") as bar:
            for chunk, grads in _train_blocks(source, calibration):
                for key, values in exact.whiten(exact.rotate(grads)).items():
                    energy[key] += values.double().square().sum(0).cpu() / len(calibration)
                bar.update(len(chunk))
        ranking = energy
    compressor = make_compressor(layout, config, ranking)
    encoder = VectorEncoder(curvature, score.damping, score.damping_mode, compressor)
    # One pass over the calibration examples serves the integer scales and the recall.
    vectors = []
    with progress_bar(len(calibration), "index calibration (vectors)") as bar:
        for chunk, grads in _train_blocks(source, calibration):
            vectors.append(encoder.encode(grads).cpu())
            bar.update(len(chunk))
    vectors = torch.cat(vectors)
    if config.storage not in ("int8", "int4"):
        return encoder, Quantizer(config.storage), vectors
    return encoder, Quantizer.calibrate(config, vectors), vectors


def fit_sample(order: np.ndarray, count: int) -> np.ndarray:
    """`count` examples of the build order (all if fewer), evenly spread over it."""
    positions = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round())
    return order[positions.astype(np.int64)]


def _first_stage(source, config, encoder, quantizer, order, calibration) -> FirstStageProjection:
    """The first-stage projection: pca fitted on the stored vectors of `fit_sample`
    (computed here), countsketch from its seed; its fp16 scale set on those vectors."""
    stored = quantizer.values(quantizer.store(calibration))
    basis = None
    if config.first_stage_projection == "pca":
        sample = fit_sample(order, config.first_stage_fit)
        parts = []
        with progress_bar(len(sample), "index first stage (principal directions)") as bar:
            for chunk, grads in _train_blocks(source, sample):
                parts.append(quantizer.values(quantizer.store(encoder.encode(grads))))
                bar.update(len(chunk))
        stored = np.concatenate(parts)
        basis = principal_directions(stored, config.first_stage_dim)
    projection = FirstStageProjection(config, encoder.dim, basis=basis)
    scale = FirstStageProjection.scale_for(projection.project(stored))
    return FirstStageProjection(config, encoder.dim, scale, basis)


def _prepare(
    store: IndexStore, source: GradientSource, curvature, config: IndexConfig, order: np.ndarray
) -> None:
    """Rank 0: start a new build, or check that the existing one is the same and resume."""
    store.remove_temporary()
    order_sha256 = hashlib.sha256(npy_bytes(order)).hexdigest()
    identity = index_identity(source, curvature, config, len(order), order_sha256)
    existing = store.read_manifest()
    if existing is not None:
        check_identity(f"index in {store.directory}", existing, identity)
        existing["config"] = config.to_dict()
        existing["complete"] = False
        store.write_manifest(existing)
        return
    layout = CoordinateLayout(curvature)
    encoder, quantizer, vectors = _calibrate(source, curvature, config, layout, order)
    compressor = encoder.compressor
    kept = getattr(compressor, "kept", None)
    tensors = {**quantizer.tensors(), **({} if kept is None else {"kept": kept})}
    first_stage = {}
    if config.search == "twostage":
        projection = _first_stage(source, config, encoder, quantizer, order, vectors)
        if projection.kind == "pca":
            tensors["first_stage_basis"] = projection.basis
        first_stage = {
            "first_stage": {"projection": projection.fingerprint(), "scale": projection.scale}
        }
    save_artifact(
        store.directory,
        COMPRESSOR,
        tensors or {"dim": torch.tensor([compressor.dim])},
        {"build_id": build_id(identity), "fingerprint": compressor.fingerprint()},
    )
    store.write_order(order)
    pool = [int(i) for i in order[: config.calibration_examples]]
    recall = first_stage_recall(source, curvature, config, encoder, quantizer, pool, vectors)
    store.write_manifest(
        {
            **identity,
            **first_stage,
            "first_stage_recall": recall,
            "build_id": build_id(identity),
            "config": config.to_dict(),
            "dim": compressor.dim,
            "compressor": compressor.fingerprint(),
            "complete": False,
        }
    )


def _finalize(store: IndexStore, manifest: dict, quantizer: Quantizer) -> None:
    """Rank 0: verify every shard, build the search structure if it is not flat, mark complete."""
    config = IndexConfig(**manifest["config"])
    plan = BuildPlan(manifest["plan"]["num_examples"], manifest["plan"]["shard_size"])
    records = store.completed(plan, manifest["build_id"])
    missing = [shard.number for shard in plan.shards() if shard.number not in records]
    if missing:
        raise RuntimeError(
            f"index shards {missing[:10]} are missing after the build (a rank stopped early); "
            "run the same build command again to resume."
        )
    ordered = [records[number] for number in sorted(records)]
    for record in ordered:
        store.open_shard(record, verify=True)
    manifest.pop("search_sha256", None)
    if config.search == "twostage":
        dim = config.first_stage_dim
        batches = (
            np.asarray(store.open_sketches(r, dim, verify=True), dtype=np.float32) for r in ordered
        )
        search = SearchIndex.build(config.first_stage_config(), dim, plan.num_examples, batches)
        manifest["search_sha256"] = store.write_search(search.write)
    elif config.search != "flat":
        batches = (quantizer.values(store.open_shard(r, verify=False)) for r in ordered)
        search = SearchIndex.build(
            config, manifest["dim"], plan.num_examples, batches, quantizer.scale_array()
        )
        manifest["search_sha256"] = store.write_search(search.write)
    elif store.search_path.exists():
        store.search_path.unlink()
    manifest["shards"] = ordered
    manifest["completed"] = [[r["start"], r["stop"]] for r in ordered]
    manifest["complete"] = True
    store.write_manifest(manifest)


def _check_first_stage(config: IndexConfig, stored_dim: int, order: np.ndarray) -> None:
    """Refuse, before anything is written, a first stage this index cannot have."""
    dim = config.first_stage_dim
    if dim >= stored_dim:
        raise ValueError(
            f"IndexConfig.first_stage_dim={dim} is not below the {stored_dim} values of a "
            "stored vector; lower first_stage_dim, or use search='flat'."
        )
    fitted = min(config.first_stage_fit, len(order))
    if config.first_stage_projection == "pca" and dim > fitted:
        raise ValueError(
            f"IndexConfig.first_stage_dim={dim} principal directions need at least {dim} "
            f"fitted examples, but only {fitted} are fitted (first_stage_fit="
            f"{config.first_stage_fit}, {len(order)} examples); lower first_stage_dim or "
            "raise first_stage_fit, or use search='flat' for so few examples."
        )


def build_index(
    source: GradientSource,
    curvature: Curvature,
    directory: str | os.PathLike,
    config: IndexConfig | None = None,
    *,
    indices: Sequence[int] | None = None,
    overwrite: bool = False,
) -> None:
    """Compute, compress and store the index vector of every training example (or `indices`).

    Resumes an interrupted build of the same index in `directory` (finished shards are kept,
    never recomputed or duplicated); an index of another model, dataset, curvature, damping
    or compression there is an `ArtifactMismatchError` unless `overwrite`. Under an
    initialised `torch.distributed` process group, ranks split the shards. Memory is
    O(block) whatever N: the search structure is only assembled when loading
    (`TrainingIndex.load`).
    """
    config = config or IndexConfig()
    curvature = require_eigenbasis(curvature, "the index (it whitens in the eigenbasis)")
    store = IndexStore(directory)
    rank = rank_world()[0]
    order = np.arange(len(source.train_set), dtype=np.int64)
    if indices is not None:
        order = np.asarray([int(i) for i in indices], dtype=np.int64)
    if len(order) == 0:
        raise ValueError("the index needs at least one training example.")
    size = CoordinateLayout(curvature).size
    if config.compression != "exact" and config.dim > size:
        raise ValueError(
            f"IndexConfig.dim={config.dim} exceeds the {size} coordinates of the tracked "
            f"layers' gradients; use a dim below {size}, or compression='exact'."
        )
    if config.search == "twostage":
        _check_first_stage(config, size if config.compression == "exact" else config.dim, order)
    # Rank 0 holds the folder's writer lock for the whole build (the other ranks are its
    # helpers, not rival writers).
    with writer_lock(directory, "index build") if rank == 0 else nullcontext():
        _build(store, source, curvature, config, order, overwrite=overwrite)


def _build(store, source, curvature, config, order, *, overwrite: bool) -> None:
    rank, world = rank_world()
    if rank == 0:
        if overwrite:
            store.remove()
        _prepare(store, source, curvature, config, order)
    barrier()
    manifest = store.read_manifest()
    encoder, quantizer = load_encoder(store, curvature, source.config, manifest)
    projection = load_projection(store, manifest)
    plan = BuildPlan(manifest["plan"]["num_examples"], manifest["plan"]["shard_size"])
    done = store.completed(plan, manifest["build_id"])
    mine = [s for s in source.share(plan.shards()) if s.number not in done]
    desc = "index build" if world == 1 else f"index build [rank {rank}/{world}]"
    with progress_bar(sum(s.rows for s in mine), desc) as bar:
        for shard in mine:
            values = np.empty((shard.rows, quantizer.width(encoder.dim)), dtype=quantizer.dtype)
            filled = 0
            for chunk, grads in _train_blocks(source, order[shard.start : shard.stop]):
                values[filled : filled + len(chunk)] = quantizer.store(encoder.encode(grads))
                filled += len(chunk)
                bar.update(len(chunk))
            sketches = None if projection is None else projection.sketch(quantizer.values(values))
            store.write_shard(shard, values, manifest["build_id"], sketches)
    barrier()
    if rank == 0:
        _finalize(store, store.read_manifest(), quantizer)
    barrier()
