"""What an index is for: the identity its manifest records and everything it is checked
against — the model, data and curvature, the gradient draws and damping, the compression."""

from __future__ import annotations

import hashlib
import json

from ..artifacts import ArtifactMismatchError, check_provenance, load_artifact
from ..config import ScoreConfig
from ..curvature import Curvature, EigenbasisCurvature
from ..source import GradientSource
from .compress import CoordinateLayout, damped_ratio, make_compressor
from .config import IndexConfig
from .encode import Quantizer, VectorEncoder
from .store import COMPRESSOR, IndexStore
from .twostage import FirstStageProjection

__all__ = [
    "GRADIENT_FIELDS",
    "build_id",
    "check_curvature",
    "check_gradients",
    "check_identity",
    "index_identity",
    "load_encoder",
    "load_projection",
]

GRADIENT_FIELDS = ("train_draws", "train_objective", "seed", "damping", "damping_mode")
SECTIONS = ("provenance", "curvature", "gradients")


def index_identity(
    source: GradientSource,
    curvature: EigenbasisCurvature,
    config: IndexConfig,
    num_examples: int,
    order_sha256: str,
) -> dict:
    """Everything the stored vectors depend on: model, data, curvature, gradient draws,
    damping, compression and the build plan."""
    return {
        "provenance": dict(source.provenance),
        "curvature": {
            "config": curvature.config.fingerprint(),
            "tensors": curvature.fingerprint(),
        },
        "gradients": {name: getattr(source.config, name) for name in GRADIENT_FIELDS},
        "vectors": config.vector_fingerprint(),
        "plan": {
            "num_examples": num_examples,
            "shard_size": config.shard_size,
            "order_sha256": order_sha256,
        },
    }


def build_id(identity: dict) -> str:
    """A short digest of an identity: the id every file of one build carries."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(identity: dict) -> dict:
    """{"section.key": value} so a mismatch names the exact field."""
    return {
        f"{section}.{key}": value
        for section, values in identity.items()
        for key, value in values.items()
    }


def check_identity(what: str, recorded: dict, expected: dict, sections=None) -> None:
    """ArtifactMismatchError naming the first field (`section.key`) where an index's
    recorded identity differs from the expected one (in `sections`, default all)."""
    keys = sections or tuple(expected)
    check_provenance(
        what,
        _flatten({k: recorded.get(k, {}) for k in keys}),
        _flatten({k: expected[k] for k in keys}),
    )


def check_curvature(manifest: dict, curvature: Curvature) -> None:
    """The curvature that preconditions queries must be the one the index was built with
    (else the search and the exact re-rank would rank by different scores)."""
    tensors = manifest["curvature"]["tensors"]
    mine = curvature.fingerprint() if isinstance(curvature, EigenbasisCurvature) else None
    if mine != tensors:
        raise ArtifactMismatchError(
            f"the index was built with the curvature {tensors}, the engine now holds "
            f"{mine or curvature.config.strategy!r}; load that curvature or rebuild the index."
        )


def check_gradients(manifest: dict, score: ScoreConfig) -> None:
    """The score configuration must draw and damp train gradients as the build did."""
    for name in GRADIENT_FIELDS:
        if getattr(score, name) != manifest["gradients"][name]:
            raise ArtifactMismatchError(
                f"the index was built with {name}={manifest['gradients'][name]!r} but the "
                f"engine now has {name}={getattr(score, name)!r}; set the engine's "
                "ScoreConfig back or rebuild the index."
            )


def load_encoder(
    store: IndexStore, curvature: EigenbasisCurvature, score: ScoreConfig, manifest: dict
) -> tuple[VectorEncoder, Quantizer]:
    """Rebuild the build's encoder and quantizer from the manifest and the saved state."""
    tensors, meta = load_artifact(store.directory, COMPRESSOR)
    if meta.get("build_id") != manifest["build_id"]:
        raise ArtifactMismatchError(
            f"{store.directory}/{COMPRESSOR}.json belongs to another index build; rebuild the "
            "index."
        )
    config = IndexConfig(**manifest["config"])
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


def load_projection(store: IndexStore, manifest: dict) -> FirstStageProjection | None:
    """twostage: the build's first-stage projection (its saved basis for pca, else rebuilt
    from its seed), checked against the manifest; None for other searches."""
    config = IndexConfig(**manifest["config"])
    if config.search != "twostage":
        return None
    recorded = manifest.get("first_stage")
    if recorded is None:
        raise ArtifactMismatchError(
            "the index's config asks for search='twostage' but it was built without "
            "first-stage sketches; rebuild it with overwrite=True (or `fastinf index "
            "--overwrite`)."
        )
    basis = None
    if config.first_stage_projection == "pca":
        basis = load_artifact(store.directory, COMPRESSOR)[0].get("first_stage_basis")
    projection = FirstStageProjection(config, manifest["dim"], recorded["scale"], basis)
    if projection.fingerprint() != recorded["projection"]:
        raise ArtifactMismatchError(
            f"the first-stage projection of the index ({projection.fingerprint()}) is not the "
            f"one it was built with ({recorded['projection']}): another torch version draws "
            "other random numbers, or the compressor file was replaced; rebuild the index."
        )
    return projection
