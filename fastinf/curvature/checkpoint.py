"""A fit's progress on disk: the running float64 sums of its passes after each finished chunk.

`FitProgress` reads and writes one progress folder (`<out>/fit_progress/`, `PROGRESS_DIR`;
under torchrun only rank 0 touches it):

- `progress.json` (`MANIFEST`): `kind`, `format_version`, the fit's `identity` (the
  curvature config's fingerprint, the provenance of model, dataset, schedule and layers, and
  the count and SHA-256 of the fitted example ids in fit order), `chunk_examples`, and for
  each pass begun (`factors`, `eigenvalues`, `sketched_fisher`): its `completed` example
  range [[0, stop]] of the fit order, whether it is `complete`, the tensor `file` holding
  its sums and that file's `sha256`. `manifest_sha256` is the SHA-256 of the canonical
  JSON of all other fields (as for every artifact, `fastinf.artifacts`).
- `<pass>.<stop>.safetensors`: the pass's sums over examples [0, stop) of the fit order,
  the all-reduced ones under torchrun, with the number of examples summed (`examples`).

A save writes the new tensor file, then the manifest (both atomically), then deletes the
pass's previous tensor file: a kill at any moment leaves a manifest whose files exist and
match it. A folder made by another fit is refused with the difference named, never mixed in.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..artifacts import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    atomic_write,
    atomic_write_text,
    canonical_digest,
    file_sha256,
)
from ..locks import LOCK_NAME

__all__ = ["MANIFEST", "PROGRESS_DIR", "FitProgress"]

PROGRESS_DIR = "fit_progress"
MANIFEST = "progress.json"
KIND = "fastinf fit progress"
FORMAT_VERSION = 1
_TENSOR_FILE = re.compile(r"^[a-z_]+\.\d+\.safetensors(\.tmp)?$")


class FitProgress:
    """The progress folder of one fit (`<checkpoint_dir>/fit_progress`): what is recorded
    there, and its sums."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.record: dict = {}

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def load(self, identity: dict, chunk_examples: int) -> dict | None:
        """The recorded progress of the fit `identity` names (None: nothing recorded yet, and
        a new record with `chunk_examples` is started); half-written or superseded files of
        an earlier run are removed.

        Args:
            identity: what the fit is of (config fingerprint, provenance, examples).
            chunk_examples: the chunk size of a new record (a resumed one keeps its own).
        Raises:
            ArtifactMismatchError: the folder holds the progress of another fit.
            ArtifactCorruptError: the record or a tensor file it names is damaged.
        """
        identity = json.loads(json.dumps(identity))  # as JSON reads it back
        if not self.manifest_path.exists():
            self._remove_strays(keep=set())
            self.record = {
                "kind": KIND,
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "chunk_examples": chunk_examples,
                "passes": {},
            }
            return None
        record = self._read_manifest()
        self._check_identity(record["identity"], identity)
        for name, entry in record["passes"].items():
            path = self.directory / entry["file"]
            if not path.is_file() or file_sha256(path) != entry["sha256"]:
                raise ArtifactCorruptError(
                    f"{path} (the sums of the fit's {name!r} pass) is missing or does not "
                    f"match {self.manifest_path.name}; delete {self.directory} to start the "
                    "fit afresh."
                )
        self.record = record
        self._remove_strays(keep={entry["file"] for entry in record["passes"].values()})
        return record

    def sums(self, name: str) -> dict[str, Tensor]:
        """The sums saved for pass `name` (verified by `load`), on the CPU."""
        path = self.directory / self.record["passes"][name]["file"]
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ArtifactCorruptError(
                f"{path} cannot be read ({error}); delete {self.directory} to start the fit afresh."
            ) from None

    def save(self, name: str, stop: int, complete: bool, sums: dict[str, Tensor]) -> None:
        """Record that pass `name` has summed the examples [0, `stop`) of the fit order."""
        previous = self.record["passes"].get(name, {}).get("file")
        filename = f"{name}.{stop}.safetensors"
        path = atomic_write(
            self.directory / filename,
            lambda tmp: save_file(
                {key: value.detach().cpu().contiguous() for key, value in sums.items()}, str(tmp)
            ),
        )
        self.record["passes"][name] = {
            "completed": [[0, stop]],
            "complete": complete,
            "file": filename,
            "sha256": file_sha256(path),
        }
        fields = {k: v for k, v in self.record.items() if k != "manifest_sha256"}
        record = {**fields, "manifest_sha256": canonical_digest(fields)}
        atomic_write_text(self.manifest_path, json.dumps(record, indent=2, sort_keys=True))
        if previous is not None and previous != filename:
            (self.directory / previous).unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete this folder's progress files, and only those: the record first (so a kill
        midway leaves no record naming missing files), then the sums; the folder goes too
        unless it holds anything else, which is kept and named."""
        directory = self.directory
        if not directory.is_dir():
            return
        self.manifest_path.unlink(missing_ok=True)
        self._remove_strays(keep=set())
        others = sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)
        if others:
            print(
                f"fastinf: kept {directory}: it holds files the fit did not write "
                f"({', '.join(others[:5])}{', …' if len(others) > 5 else ''}).",
                file=sys.stderr,
            )
            return
        if not (directory / LOCK_NAME).exists():
            directory.rmdir()

    # -- internals -------------------------------------------------------------------------
    def _read_manifest(self) -> dict:
        path = self.manifest_path
        fresh = f"delete {self.directory} to start the fit afresh"
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactCorruptError(f"{path} is not valid JSON ({error}); {fresh}.") from None
        if not isinstance(record, dict) or record.get("kind") != KIND:
            raise ArtifactMismatchError(
                f"{path} is not the record of a fastinf fit's progress; move it away or "
                "choose another output folder."
            )
        if record.get("format_version") != FORMAT_VERSION:
            raise ArtifactMismatchError(
                f"{path} was written by another fastinf version (format "
                f"{record.get('format_version')}, this one reads {FORMAT_VERSION}); {fresh}."
            )
        fields = {k: v for k, v in record.items() if k != "manifest_sha256"}
        if canonical_digest(fields) != record.get("manifest_sha256"):
            raise ArtifactCorruptError(
                f"{path} was altered (it does not match its manifest_sha256); {fresh}."
            )
        return record

    def _check_identity(self, recorded: dict, identity: dict) -> None:
        differences = []
        for key in sorted(set(recorded) | set(identity)):
            old, new = recorded.get(key), identity.get(key)
            if old == new:
                continue
            if isinstance(old, dict) and isinstance(new, dict):
                names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                differences += [
                    f"{key}.{n}: {old.get(n)!r} then, {new.get(n)!r} now" for n in names
                ]
            else:
                differences.append(f"{key}: {old!r} then, {new!r} now")
        if differences:
            raise ArtifactMismatchError(
                f"{self.directory} holds the progress of another fit ({'; '.join(differences)}"
                "); rerun with the model, data and fit options it was made with to resume it, "
                f"or delete {self.directory} to start this fit afresh."
            )

    def _remove_strays(self, keep: set[str]) -> None:
        """Remove the tensor files (and half-written files) of this folder's kind that the
        record does not name: a killed save's or a superseded chunk's. Nothing else."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            ours = _TENSOR_FILE.match(path.name) or path.name == f"{MANIFEST}.tmp"
            if ours and path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)
