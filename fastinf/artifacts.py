"""Artifacts on disk: safetensors tensors + a JSON sidecar with config, fingerprints, checksum.

Every artifact records what it was computed from (model weights, dataset, schedule, config).
Loading it against something else raises `ArtifactMismatchError` naming the difference;
a damaged tensor file raises `ArtifactCorruptError`. Neither is ever silently ignored.
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
    "ArtifactCorruptError",
    "ArtifactMismatchError",
    "atomic_write",
    "atomic_write_text",
    "check_provenance",
    "dataset_fingerprint",
    "file_sha256",
    "load_artifact",
    "model_fingerprint",
    "save_artifact",
    "tensor_fingerprint",
]

FORMAT_VERSION = 1
_DATASET_SAMPLE = 64


class ArtifactMismatchError(ValueError):
    """An artifact was computed for another model, dataset or incompatible config."""


class ArtifactCorruptError(ValueError):
    """An artifact's files are missing, truncated or altered."""


def _hash_tensor(digest, tensor: Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


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


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 (16 hex digits) of the dataset's length and up to 64 evenly spaced items.

    Hashing every item would cost a full pass over millions of images; the sample catches
    a different dataset, order or preprocessing, and the length catches added/removed items.
    """
    size = len(dataset)
    digest = hashlib.sha256(str(size).encode())
    count = min(size, _DATASET_SAMPLE)
    positions = sorted({round(i * (size - 1) / max(count - 1, 1)) for i in range(count)})
    for position in positions:
        item = dataset[position]
        parts = item if isinstance(item, (tuple, list)) else (item,)
        for part in parts:
            _hash_tensor(digest, torch.as_tensor(part))
    return digest.hexdigest()[:16]


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


def save_artifact(directory: str | os.PathLike, stem: str, tensors: dict[str, Tensor], meta: dict):
    """Write `stem.safetensors`, then `stem.json` (meta + the tensors' checksum), each
    atomically: a JSON file always describes the tensor file next to it, or is absent."""
    directory = Path(directory)
    tensor_path = atomic_write(
        directory / f"{stem}.safetensors",
        lambda tmp: save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp)
        ),
    )
    record = {"format_version": FORMAT_VERSION, **meta, "sha256": file_sha256(tensor_path)}
    atomic_write_text(directory / f"{stem}.json", json.dumps(record, indent=2, sort_keys=True))


def load_artifact(directory: str | os.PathLike, stem: str) -> tuple[dict[str, Tensor], dict]:
    """Read an artifact written by `save_artifact`, verifying its checksum."""
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
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactMismatchError(
            f"{json_path} has format version {meta.get('format_version')}, this fastinf reads "
            f"{FORMAT_VERSION}; recreate the artifact."
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
    """Raise `ArtifactMismatchError` if any expected entry differs from the recorded one."""
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise ArtifactMismatchError(
                f"the {what} was made with {key}={recorded.get(key)!r} but this engine has "
                f"{key}={value!r}; it belongs to another model, dataset or configuration — "
                f"recompute the {what} for this one."
            )
