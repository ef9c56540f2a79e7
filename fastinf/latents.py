"""VAE latents of a training set, encoded once into a resumable, checksummed store.

    store = LatentStore.build("latents/", vae, images)   # resumes a killed build
    store = LatentStore.open("latents/", vae)            # checks it was made by this VAE
    engine = InfluenceEngine(unet, schedule, store.dataset())   # attribution in latent space
    query_latents = encode_images(vae, query_images)     # queries go the same way

Latent diffusion attributes in the VAE's latent space (as the paper's latent experiments
do): a training image becomes the mean of the VAE's latent distribution times its
`scaling_factor`, deterministic, so a store is a pure function of the VAE and the images.

Layout (every file is fastinf's own; nothing else in the folder is touched):

    DIR/latents.json               manifest: VAE fingerprint and scaling factor, dataset
                                   fingerprint, count, shard size, latent shape; `complete`
    DIR/latents_00007.safetensors  rows [7·S, 8·S): `latents` [n, c, h, w] float32, `cond`
                                   [n] int64 class labels (-1: none) or, for a captioned
                                   dataset, `states` [n, L, D] float32: each caption as the
                                   pipeline's text encoder encodes it
    DIR/latents_00007.json         that shard's rows and SHA-256, written after it

A captioned dataset (items `(image, caption)`, e.g. an image folder with `metadata.jsonl`)
needs `captions=`, a `fastinf.text.CaptionCache`: each distinct caption is encoded once, and
the manifest records the text encoder's fingerprint beside the VAE's. Its items are then
`(latent, states [L, D])`, what a cross-attention UNet is called with.

A build writes the manifest first, then each shard and its record; rerun after a kill, it
keeps every shard whose record and checksum agree and encodes the rest. A folder made for
another VAE or dataset is refused (`ArtifactMismatchError`), never overwritten. Reading
streams shard by shard (`LatentDataset` holds one shard at a time), and its fingerprint
comes from the manifest's checksums, without decoding.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from .artifacts import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    atomic_write,
    atomic_write_text,
    canonical_digest,
    dataset_fingerprint,
    file_sha256,
    model_fingerprint,
)
from .data import split_item, validate_images
from .locks import writer_lock
from .text import CaptionCache, PromptEncoder

__all__ = ["LatentDataset", "LatentStore", "encode_images"]

MANIFEST = "latents.json"
FORMAT = 1


def encode_images(vae: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """Latents [N, c, h, w] of images [N, C, H, W] in [-1, 1]: the mean of the VAE's
    latent distribution times `vae.config.scaling_factor` (float32, on the CPU)."""
    param = next(vae.parameters())
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    parts = []
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(param.device, param.dtype)
                mean = vae.encode(batch).latent_dist.mean
                parts.append((mean * scale).float().cpu().contiguous())
    finally:
        vae.train(was_training)
    return torch.cat(parts).contiguous()


def _vae_identity(vae: nn.Module) -> dict:
    return {
        "fingerprint": model_fingerprint(vae),
        "scaling_factor": float(getattr(vae.config, "scaling_factor", 1.0)),
    }


def _item(dataset: Dataset, index: int, captioned: bool) -> tuple[Tensor, int | str]:
    image, cond = split_item(dataset[index])
    if isinstance(cond, Tensor) and cond.dim() > 0:
        raise ValueError(
            f"item {index} carries a conditioning tensor {tuple(cond.shape)}; the latent store "
            "keeps class labels or captions; keep text states beside it (TextStatesDataset)."
        )
    if captioned and not isinstance(cond, str):
        raise ValueError(
            f"item {index} has no caption (cond {cond!r}); every item of a captioned dataset "
            "needs one (an image folder's metadata.jsonl: file_name, text)."
        )
    if isinstance(cond, str) and not captioned:
        raise ValueError(
            f"item {index} has the caption {cond[:40]!r}; pass captions=CaptionCache(folder, "
            "encoder) to encode the captions with the pipeline's text encoder."
        )
    return torch.as_tensor(image), cond if captioned else int(cond)


class LatentStore:
    """A finished latent store on disk (see the module docstring)."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.manifest = manifest

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        directory: str | os.PathLike,
        vae: nn.Module,
        dataset: Dataset,
        *,
        shard_size: int = 1024,
        batch_size: int = 32,
        verify: str | None = None,
        captions: CaptionCache | None = None,
        fingerprint: str | None = None,
    ) -> LatentStore:
        """Encode every item of `dataset` (images in [-1, 1], optional labels, or captions
        encoded through `captions`) into `directory`, resuming the shards a killed build
        finished; returns the store.

        `fingerprint` is the dataset's `dataset_fingerprint(dataset, verify)` when the caller
        already computed it (it is computed here otherwise).

        Raises:
            ArtifactMismatchError: the folder holds latents of another VAE, text encoder or
                dataset.
        """
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r} must be an integer >= 1.")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty; there is nothing to encode.")
        directory = Path(directory)
        captioned = captions is not None
        first = _item(dataset, 0, captioned)[0]
        validate_images(first, tuple(first.shape), what="training image 0")
        identity = {
            "format": FORMAT,
            "vae": _vae_identity(vae),
            "text": captions.encoder.fingerprint if captioned else None,
            "dataset": fingerprint or dataset_fingerprint(dataset, verify),
            "count": len(dataset),
            "shard_size": shard_size,
        }
        with writer_lock(directory, "fastinf latent store"):
            path = directory / MANIFEST
            if path.exists():
                found = _read_manifest(path)
                _check_identity(found, identity, directory)
                manifest = found
            else:
                manifest = {**identity, "complete": False}
                atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
            shape = None
            for number in range(math.ceil(len(dataset) / shard_size)):
                begin = number * shard_size
                end = min(begin + shard_size, len(dataset))
                if _shard_ok(directory, number, end - begin):
                    continue
                items = [_item(dataset, index, captioned) for index in range(begin, end)]
                images = torch.stack([image for image, _ in items])
                validate_images(images, tuple(images.shape[1:]), what=f"images {begin}..{end - 1}")
                latents = encode_images(vae, images, batch_size)
                conds = [cond for _, cond in items]
                tensors = {"latents": latents}
                if captioned:
                    tensors["states"] = captions.states(conds)
                else:
                    tensors["cond"] = torch.tensor(conds, dtype=torch.int64)
                shard = _shard_path(directory, number)
                atomic_write(shard, lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
                record = {"rows": end - begin, "sha256": file_sha256(shard)}
                atomic_write_text(shard.with_suffix(".json"), json.dumps(record) + "\n")
                shape = list(latents.shape[1:])
            if shape is None:
                shape = list(load_file(str(_shard_path(directory, 0)))["latents"].shape[1:])
            manifest = {**manifest, "latent_shape": shape, "complete": True}
            manifest["shards"] = [
                json.loads(_shard_path(directory, n).with_suffix(".json").read_text())["sha256"]
                for n in range(math.ceil(len(dataset) / shard_size))
            ]
            atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
        return cls(directory, manifest)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        vae: nn.Module | None = None,
        encoder: PromptEncoder | None = None,
    ) -> LatentStore:
        """A finished store; with `vae` (`encoder`), refused unless it was encoded by that
        VAE (its captions by that text encoder)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} holds no latent store ({MANIFEST} missing); build it with "
                "LatentStore.build(directory, vae, dataset)."
            )
        manifest = _read_manifest(path)
        if not manifest.get("complete"):
            raise ArtifactCorruptError(
                f"the latent store in {directory} is unfinished; run the same build again to "
                "resume it."
            )
        if vae is not None and manifest["vae"] != _vae_identity(vae):
            raise ArtifactMismatchError(
                f"the latent store in {directory} was encoded by another VAE (fingerprint "
                f"{manifest['vae']['fingerprint']}, this one {model_fingerprint(vae)}); "
                "encode the training set with this VAE into a new folder."
            )
        if encoder is not None and manifest.get("text") != encoder.fingerprint:
            raise ArtifactMismatchError(
                f"the captions of the latent store in {directory} were encoded by another text "
                f"encoder ({manifest.get('text')}, this one {encoder.fingerprint}); encode the "
                "training set with this pipeline into a new folder."
            )
        return cls(directory, manifest)

    def verify(self) -> None:
        """Check every shard against its recorded SHA-256 (ArtifactCorruptError names it)."""
        for number, digest in enumerate(self.manifest["shards"]):
            shard = _shard_path(self.directory, number)
            if not shard.exists() or file_sha256(shard) != digest:
                raise ArtifactCorruptError(
                    f"latent shard {shard} is missing or altered (SHA-256 differs from the "
                    "manifest); delete it and its .json record and rerun the build to re-encode it."
                )

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def dataset(self) -> LatentDataset:
        """The latents as a map-style dataset of `(latent [c, h, w], label)` items."""
        return LatentDataset(self)


class LatentDataset(Dataset):
    """A latent store's items, read shard by shard (one shard in memory at a time).

    Its fingerprint (for the provenance of curvatures and indexes) comes from the store's
    manifest: the VAE, the source dataset and every shard's SHA-256.
    """

    def __init__(self, store: LatentStore):
        self.store = store
        self.shard_size = int(store.manifest["shard_size"])
        self.sample_shape = tuple(store.manifest["latent_shape"])
        self._cached: tuple[int, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.store)

    def _shard(self, number: int) -> dict[str, Tensor]:
        cached = self._cached
        if cached is None or cached[0] != number:
            shard = _shard_path(self.store.directory, number)
            try:
                cached = (number, load_file(str(shard)))
            except (OSError, RuntimeError) as error:
                raise ArtifactCorruptError(
                    f"latent shard {shard} cannot be read ({error}); run store.verify() or "
                    "rebuild the store."
                ) from error
            self._cached = cached
        return cached[1]

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"latent {index} is out of range 0..{len(self) - 1}.")
        shard = self._shard(index // self.shard_size)
        row = index % self.shard_size
        if "states" in shard:
            return shard["latents"][row], shard["states"][row]
        return shard["latents"][row], int(shard["cond"][row])

    def fingerprint(self, verify: str | None = None) -> str:
        """`"<mode>:<16 hex digits>"` from the manifest, whose checksums cover every shard's
        bytes (no shard is read; the digest is the same in either mode)."""
        manifest = self.store.manifest
        fields = {key: manifest[key] for key in ("vae", "dataset", "count", "shards")}
        if manifest.get("text"):
            fields["text"] = manifest["text"]
        return f"{verify or 'full'}:" + canonical_digest({"latents": fields})[:16]


def _shard_path(directory: Path, number: int) -> Path:
    return directory / f"latents_{number:05d}.safetensors"


def _shard_ok(directory: Path, number: int, rows: int) -> bool:
    """Whether shard `number` was finished: its record exists and matches its bytes."""
    shard = _shard_path(directory, number)
    record = shard.with_suffix(".json")
    if not (shard.exists() and record.exists()):
        return False
    try:
        found = json.loads(record.read_text())
    except ValueError:
        return False
    return found.get("rows") == rows and found.get("sha256") == file_sha256(shard)


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactCorruptError(
            f"{path} cannot be read as a latent-store manifest ({error}); move the folder "
            "aside and build the store again."
        ) from error


def _check_identity(found: dict, expected: dict, directory: Path) -> None:
    for key, what in (
        ("vae", "another VAE"),
        ("text", "another text encoder"),
        ("dataset", "another dataset"),
        ("count", "another number of images"),
        ("shard_size", "another shard size"),
        ("format", "another version of fastinf"),
    ):
        if found.get(key) != expected[key]:
            raise ArtifactMismatchError(
                f"{directory} holds latents of {what} ({key}: {found.get(key)} vs "
                f"{expected[key]}); build into a new folder (nothing here was changed)."
            )
