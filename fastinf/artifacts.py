"""Artifacts on disk: safetensors tensors + a JSON sidecar with config, fingerprints, checksums.

Every artifact records what it was computed from (model weights, dataset, schedule, config).
Loading it against something else raises `ArtifactMismatchError` naming the difference;
a damaged tensor file or an edited JSON record raises `ArtifactCorruptError`. Neither is
ever silently ignored.

The JSON record of format version 2 (`FORMAT_VERSION`) holds `format_version`, the
artifact's metadata fields, `sha256` (of the tensor file) and `manifest_sha256`: the SHA-256
of the canonical JSON (sorted keys, no whitespace) of every other field of the record, so
that it covers the metadata and, through `sha256`, the tensors.

A dataset fingerprint hashes every item up to `FULL_VERIFY_LIMIT` (1,000,000) items and 64
evenly spaced items above (`dataset_fingerprint`, `VERIFY_MODES`); it records which it did.
The limit bounds the full pass, on a 2-core CPU, at ~20 s for 1M in-memory [1, 8, 8] items
and ~40 s for [4, 32, 32] latents, plus the dataset's own loading of every item
(bench/results/dataset_fingerprint_cpu.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = [
    "FULL_VERIFY_LIMIT",
    "VERIFY_MODES",
    "ArtifactCorruptError",
    "ArtifactMismatchError",
    "atomic_write",
    "atomic_write_text",
    "canonical_digest",
    "check_provenance",
    "dataset_fingerprint",
    "file_sha256",
    "load_artifact",
    "model_fingerprint",
    "save_artifact",
    "tensor_fingerprint",
]

FORMAT_VERSION = 2
VERIFY_MODES = ("full", "sample")
FULL_VERIFY_LIMIT = 1_000_000
_DATASET_SAMPLE = 64
_CHECKSUM_FIELDS = ("format_version", "sha256", "manifest_sha256")


class ArtifactMismatchError(ValueError):
    """An artifact was computed for another model, dataset or incompatible config."""


class ArtifactCorruptError(ValueError):
    """An artifact's files are missing, truncated or altered."""


def _hash_tensor(digest, tensor: Tensor) -> None:
    """Feed a tensor's shape, dtype and raw bytes (C order) to `digest`."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    try:
        data = tensor.numpy()  # a view of the bytes: no copy, fast for millions of items
    except TypeError:  # no numpy dtype (bfloat16, float8): the same bytes, as uint8
        data = tensor.reshape(-1).view(torch.uint8).numpy()
    digest.update(data)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) over every parameter and buffer of `model`, by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        _hash_tensor(digest, tensor)
    return digest.hexdigest()[:16]


def tensor_fingerprint(tensor: Tensor) -> str:
    """SHA-256 (16 hex digits) of one tensor's shape, dtype and values."""
    digest = hashlib.sha256()
    _hash_tensor(digest, tensor)
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset, verify: str | None = None) -> str:
    """`"<mode>:<16 hex digits>"`: SHA-256 of the dataset's length and of its items.

    Each item (a tensor, or a tuple/list of tensors, numbers or None) is hashed by shape,
    dtype and raw bytes as it is read, one at a time, so the fingerprint depends on the
    items alone, not on the Dataset object that serves them — except for a dataset with
    its own `fingerprint(verify)` method (image files, tar shards: `fastinf.shards`), which
    hashes its stored bytes and file index instead of decoding every image.

    Args:
        dataset: a map-style Dataset.
        verify: "full" hashes every item, in order (catches a change to any single item);
            "sample" hashes 64 evenly spaced items (catches another dataset, order or
            preprocessing and, with the length, added or removed items, but not a change
            to one unsampled item). None: "full" up to `FULL_VERIFY_LIMIT` items, "sample"
            above (a full pass costs one read of every item; see
            bench/dataset_fingerprint.py). The mode is the fingerprint's prefix, so
            fingerprints of different modes never compare equal.
    """
    size = len(dataset)
    if verify is None:
        verify = "full" if size <= FULL_VERIFY_LIMIT else "sample"
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}; or None for auto.")
    own = getattr(dataset, "fingerprint", None)
    if callable(own):  # stored files: their bytes and index, without decoding
        return own(verify)
    if verify == "full":
        positions = range(size)
    else:
        count = min(size, _DATASET_SAMPLE)
        positions = sorted({round(i * (size - 1) / max(count - 1, 1)) for i in range(count)})
    digest = hashlib.sha256(str(size).encode())
    for position in positions:
        item = dataset[position]
        for part in item if isinstance(item, (tuple, list)) else (item,):
            if part is None:  # an unconditional item's cond
                digest.update(b"None")
            else:
                _hash_tensor(digest, torch.as_tensor(part))
    return f"{verify}:{digest.hexdigest()[:16]}"


def _verify_mode(fingerprint: object) -> str | None:
    """The mode of a `dataset_fingerprint` value, None for any other value."""
    if isinstance(fingerprint, str) and fingerprint.partition(":")[0] in VERIFY_MODES:
        return fingerprint.partition(":")[0]
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file so that a killed process leaves either the old file or the new one.

    `write(tmp)` writes the content to a temporary path next to `path` (any writer that takes
    a path: safetensors, faiss, numpy, text); the bytes are flushed to disk, then renamed
    over `path`, and the rename is flushed too. If `write` fails, the temporary file is
    removed and `path` is left as it was. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours, half-written; `path` is untouched
        raise
    _sync_directory(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _sync_directory(directory: Path) -> None:
    """Flush a directory's entries (the rename) to disk where the platform allows it."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def canonical_digest(fields: dict) -> str:
    """SHA-256 (hex) of `fields` as canonical JSON: sorted keys, no whitespace, ASCII."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_artifact(directory: str | os.PathLike, stem: str, tensors: dict[str, Tensor], meta: dict):
    """Write `stem.safetensors`, then `stem.json`, each atomically. A run killed between the
    two renames leaves the old JSON beside the new tensors, which loading detects (the
    tensor checksum) and names.

    The JSON record is `meta` plus `format_version`, the tensor file's `sha256` and
    `manifest_sha256` over all of these (see the module docstring). `meta` must be JSON
    data and must not use those three keys.
    """
    reserved = sorted(set(meta) & set(_CHECKSUM_FIELDS))
    if reserved:
        raise ValueError(f"artifact metadata may not use the reserved keys {reserved}.")
    directory = Path(directory)
    tensor_path = atomic_write(
        directory / f"{stem}.safetensors",
        lambda tmp: save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp)
        ),
    )
    record = {"format_version": FORMAT_VERSION, **meta, "sha256": file_sha256(tensor_path)}
    # Digest what loading will see: JSON turns tuples into lists and keys into strings.
    record["manifest_sha256"] = canonical_digest(json.loads(json.dumps(record)))
    atomic_write_text(directory / f"{stem}.json", json.dumps(record, indent=2, sort_keys=True))


def load_artifact(directory: str | os.PathLike, stem: str) -> tuple[dict[str, Tensor], dict]:
    """Read an artifact written by `save_artifact`, verifying its manifest and checksum.

    Returns (tensors by key, the JSON record). Raises `ArtifactMismatchError` for another
    format version, `ArtifactCorruptError` for an edited or damaged record or tensor file,
    `FileNotFoundError` for a missing one.
    """
    directory = Path(directory)
    tensor_path, json_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    if not json_path.exists() or not tensor_path.exists():
        raise FileNotFoundError(
            f"no {stem} artifact in {directory} (need {stem}.json and {stem}.safetensors); "
            "create it first (see `fastinf --help`)."
        )
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactCorruptError(
            f"{json_path} is not valid JSON ({error}); recreate it."
        ) from None
    if not isinstance(meta, dict):
        raise ArtifactCorruptError(
            f"{json_path} holds a JSON {type(meta).__name__}, not an artifact record; "
            "recreate the artifact."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactMismatchError(
            f"{json_path} has format version {meta.get('format_version')}, this fastinf reads "
            f"{FORMAT_VERSION}: it was written by another fastinf version; recreate the "
            "artifact with this one."
        )
    fields = {key: value for key, value in meta.items() if key != "manifest_sha256"}
    if canonical_digest(fields) != meta.get("manifest_sha256"):
        raise ArtifactCorruptError(
            f"the metadata in {json_path} was altered: it does not match the record's "
            "manifest_sha256 (edited by hand or damaged); recreate the artifact rather than "
            "editing it."
        )
    if file_sha256(tensor_path) != meta.get("sha256"):
        raise ArtifactCorruptError(
            f"{tensor_path} does not match the checksum in {json_path.name}: the file is "
            "truncated or altered; recreate the artifact."
        )
    try:
        tensors = load_file(str(tensor_path))
    except SafetensorError as error:
        raise ArtifactCorruptError(
            f"{tensor_path} cannot be read ({error}); recreate it."
        ) from None
    return tensors, meta


def check_provenance(what: str, recorded: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise `ArtifactMismatchError` if any expected entry differs from the recorded one.

    Dataset fingerprints of different verify modes are refused with both modes named:
    a sample cannot vouch for a full pass, nor the reverse.
    """
    for key, value in expected.items():
        if recorded.get(key) == value:
            continue
        recorded_mode, expected_mode = _verify_mode(recorded.get(key)), _verify_mode(value)
        if recorded_mode and expected_mode and recorded_mode != expected_mode:
            raise ArtifactMismatchError(
                f"the {what} was made with {key}={recorded.get(key)!r}, fingerprinted with "
                f"verify={recorded_mode!r}, but this engine's {key}={value!r} used "
                f"verify={expected_mode!r}; fingerprints of different modes cannot be compared "
                f"(by default a dataset of over {FULL_VERIFY_LIMIT:,} items is sampled) — "
                f"fingerprint the dataset with verify={recorded_mode!r}, or recompute the "
                f"{what}."
            )
        raise ArtifactMismatchError(
            f"the {what} was made with {key}={recorded.get(key)!r} but this engine has "
            f"{key}={value!r}; it belongs to another model, dataset or configuration — "
            f"recompute the {what} for this one."
        )
