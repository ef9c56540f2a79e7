"""Training sets read from image files or tar shards one item at a time (map-style).

`ImageFolderDataset` and `TarShardDataset` (layouts in `fastinf.shard_files`; `open_image_data`
picks by layout) serve the items of `fastinf.data`: `(image [C, H, W] float32, cond)`, 8-bit
pixels p mapped to p / 127.5 − 1 ∈ [-1, 1] (the inverse of `fastinf.imaging`), cond an int64
label or `UNCONDITIONAL`. Only the file index is held in memory (each example's name, size,
offset and label: tens of bytes per example), never the pixels. The datasets pickle without
their open files, so DataLoader workers (`num_workers > 0`) each open their own.

Every image must have the declared `sample_shape`: another size or another number of
channels is an error naming the file (and its shard), unless `resize=True` (bicubic,
antialiased) or `convert=True` (PIL's mode conversion, e.g. palette or RGB to grey) asks to
adapt it on the fly. An unreadable image is an error naming the file and shard when it is
read; `check()` decodes items ahead of long work to find one early.

**Shards and ranks.** Examples are numbered shard by shard, so data shard s holds the
contiguous examples `shard_bounds[s]` (an image folder: one range per class folder), and
work on a range of examples reads only the shards the range overlaps. The index build deals
row ranges of `IndexConfig.shard_size` examples round-robin to the ranks
(`fastinf.distributed.owned`): when every range boundary is a data shard boundary — data
shards of `shard_size` examples each (the last may be shorter), an index shard size that is
a multiple of it, and the dataset's own order as the build order — each rank reads only its
own data shards, apart from rank 0 reading the first `calibration_examples` to calibrate.
Otherwise a data shard cut by a range boundary is read by the ranks on both sides. Exact
scoring under torchrun deals blocks of `ScoreConfig.block_size` examples the same way, so the
same rule holds with the block size in place of the index shard size.

**Fingerprint.** `fingerprint(verify)` is a stored dataset's own, cheap fingerprint, in the
`"<mode>:<16 hex>"` form of `fastinf.artifacts.dataset_fingerprint`: a SHA-256 of the decoding
settings, the index (shard names and boundaries; every example's name, size, offset and
label) and the stored bytes of every image ("full") or of 64 evenly spaced ones ("sample").
Hashing stored bytes costs a read per image instead of a decode.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import io
import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .artifacts import FULL_VERIFY_LIMIT, VERIFY_MODES
from .data import UNCONDITIONAL
from .shard_files import (
    IMAGE_SUFFIXES,
    MemberReader,
    data_layout,
    image_names,
    shard_index,
    shard_paths,
)

__all__ = [
    "ImageFolderDataset",
    "StoredImageDataset",
    "TarShardDataset",
    "decode_image",
    "open_image_data",
]

METADATA = "metadata.jsonl"  # an image folder's captions (diffusers' text-to-image layout)
SAMPLE_ITEMS = 64  # images hashed by a "sample" fingerprint, as `dataset_fingerprint` samples
_MODES = {1: "L", 3: "RGB"}
_PIXEL_SCALE = 127.5


def decode_image(
    data: bytes,
    sample_shape: tuple[int, int, int],
    *,
    where: str | Callable[[], str],
    resize: bool = False,
    convert: bool = False,
) -> Tensor:
    """An encoded image (PNG, JPEG, …) as [C, H, W] float32 in [-1, 1] (p / 127.5 − 1).

    Args:
        data: the file's bytes.
        sample_shape: the declared (C, H, W); C is 1 (grey, PIL mode "L") or 3 ("RGB").
        where: how errors name the image (its file, and shard), or a function that says it
            (called only for an error).
        resize: resize an image of another size (bicubic) instead of refusing it.
        convert: convert an image of another mode to C channels instead of refusing it.
    Raises:
        ValueError: naming `where`, the problem and the fix.
    """
    channels, height, width = sample_shape
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"{_named(where)} is not a readable image ({type(error).__name__}: {error}); "
            "replace the file, or remove it from the training set."
        ) from None
    if picture.mode != _MODES[channels]:
        if not convert:
            raise ValueError(
                f"{_named(where)} is a {picture.mode} image but the dataset declares "
                f"{channels} channel(s) ({_MODES[channels]}); convert the images, or pass "
                "convert=True to convert them when read."
            )
        picture = picture.convert(_MODES[channels])
    if picture.size != (width, height):
        if not resize:
            raise ValueError(
                f"{_named(where)} is {picture.width}×{picture.height} pixels but the dataset "
                f"declares {width}×{height} (W×H); resize the images, or pass resize=True to "
                "resize them when read."
            )
        picture = picture.resize((width, height), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(picture, dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1).contiguous()
    return pixels.to(torch.float32).div_(_PIXEL_SCALE).sub_(1.0)


def _named(where: str | Callable[[], str]) -> str:
    return where() if callable(where) else where


def _spread(size: int, count: int | None) -> list[int]:
    """`count` evenly spaced positions of `size` (all of them for None), as
    `dataset_fingerprint` samples them."""
    if count is None or count >= size:
        return list(range(size))
    return sorted({round(i * (size - 1) / max(count - 1, 1)) for i in range(count)})


def _count(items: list) -> int:
    return len(items)


class StoredImageDataset(Dataset, abc.ABC):
    """Base of the datasets whose images are stored files: decoding, labels, shards,
    `fingerprint` and `check`. Subclasses fill the index and read an example's bytes.

    Attributes: `sample_shape` (C, H, W); `conditional`; `labels` [N] int64 (`UNCONDITIONAL`
    when unconditional); `shard_names` [S]; `shard_bounds` [S] (start, stop) example ranges.
    """

    def __init__(
        self,
        sample_shape: Sequence[int],
        *,
        resize: bool,
        convert: bool,
        names: list[str],
        sizes: Sequence[int],
        labels: Sequence[int] | None,
        shard_names: list[str],
        shard_sizes: Sequence[int],
    ):
        shape = tuple(int(size) for size in sample_shape)
        if len(shape) != 3 or shape[0] not in _MODES or min(shape) < 1:
            raise ValueError(
                f"sample_shape={tuple(sample_shape)} must be (C, H, W) with C = 1 (grey) or "
                "3 (RGB) and H, W >= 1, e.g. the model's sample_shape."
            )
        if not names:
            raise ValueError(f"{self._describe()} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        self.sample_shape = shape
        self.resize, self.convert = bool(resize), bool(convert)
        self.names = np.array([os.fsencode(name) for name in names], dtype=np.bytes_)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.conditional = labels is not None
        count = len(names)
        self.labels = (
            np.full(count, UNCONDITIONAL, np.int64)
            if labels is None
            else np.asarray(labels, dtype=np.int64)
        )
        self.shard_names = list(shard_names)
        self._starts = [0, *itertools.accumulate(int(size) for size in shard_sizes)]

    def _describe(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def _read(self, index: int) -> bytes:
        """The stored bytes of example `index`."""

    @abc.abstractmethod
    def _where(self, index: int) -> str:
        """Where example `index` is stored, for error messages."""

    def _index_columns(self) -> list[np.ndarray]:
        return [self.names, self.sizes, self.labels]

    # -- shards ----------------------------------------------------------------------------
    @property
    def shard_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each shard's examples: shard s holds examples start..stop-1."""
        return list(itertools.pairwise(self._starts))

    @property
    def shard_size(self) -> int | None:
        """Examples per shard when every shard but the last has the same count (the size an
        index shard size must be a multiple of for ranks to read disjoint shards), else None."""
        counts = [stop - start for start, stop in self.shard_bounds]
        if all(count == counts[0] for count in counts[:-1]) and counts[-1] <= counts[0]:
            return counts[0]
        return None

    def shard_of(self, index: int) -> int:
        """The shard that holds example `index`."""
        return bisect.bisect_right(self._starts, index) - 1

    # -- items -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | int]:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"example {index} is outside the {size} examples of {self}.")
        index = int(index) % size
        image = decode_image(
            self._read(index),
            self.sample_shape,
            where=lambda: self._where(index),
            resize=self.resize,
            convert=self.convert,
        )
        if not self.conditional:
            return image, UNCONDITIONAL
        return image, torch.tensor(int(self.labels[index]), dtype=torch.int64)

    def check(self, count: int | None = None, *, num_workers: int = 0) -> int:
        """Decode `count` evenly spaced items (None: every item) before long work.

        Returns how many were decoded; raises the first unreadable or mismatched image's
        ValueError (naming its file and shard).
        """
        positions = _spread(len(self), count)
        loader = DataLoader(
            Subset(self, positions), batch_size=64, num_workers=num_workers, collate_fn=_count
        )
        return sum(loader)

    def fingerprint(self, verify: str | None = None) -> str:
        """`"<mode>:<16 hex digits>"` over the settings, the index and the stored bytes of
        every image ("full") or of 64 evenly spaced ones ("sample"); None: "full" up to
        `fastinf.artifacts.FULL_VERIFY_LIMIT` examples, "sample" above."""
        size = len(self)
        if verify is None:
            verify = "full" if size <= FULL_VERIFY_LIMIT else "sample"
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}; or None for auto.")
        settings = {
            "kind": type(self).__name__,
            "sample_shape": self.sample_shape,
            "resize": self.resize,
            "convert": self.convert,
            "conditional": self.conditional,
            "shards": self.shard_names,
            "starts": self._starts,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for column in self._index_columns():
            digest.update(np.ascontiguousarray(column).tobytes())
        for position in _spread(size, None if verify == "full" else SAMPLE_ITEMS):
            digest.update(self._read(position))
        return f"{verify}:{digest.hexdigest()[:16]}"

    def __repr__(self) -> str:
        return f"{self._describe()} ({len(self)} images, {len(self.shard_names)} shards)"


class ImageFolderDataset(StoredImageDataset):
    """Images in a folder: `root/<class>/*.png|jpg|jpeg`, labels numbered by sorted class
    folder name (`classes`), or images directly in `root` (unconditional). Hidden files are
    skipped and files of other types ignored. Each class folder is a shard.

    **Captions.** A `root/metadata.jsonl` (the layout diffusers' text-to-image training
    scripts read: one JSON object per line, `file_name` relative to `root` and the caption
    under `caption_column`, "text" by default) makes a captioned dataset: every image needs
    exactly one caption, and items are `(image, caption str)` (class folders, if any, then
    only group the files). `captions` lists them in item order.

    Args:
        root: the folder.
        sample_shape: the declared (C, H, W) of every image (C = 1 or 3).
        resize, convert: adapt images of another size / mode instead of refusing them
            (`decode_image`).
        caption_column: the metadata.jsonl field that holds the caption.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        sample_shape: Sequence[int],
        *,
        resize: bool = False,
        convert: bool = False,
        caption_column: str = "text",
    ):
        self.root = Path(root)
        self.classes, files = _list_folder(self.root)
        names = [name for group in files for name in group]
        self.captions = _read_captions(self.root, names, caption_column)
        labels = None
        if self.classes:
            labels = [label for label, group in enumerate(files) for _ in group]
        super().__init__(
            sample_shape,
            resize=resize,
            convert=convert,
            names=names,
            sizes=[(self.root / name).stat().st_size for name in names],
            labels=labels,
            shard_names=self.classes or ["."],
            shard_sizes=[len(group) for group in files],
        )

    def _describe(self) -> str:
        return f"image folder {self.root}"

    def _index_columns(self) -> list[np.ndarray]:
        columns = super()._index_columns()
        if self.captions is not None:
            digest = hashlib.sha256(json.dumps(self.captions).encode()).digest()
            columns.append(np.frombuffer(digest, dtype=np.uint8))
        return columns

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | int | str]:
        image, label = super().__getitem__(index)
        if self.captions is None:
            return image, label
        return image, self.captions[int(index) % len(self)]

    def _read(self, index: int) -> bytes:
        return (self.root / os.fsdecode(self.names[index])).read_bytes()

    def _where(self, index: int) -> str:
        return f"image {self.root / os.fsdecode(self.names[index])}"


def _read_captions(root: Path, names: list[str], column: str) -> list[str] | None:
    """The caption of each of `names` from `root/metadata.jsonl`; None without that file."""
    path = root / METADATA
    if not path.is_file():
        return None
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(
                    f"{where} is not JSON ({error}); write one object per line, e.g. "
                    '{"file_name": "0001.png", "text": "a photo of a 3"}.'
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ValueError(f"{where} has no file_name; name the image it captions.")
            if not isinstance(row.get(column), str):
                raise ValueError(
                    f"{where} ({row['file_name']}) has no {column!r} caption string; add it, or "
                    "choose the caption field with caption_column."
                )
            name = Path(row["file_name"]).as_posix()
            if name in captions:
                raise ValueError(f"{where} captions {name} a second time; keep one line per image.")
            captions[name] = row[column]
    missing = [name for name in names if name not in captions]
    if missing:
        raise ValueError(
            f"image {root / missing[0]} has no caption in {path} ({len(missing)} of "
            f"{len(names)} images lack one); add a line "
            f'{{"file_name": "{missing[0]}", "{column}": "..."}} for each.'
        )
    stray = sorted(set(captions) - set(names))
    if stray:
        raise ValueError(
            f"{path} captions {stray[0]}, which is not an image of {root} ({len(stray)} such "
            "lines); fix the file_name or remove the line."
        )
    return [captions[name] for name in names]


def _list_folder(root: Path) -> tuple[list[str], list[list[str]]]:
    """(class names, image paths relative to `root` per class); no classes for a flat folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist.")
    folders = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and entry.name[0] != "."
    )
    flat = image_names(root)
    if flat:
        nested = [name for name in folders if image_names(root / name)]
        if nested:
            raise ValueError(
                f"image folder {root} holds images both directly and in subfolders (e.g. "
                f"{nested[0]}/): put every image in a class folder (class-conditional), or "
                "all of them in the folder itself (unconditional)."
            )
        return [], [flat]
    files = []
    for name in folders:
        images = image_names(root / name)
        if not images:
            raise ValueError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "remove it or add its images (classes are numbered by sorted folder name)."
            )
        files.append([f"{name}/{image}" for image in images])
    return folders, files


class TarShardDataset(StoredImageDataset):
    """Examples of tar shards in the webdataset layout (`fastinf.shard_files`), numbered
    shard by shard in member order; labels from `KEY.cls` members (every example has one,
    or none does).

    Args:
        shards: a brace pattern (`data/shard-{000000..000099}.tar`), a folder of .tar files,
            one .tar file, or a sequence of .tar paths.
        sample_shape: the declared (C, H, W) of every image (C = 1 or 3).
        resize, convert: adapt images of another size / mode instead of refusing them.
        index_cache: where shard indexes are cached (`fastinf.shard_files.index_cache_dir`).
    Building the dataset scans each shard's headers once (then reads its cached index);
    an item is one positioned read from its shard.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        sample_shape: Sequence[int],
        *,
        resize: bool = False,
        convert: bool = False,
        index_cache: str | os.PathLike | None = None,
    ):
        self.paths = shard_paths(shards)
        indexes = [shard_index(path, index_cache) for path in self.paths]
        names = [name for index in indexes for name in index.names]
        labels = [label for index in indexes for label in index.labels]
        unlabelled = [i for i, label in enumerate(labels) if label is None]
        if unlabelled and len(unlabelled) < len(labels):
            shard = next(s for s, index in enumerate(indexes) if None in index.labels)
            key = names[unlabelled[0]].rsplit(".", 1)[0]
            raise ValueError(
                f"member {names[unlabelled[0]]} of shard {self.paths[shard]} has no {key}.cls "
                "label while other examples have one; label every example, or none "
                "(unconditional)."
            )
        self.offsets = np.asarray([o for index in indexes for o in index.offsets], np.int64)
        self._reader = MemberReader()
        super().__init__(
            sample_shape,
            resize=resize,
            convert=convert,
            names=names,
            sizes=[size for index in indexes for size in index.sizes],
            labels=None if unlabelled else labels,
            shard_names=[path.name for path in self.paths],
            shard_sizes=[len(index) for index in indexes],
        )

    def _describe(self) -> str:
        return f"tar shards {self.paths[0].parent}"

    def _index_columns(self) -> list[np.ndarray]:
        return [*super()._index_columns(), self.offsets]

    def _read(self, index: int) -> bytes:
        path = self.paths[self.shard_of(index)]
        return self._reader.read(path, int(self.offsets[index]), int(self.sizes[index]))

    def _where(self, index: int) -> str:
        path = self.paths[self.shard_of(index)]
        return f"member {os.fsdecode(self.names[index])} of shard {path}"


def open_image_data(
    spec: str | os.PathLike,
    sample_shape: Sequence[int],
    *,
    resize: bool = False,
    convert: bool = False,
    index_cache: str | os.PathLike | None = None,
) -> StoredImageDataset:
    """The dataset stored at `spec`: a `TarShardDataset` for a brace pattern, a .tar file or
    a folder of .tar files, else an `ImageFolderDataset` (`fastinf.shard_files.data_layout`)."""
    if data_layout(spec) == "tars":
        return TarShardDataset(
            spec, sample_shape, resize=resize, convert=convert, index_cache=index_cache
        )
    return ImageFolderDataset(spec, sample_shape, resize=resize, convert=convert)
