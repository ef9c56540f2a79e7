"""Captions and prompts as a text-to-image pipeline's own text encoder sees them.

    encoder = PromptEncoder(text_encoder, tokenizer)     # frozen, never attributed
    states = encoder.encode(["a photo of a 3"])          # [1, L, D] hidden states
    cache = CaptionCache("captions/", encoder)           # each distinct caption encoded once
    states = cache.states(captions)                      # [N, L, D], from disk when seen

A caption becomes what a Stable-Diffusion-style UNet cross-attends to: the tokenizer pads or
truncates it to the tokenizer's `model_max_length` tokens, and the text encoder's last hidden
states [L, D] are its conditioning (the states the pipelines' own `encode_prompt` passes as
`encoder_hidden_states` without classifier-free guidance). The encoder is frozen: eval mode,
no gradients, and its layers are never part of θ.

**Cache layout** (every file is fastinf's own; nothing else in the folder is touched):

    DIR/captions.json                manifest: the encoder's fingerprint, L and D
    DIR/captions_00003.safetensors   `states` [n, L, D] float32 of n captions
    DIR/captions_00003.json          their keys (SHA-256 of each caption's UTF-8), the
                                     shard's own SHA-256; written after the shard

A caption's key is the SHA-256 of its text, so the same caption always reads back the same
states and another caption never collides. New captions are appended as a new shard, then
its record; a shard without a record (a killed write) is encoded again. A cache of another
encoder or tokenizer is refused (`ArtifactMismatchError`), never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .artifacts import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    atomic_write,
    atomic_write_text,
    canonical_digest,
    file_sha256,
    model_fingerprint,
)
from .locks import writer_lock

__all__ = ["CaptionCache", "PromptEncoder", "caption_key", "quiet_loading"]

MANIFEST = "captions.json"
FORMAT = 1


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Without the libraries' per-component progress bars (a command's output stays its own)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for library in (diffusers_logging, transformers_logging):
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            restore.append(library)
    try:
        yield
    finally:
        for library in restore:
            library.enable_progress_bar()


def caption_key(caption: str) -> str:
    """The cache key of a caption: SHA-256 (hex) of its UTF-8 text."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def _check_captions(captions, what: str) -> list[str]:
    if isinstance(captions, str):
        raise TypeError(f"{what} must be a list of strings, not one string; wrap it in [...].")
    captions = list(captions)
    for position, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(
                f"{what}[{position}] is a {type(caption).__name__}, not a string; captions and "
                "prompts are text."
            )
    return captions


class PromptEncoder:
    """A text-to-image pipeline's frozen tokenizer and text encoder (transformers).

    Args:
        text_encoder: e.g. a `CLIPTextModel`; its first output is [B, L, D] hidden states.
        tokenizer: its tokenizer; captions are padded or truncated to `model_max_length`.
        batch_size: captions encoded per forward pass.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, *, batch_size: int = 64):
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(tokenizer.model_max_length)
        if not 0 < self.max_length <= 1_000_000:
            raise ValueError(
                f"the tokenizer's model_max_length is {tokenizer.model_max_length}; set it to "
                "the text encoder's number of positions in tokenizer/tokenizer_config.json."
            )
        self._fingerprint: str | None = None

    @property
    def width(self) -> int:
        """D: the width of the hidden states."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def fingerprint(self) -> str:
        """16 hex digits over the encoder's weights and the tokenizer's vocabulary and length:
        caches and latent stores record it, and refuse another encoder."""
        if self._fingerprint is None:
            vocab = sorted(self.tokenizer.get_vocab().items())
            fields = {
                "encoder": model_fingerprint(self.text_encoder),
                "tokenizer": type(self.tokenizer).__name__,
                "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
                "max_length": self.max_length,
            }
            self._fingerprint = canonical_digest(fields)[:16]
        return self._fingerprint

    def encode(self, captions: Sequence[str]) -> Tensor:
        """Hidden states [N, L, D] (float32, CPU) of `captions` (a list of strings)."""
        captions = _check_captions(captions, "captions")
        param = next(self.text_encoder.parameters())
        parts = []
        with torch.no_grad():
            for start in range(0, len(captions), self.batch_size):
                tokens = self.tokenizer(
                    captions[start : start + self.batch_size],
                    padding="max_length",
                    max_length=self.max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                hidden = self.text_encoder(tokens.input_ids.to(param.device))[0]
                parts.append(hidden.float().cpu())
        if not parts:
            return torch.empty(0, self.max_length, self.width)
        return torch.cat(parts).contiguous()


class CaptionCache:
    """Encoded captions on disk, each distinct caption encoded once (module docstring).

    Args:
        directory: the cache folder (created on first write).
        encoder: the `PromptEncoder` whose states it holds.
        shard_size: new captions encoded and written per shard.
    """

    def __init__(self, directory: str | os.PathLike, encoder: PromptEncoder, *, shard_size=4096):
        self.directory = Path(directory)
        self.encoder = encoder
        self.shard_size = int(shard_size)
        self._where: dict[str, tuple[int, int]] = {}
        self._loaded: tuple[int, Tensor] | None = None
        self._verified: set[int] = set()  # shards whose SHA-256 matched their record
        self._check_manifest(write=False)
        self._scan()

    def _identity(self) -> dict:
        return {
            "format": FORMAT,
            "encoder": self.encoder.fingerprint,
            "max_length": self.encoder.max_length,
            "width": self.encoder.width,
        }

    def _check_manifest(self, *, write: bool) -> None:
        path = self.directory / MANIFEST
        if not path.exists():
            if write:
                atomic_write_text(path, json.dumps(self._identity(), indent=1) + "\n")
            return
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ArtifactCorruptError(
                f"{path} cannot be read as a caption-cache manifest ({error}); move the folder "
                "aside and let fastinf encode the captions again."
            ) from error
        if found != self._identity():
            raise ArtifactMismatchError(
                f"the caption cache in {self.directory} holds states of another text encoder or "
                f"tokenizer ({found.get('encoder')}, this one {self.encoder.fingerprint}); use a "
                "new folder for this pipeline (nothing here was changed)."
            )

    def _shards(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        numbers = []
        for entry in os.scandir(self.directory):
            stem, _, suffix = entry.name.rpartition(".")
            if suffix == "json" and stem.startswith("captions_") and stem[9:].isdigit():
                numbers.append(int(stem[9:]))
        return sorted(numbers)

    def _scan(self) -> None:
        """Index every recorded shard: caption key → (shard, row)."""
        for number in self._shards():
            record = self._record(number)
            for row, key in enumerate(record["keys"]):
                self._where.setdefault(key, (number, row))

    def _record(self, number: int) -> dict:
        path = _shard_path(self.directory, number).with_suffix(".json")
        try:
            record = json.loads(path.read_text())
            if not isinstance(record.get("keys"), list):
                raise ValueError("no list of keys")
        except (OSError, ValueError) as error:
            raise ArtifactCorruptError(
                f"caption-cache record {path} cannot be read ({error}); delete it and its "
                ".safetensors shard, and those captions are encoded again."
            ) from error
        return record

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._where

    def states(self, captions: Sequence[str]) -> Tensor:
        """States [N, L, D] of `captions`; captions not yet cached are encoded once and
        written as a new shard (their states are used as encoded, not read back)."""
        captions = _check_captions(captions, "captions")
        keys = [caption_key(caption) for caption in captions]
        pairs = zip(keys, captions, strict=True)
        missing = {key: caption for key, caption in pairs if key not in self._where}
        fresh = self._add(missing) if missing else {}
        rows = torch.empty(len(captions), self.encoder.max_length, self.encoder.width)
        stored = [(position, key) for position, key in enumerate(keys) if key not in fresh]
        for position, key in sorted(stored, key=lambda pair: self._where[pair[1]]):
            number, row = self._where[key]
            rows[position] = self._shard(number)[row]
        for position, key in enumerate(keys):
            if key in fresh:
                rows[position] = fresh[key]
        return rows

    def _add(self, missing: dict[str, str]) -> dict[str, Tensor]:
        """Encode and write the captions not cached yet; returns their states by key."""
        fresh = {}
        with writer_lock(self.directory, "fastinf caption cache"):
            self._check_manifest(write=True)
            self._scan()  # another process may have added some meanwhile
            todo = [(key, text) for key, text in missing.items() if key not in self._where]
            for start in range(0, len(todo), self.shard_size):
                chunk = todo[start : start + self.shard_size]
                number = max(self._shards(), default=-1) + 1
                states = self.encoder.encode([text for _, text in chunk])
                shard = _shard_path(self.directory, number)
                atomic_write(shard, lambda tmp, s=states: save_file({"states": s}, str(tmp)))
                record = {"keys": [key for key, _ in chunk], "sha256": file_sha256(shard)}
                atomic_write_text(shard.with_suffix(".json"), json.dumps(record) + "\n")
                self._verified.add(number)
                for row, (key, _) in enumerate(chunk):
                    self._where[key] = (number, row)
                    fresh[key] = states[row]
        return fresh

    def _shard(self, number: int) -> Tensor:
        if self._loaded is None or self._loaded[0] != number:
            shard = _shard_path(self.directory, number)
            if number not in self._verified:  # each shard's bytes are checked once
                record = self._record(number)
                if not shard.exists() or file_sha256(shard) != record.get("sha256"):
                    raise ArtifactCorruptError(
                        f"caption-cache shard {shard} is missing or altered (SHA-256 differs "
                        "from its record); delete it and its .json record, and those captions "
                        "are encoded again."
                    )
                self._verified.add(number)
            self._loaded = (number, load_file(str(shard))["states"])
        return self._loaded[1]


def _shard_path(directory: Path, number: int) -> Path:
    return directory / f"captions_{number:05d}.safetensors"
