"""Building an index: stream the training set once, store every train gradient's index vector.

Each example's gradient (K = `ScoreConfig.train_draws` draws, the same draws as
`engine.score`) is projected into the EK-FAC eigenbasis, whitened by W^½, compressed and
stored in its shard (DESIGN §2 step 3b). Under `torch.distributed` (e.g. `torchrun
--nproc_per_node=2 -m fastinf index ...`) rank r computes shards r, r + W, r + 2W, …; rank 0
prepares the build (calibration, compressor), and after a barrier verifies every shard and
writes the manifest. Shards are fixed row ranges of the build order, so the stored vectors
do not depend on the number of ranks, and a killed build resumes where it stopped.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..artifacts import ArtifactMismatchError, check_provenance, load_artifact, save_artifact
from ..artifacts import tensor_fingerprint as _tensor_fingerprint
from ..progress import progress_bar
from .compress import CoordinateLayout, damped_ratio, make_compressor
from .config import IndexConfig
from .encode import Quantizer, VectorEncoder
from .search import SearchIndex
from .store import ORDER, SEARCH_FILE, SHARDS, BuildPlan, IndexStore, npy_bytes

__all__ = ["build_index", "index_identity", "init_distributed", "load_encoder"]

GRADIENT_FIELDS = ("train_draws", "train_objective", "seed", "damping", "damping_mode")
COMPRESSOR = "compressor"


def init_distributed() -> tuple[int, int]:
    """Join the process group `torchrun` describes (gloo on CPU, nccl on CUDA), if any.

    Returns (rank, world size); (0, 1) when not launched by torchrun.
    """
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_group)
    return _rank_world()


def _leave_group() -> None:
    """Leave the process group in order at exit: a gloo group left to the interpreter's
    teardown can abort the process after its work is done. (If a rank fails, torchrun
    stops the others, so the barrier cannot wait forever.)"""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def curvature_fingerprint(curvature) -> str:
    """SHA-256 (16 hex digits) of every layer's eigenbases and eigenvalues."""
    digest = hashlib.sha256()
    for name, layer in curvature.layers.items():
        digest.update(name.encode())
        for key in ("eigvecs_act", "eigvecs_grad", "eigvals_weight", "eigvals_bias"):
            tensor = getattr(layer, key)
            if tensor is not None:
                digest.update(_tensor_fingerprint(tensor).encode())
    return digest.hexdigest()[:16]


def index_identity(engine, config: IndexConfig, num_examples: int, order_sha256: str) -> dict:
    """Everything the stored vectors depend on: model, data, curvature, gradient draws,
    damping, compression and the build plan."""
    curvature = engine._require_curvature()
    return {
        "provenance": dict(engine.provenance),
        "curvature": {
            "config": curvature.config.fingerprint(),
            "tensors": curvature_fingerprint(curvature),
        },
        "gradients": {name: getattr(engine.config, name) for name in GRADIENT_FIELDS},
        "vectors": config.vector_fingerprint(),
        "plan": {
            "num_examples": num_examples,
            "shard_size": config.shard_size,
            "order_sha256": order_sha256,
        },
    }


def _build_id(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(identity: dict) -> dict:
    """{"section.key": value} so a mismatch names the exact field."""
    return {
        f"{section}.{key}": value
        for section, values in identity.items()
        for key, value in values.items()
    }


def _train_blocks(engine, positions: Sequence[int]):
    """(dataset indices, LayerGrads) per block of `ScoreConfig.block_size` examples."""
    step = engine.config.block_size
    for begin in range(0, len(positions), step):
        chunk = [int(i) for i in positions[begin : begin + step]]
        yield chunk, engine.train_gradients(chunk)


def _calibrate(engine, config: IndexConfig, layout, order: np.ndarray):
    """The compressor (ranked by calibration energy when asked) and the quantizer."""
    curvature, score = engine.curvature, engine.config
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
            for chunk, grads in _train_blocks(engine, calibration):
                for key, values in exact.whiten(exact.project(grads)).items():
                    energy[key] += values.double().square().sum(0).cpu() / len(calibration)
                bar.update(len(chunk))
        ranking = energy
    compressor = make_compressor(layout, config, ranking)
    encoder = VectorEncoder(curvature, score.damping, score.damping_mode, compressor)
    if config.storage not in ("int8", "int4"):
        return compressor, Quantizer(config.storage)
    vectors = []
    with progress_bar(len(calibration), f"index calibration ({config.storage} scales)") as bar:
        for chunk, grads in _train_blocks(engine, calibration):
            vectors.append(encoder.encode(grads).cpu())
            bar.update(len(chunk))
    return compressor, Quantizer.calibrate(config, torch.cat(vectors))


def load_encoder(store: IndexStore, engine, manifest: dict) -> tuple[VectorEncoder, Quantizer]:
    """Rebuild the build's encoder and quantizer from the manifest and the saved state."""
    tensors, meta = load_artifact(store.directory, COMPRESSOR)
    if meta.get("build_id") != manifest["build_id"]:
        raise ArtifactMismatchError(
            f"{store.directory}/{COMPRESSOR}.json belongs to another index build; rebuild the "
            "index."
        )
    config = IndexConfig(**manifest["config"])
    curvature, score = engine._require_curvature(), engine.config
    layout = CoordinateLayout(curvature)
    ranking = damped_ratio(curvature, score.damping, score.damping_mode)
    compressor = make_compressor(layout, config, ranking, kept=tensors.get("kept"))
    if compressor.fingerprint() != manifest["compressor"]:
        raise ArtifactMismatchError(
            f"the compressor rebuilt from the index's seed differs from the one it was built "
            f"with (fingerprint {compressor.fingerprint()} vs {manifest['compressor']}): "
            "another torch version draws other random numbers; rebuild the index."
        )
    encoder = VectorEncoder(curvature, score.damping, score.damping_mode, compressor)
    return encoder, Quantizer(config.storage, tensors.get("scale"))


def _prepare(store: IndexStore, engine, config: IndexConfig, order: np.ndarray) -> None:
    """Rank 0: start a new build, or check that the existing one is the same and resume."""
    store.remove_temporary()
    order_bytes = npy_bytes(order)
    identity = index_identity(engine, config, len(order), hashlib.sha256(order_bytes).hexdigest())
    build_id = _build_id(identity)
    existing = store.read_manifest()
    if existing is not None:
        recorded = {k: existing.get(k, {}) for k in identity}
        check_provenance(f"index in {store.directory}", _flatten(recorded), _flatten(identity))
        existing["config"] = config.to_dict()
        existing["complete"] = False
        store.write_manifest(existing)
        return
    layout = CoordinateLayout(engine._require_curvature())
    compressor, quantizer = _calibrate(engine, config, layout, order)
    kept = getattr(compressor, "kept", None)
    tensors = {**quantizer.tensors(), **({} if kept is None else {"kept": kept})}
    save_artifact(
        store.directory,
        COMPRESSOR,
        tensors or {"dim": torch.tensor([compressor.dim])},
        {"build_id": build_id, "fingerprint": compressor.fingerprint()},
    )
    store.write_order(order)
    store.write_manifest(
        {
            **identity,
            "build_id": build_id,
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
    if config.search != "flat":
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


def _remove_index_files(store: IndexStore) -> None:
    for name in (
        "index.json",
        ORDER,
        f"{COMPRESSOR}.json",
        f"{COMPRESSOR}.safetensors",
        SEARCH_FILE,
    ):
        (store.directory / name).unlink(missing_ok=True)
    shutil.rmtree(store.directory / SHARDS, ignore_errors=True)


def build_index(
    engine,
    directory: str | os.PathLike,
    config: IndexConfig | None = None,
    *,
    indices: Sequence[int] | None = None,
    overwrite: bool = False,
    load: bool = True,
):
    """Compute, compress and store the index vector of every training example (or `indices`).

    Resumes an interrupted build of the same index in `directory` (finished shards are kept,
    never recomputed or duplicated); an index of another model, dataset, curvature, damping
    or compression there is an `ArtifactMismatchError` unless `overwrite`. Under an
    initialised `torch.distributed` process group, ranks split the shards.

    Returns:
        the loaded `TrainingIndex`, or None with `load=False` (then the build's memory is
        O(block) whatever N: the search structure is only assembled when loading).
    """
    from .index import TrainingIndex

    config = config or IndexConfig()
    if engine._require_curvature().config.strategy == "trak":
        raise ValueError(
            "the index whitens in an (E)K-FAC eigenbasis; a 'trak' curvature has none — fit "
            "'ekfac', 'kfac' or 'identity' for an index."
        )
    store = IndexStore(directory)
    rank, world = _rank_world()
    order = np.arange(len(engine.train_set), dtype=np.int64)
    if indices is not None:
        order = np.asarray([int(i) for i in indices], dtype=np.int64)
    if len(order) == 0:
        raise ValueError("the index needs at least one training example.")
    if rank == 0:
        if overwrite:
            _remove_index_files(store)
        _prepare(store, engine, config, order)
    _barrier()
    manifest = store.read_manifest()
    encoder, quantizer = load_encoder(store, engine, manifest)
    plan = BuildPlan(manifest["plan"]["num_examples"], manifest["plan"]["shard_size"])
    done = store.completed(plan, manifest["build_id"])
    mine = [s for s in plan.shards() if s.number % world == rank and s.number not in done]
    desc = "index build" if world == 1 else f"index build [rank {rank}/{world}]"
    with progress_bar(sum(s.rows for s in mine), desc) as bar:
        for shard in mine:
            values = np.empty((shard.rows, quantizer.width(encoder.dim)), dtype=quantizer.dtype)
            filled = 0
            for chunk, grads in _train_blocks(engine, order[shard.start : shard.stop]):
                values[filled : filled + len(chunk)] = quantizer.store(encoder.encode(grads))
                filled += len(chunk)
                bar.update(len(chunk))
            store.write_shard(shard, values, manifest["build_id"])
    _barrier()
    if rank == 0:
        _finalize(store, store.read_manifest(), quantizer)
    _barrier()
    return TrainingIndex.load(directory, engine, verify=False) if load else None
