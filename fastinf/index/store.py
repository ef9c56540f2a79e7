"""On-disk layout of an index: manifest, build order, shards, each checked when read.

    DIR/index.json             manifest: config, fingerprints, build plan, shard list
    DIR/order.npy              dataset index of every stored row, in build order
    DIR/compressor.{json,safetensors}   data-dependent compressor state (checksummed)
    DIR/shards/shard_00007.npy stored vectors of rows [7·S, 8·S) (memory-mapped when read)
    DIR/shards/sketch_00007.npy  twostage only: their first-stage sketches (fp16)
    DIR/shards/shard_00007.json its record: rows, dtype, sha256 (and the sketch's), build id
    DIR/search.faiss           faiss structure (ivf/ivfpq/hnsw; twostage: over the sketches)

Every file is written to a temporary name and renamed into place, and a shard's record is
written only after its data: a build killed at any point leaves complete shards with
records, and at most one shard without (recomputed on resume); a shard's sketch is written
between its data and its record. Rows belong to fixed shards,
so a resumed build can neither miss nor duplicate one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import (
    FORMAT_VERSION,
    TEMPORARY_SUFFIX,
    ArtifactCorruptError,
    ArtifactMismatchError,
    atomic_write,
    canonical_digest,
    file_sha256,
)
from ..locks import LOCK_NAME

__all__ = ["BuildPlan", "IndexStore", "ShardSpec", "npy_bytes"]

MANIFEST = "index.json"
ORDER = "order.npy"
SHARDS = "shards"
SEARCH_FILE = "search.faiss"
KIND = "fastinf-index"
DIGEST = "manifest_sha256"
COMPRESSOR = "compressor"  # stem of the compressor artifact
_SHARD_FILE = re.compile(rf"{SHARDS}/(shard_\d{{5}}\.(npy|json)|sketch_\d{{5}}\.npy)")


@dataclass(frozen=True)
class ShardSpec:
    """Shard `number` holds rows [start, stop) of the build order."""

    number: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BuildPlan:
    """How the build order is cut into shards; independent of the number of ranks."""

    num_examples: int
    shard_size: int

    def shards(self) -> list[ShardSpec]:
        return [
            ShardSpec(number, start, min(start + self.shard_size, self.num_examples))
            for number, start in enumerate(range(0, self.num_examples, self.shard_size))
        ]


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of `array` (what `np.save` writes), in memory."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactCorruptError(
            f"{path} is not valid JSON ({error}); delete it and resume the build."
        ) from None


class IndexStore:
    """Reads and writes the files of one index directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    # -- manifest and order ----------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def read_manifest(self) -> dict | None:
        """The manifest, or None when the directory holds no index."""
        if not self.manifest_path.exists():
            return None
        manifest = _read_json(self.manifest_path)
        if manifest.get("kind") != KIND:
            raise ArtifactMismatchError(
                f"{self.manifest_path} is not a fastinf index manifest; use another directory."
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactMismatchError(
                f"{self.manifest_path} has format version {manifest.get('format_version')}, "
                f"this fastinf reads {FORMAT_VERSION}; rebuild the index."
            )
        fields = {key: value for key, value in manifest.items() if key != DIGEST}
        if canonical_digest(fields) != manifest.get(DIGEST):
            raise ArtifactCorruptError(
                f"{self.manifest_path} was altered (it does not match its {DIGEST}); delete it "
                "and run the same build command: finished shards are kept."
            )
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"kind": KIND, "format_version": FORMAT_VERSION, **manifest}
        record.pop(DIGEST, None)
        record[DIGEST] = canonical_digest(json.loads(json.dumps(record)))
        text = json.dumps(record, indent=1, sort_keys=True).encode()
        atomic_write(self.manifest_path, lambda tmp: tmp.write_bytes(text))

    def write_order(self, order: np.ndarray) -> str:
        """Write the build order; return its sha256."""
        data = npy_bytes(order.astype(np.int64))
        atomic_write(self.directory / ORDER, lambda tmp: tmp.write_bytes(data))
        return hashlib.sha256(data).hexdigest()

    def read_order(self, sha256: str) -> np.ndarray:
        path = self.directory / ORDER
        self._check_file(path, sha256, "build order")
        return np.load(path, allow_pickle=False)

    # -- shards ----------------------------------------------------------------------------
    def shard_path(self, number: int) -> Path:
        return self.directory / SHARDS / f"shard_{number:05d}.npy"

    def record_path(self, number: int) -> Path:
        return self.directory / SHARDS / f"shard_{number:05d}.json"

    def sketch_path(self, number: int) -> Path:
        return self.directory / SHARDS / f"sketch_{number:05d}.npy"

    def write_shard(
        self,
        shard: ShardSpec,
        values: np.ndarray,
        build_id: str,
        sketches: np.ndarray | None = None,
    ) -> dict:
        """Write a shard's stored values, then its first-stage sketches (twostage), then
        its record; return the record."""
        for array in (values, sketches):
            if array is not None and array.shape[0] != shard.rows:
                raise RuntimeError(
                    f"shard {shard.number}: {array.shape[0]} rows, expected {shard.rows}"
                )
        (self.directory / SHARDS).mkdir(parents=True, exist_ok=True)
        data = npy_bytes(values)
        atomic_write(self.shard_path(shard.number), lambda tmp: tmp.write_bytes(data))
        record = {
            "build_id": build_id,
            "shard": shard.number,
            "start": shard.start,
            "stop": shard.stop,
            "dim": int(values.shape[1]),
            "dtype": str(values.dtype),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if sketches is not None:
            sketch_data = npy_bytes(sketches)
            path = self.sketch_path(shard.number)
            atomic_write(path, lambda tmp: tmp.write_bytes(sketch_data))
            record["sketch_dim"] = int(sketches.shape[1])
            record["sketch_sha256"] = hashlib.sha256(sketch_data).hexdigest()
        text = json.dumps(record, sort_keys=True).encode()
        atomic_write(self.record_path(shard.number), lambda tmp: tmp.write_bytes(text))
        return record

    def completed(self, plan: BuildPlan, build_id: str) -> dict[int, dict]:
        """Records of the finished shards of this build (shard number → record).

        A record of another build, or for other rows than the plan's, is an error: the
        directory mixes two indexes.
        """
        done = {}
        for shard in plan.shards():
            path = self.record_path(shard.number)
            if not path.exists() or not self.shard_path(shard.number).exists():
                continue
            record = _read_json(path)
            self._check_record(record, shard, build_id)
            if "sketch_sha256" in record and not self.sketch_path(shard.number).exists():
                continue  # its sketches were deleted: the shard is recomputed
            done[shard.number] = record
        return done

    def _check_record(self, record: dict, shard: ShardSpec, build_id: str) -> None:
        name = self.record_path(shard.number).name
        if record.get("build_id") != build_id:
            raise ArtifactMismatchError(
                f"{name} belongs to another index build (build id {record.get('build_id')}, this "
                f"index is {build_id}); delete {self.directory / SHARDS} and rebuild, or use "
                "another directory."
            )
        if (record.get("start"), record.get("stop")) != (shard.start, shard.stop):
            raise ArtifactMismatchError(
                f"{name} holds rows [{record.get('start')}, {record.get('stop')}) but the plan "
                f"puts rows [{shard.start}, {shard.stop}) there; rebuild the index."
            )

    def open_shard(self, record: dict, *, verify: bool = True) -> np.ndarray:
        """A shard's stored values [rows, dim], memory-mapped read-only."""
        path = self.shard_path(record["shard"])
        if verify:
            self._check_file(path, record["sha256"], f"shard {record['shard']}")
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ArtifactCorruptError(
                f"{path} cannot be read ({error}); delete it and its .json, then resume the build."
            ) from None
        expected = (record["stop"] - record["start"], record["dim"])
        if values.shape != expected or str(values.dtype) != record["dtype"]:
            raise ArtifactCorruptError(
                f"{path} holds {values.dtype} {values.shape}, its record says {record['dtype']} "
                f"{expected}; delete it and its .json, then resume the build."
            )
        return values

    def open_sketches(self, record: dict, sketch_dim: int, *, verify: bool = True) -> np.ndarray:
        """A shard's first-stage sketches [rows, sketch_dim] fp16, memory-mapped read-only.

        Raises:
            ArtifactMismatchError: the shard has no sketches, or sketches of another size
                (built for another first_stage_dim or search).
        """
        number = record["shard"]
        if record.get("sketch_dim") != sketch_dim:
            raise ArtifactMismatchError(
                f"shard {number} holds {record.get('sketch_dim') or 'no'} first-stage sketch "
                f"values per row, the index's config asks for first_stage_dim={sketch_dim}; "
                "rebuild the index with overwrite=True (or `fastinf index --overwrite`)."
            )
        path = self.sketch_path(number)
        if verify:
            self._check_file(path, record["sketch_sha256"], f"sketches of shard {number}")
        try:
            sketches = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ArtifactCorruptError(
                f"{path} cannot be read ({error}); delete it and shard_{number:05d}.json, then "
                "resume the build."
            ) from None
        if sketches.shape != (record["stop"] - record["start"], sketch_dim):
            raise ArtifactCorruptError(
                f"{path} holds {sketches.shape} sketches, its record says "
                f"{(record['stop'] - record['start'], sketch_dim)}; delete it and "
                f"shard_{number:05d}.json, then resume the build."
            )
        return sketches

    def _check_file(self, path: Path, sha256: str, what: str) -> None:
        if not path.exists():
            raise ArtifactCorruptError(
                f"the index's {what} ({path}) is missing; resume or rebuild the index."
            )
        if file_sha256(path) != sha256:
            raise ArtifactCorruptError(
                f"the index's {what} ({path}) does not match its checksum: the file is truncated "
                "or altered; delete it (and its .json for a shard) and resume the build."
            )

    def _is_own(self, path: Path) -> bool:
        """Whether `path` (inside the directory) is a file or folder an index build writes."""
        name = path.relative_to(self.directory).as_posix().removesuffix(TEMPORARY_SUFFIX)
        top = (MANIFEST, ORDER, f"{COMPRESSOR}.json", f"{COMPRESSOR}.safetensors")
        return name in (*top, SEARCH_FILE, SHARDS) or bool(_SHARD_FILE.fullmatch(name))

    def remove(self) -> None:
        """Delete this index's files (for a rebuild), and only those.

        Raises:
            ValueError: the folder holds anything an index build does not write (named), or
                an `index.json` that is not a fastinf index: nothing is deleted then.
        """
        if not self.directory.is_dir():
            return
        if self.manifest_path.exists() and _read_json(self.manifest_path).get("kind") != KIND:
            raise ValueError(
                f"{self.manifest_path} is not a fastinf index; it was not replaced. Choose "
                "another folder."
            )
        entries = [p for p in sorted(self.directory.rglob("*")) if p.name != LOCK_NAME]
        foreign = [p.relative_to(self.directory).as_posix() for p in entries if not self._is_own(p)]
        if foreign:
            raise ValueError(
                f"{self.directory} holds files fastinf did not write ({', '.join(foreign[:5])}"
                f"{', …' if len(foreign) > 5 else ''}); nothing was deleted. Move them away or "
                "choose another folder."
            )
        for path in reversed(entries):  # files before the folder holding them
            path.rmdir() if path.is_dir() else path.unlink()

    def remove_temporary(self) -> None:
        """Drop half-written files a killed build left behind (its own names only: a user's
        `notes.tmp` is not an index file)."""
        for pattern in (f"*{TEMPORARY_SUFFIX}", f"{SHARDS}/*{TEMPORARY_SUFFIX}"):
            for path in self.directory.glob(pattern):
                if self._is_own(path):
                    path.unlink(missing_ok=True)

    # -- search structure ------------------------------------------------------------------
    @property
    def search_path(self) -> Path:
        return self.directory / SEARCH_FILE

    def write_search(self, write: Callable[[str], None]) -> str:
        """Write the faiss file through `write(path)`; return its sha256."""
        atomic_write(self.search_path, lambda tmp: write(str(tmp)))
        return file_sha256(self.search_path)

    def check_search(self, sha256: str) -> str:
        self._check_file(self.search_path, sha256, "search structure")
        return str(self.search_path)
