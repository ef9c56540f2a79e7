"""Where training images stored as files live, and how their bytes are read one at a time.

Two layouts (`data_layout`):

- **image folder**: `root/<class>/*.png` (or .jpg, .jpeg: `IMAGE_SUFFIXES`), the labels
  being the sorted class folder names numbered 0, 1, …; or the images directly in `root`
  (unconditional);
- **tar shards** in the webdataset layout: `shard-000000.tar`, … each holding `KEY.png` (or
  .jpg, .jpeg), optionally `KEY.cls` (the int class label as text) and other members of the
  same key (`KEY.json`, …; not read). Given as a folder of .tar files, one .tar file, or a
  brace pattern such as `data/shard-{000000..000099}.tar` (`expand_braces`).

Tar shards are read map-style with the standard library: `shard_index` scans a shard's
headers once with `tarfile` (data blocks are seeked over, not read) into a `ShardIndex` of
each example's image member offset and size and its label, and caches it as JSON in
fastinf's own cache folder (`index_cache_dir`), never beside the data; reading an example is
then one positioned read (`MemberReader`). Shards must be uncompressed .tar: a compressed
stream has no offsets to seek to.

This module imports no torch: the command line checks `--data` with it before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import tarfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "MemberReader",
    "ShardIndex",
    "data_layout",
    "expand_braces",
    "image_names",
    "index_cache_dir",
    "scan_shard",
    "shard_index",
    "shard_paths",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_INDEX_FORMAT = 1
_MAX_LABEL_BYTES = 64
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_LAYOUT_HELP = (
    "pass an image folder (root/<class>/*.png or images directly in root), a folder of .tar "
    "shards, one .tar shard, or a pattern such as data/shard-{000000..000099}.tar"
)


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order.

    `{000..012}` is a numeric range, zero-padded to the width of its first bound when that
    bound has a leading zero; `{a,b}` a list. Several groups expand to their product, the
    last group varying fastest. A pattern without braces stands for itself.
    """
    groups = _BRACE.findall(pattern)
    if not groups:
        if "{" in pattern or "}" in pattern:
            raise ValueError(
                f"{pattern}: unbalanced or nested braces; write ranges as {{000000..000099}} "
                "and lists as {a,b}, one level deep."
            )
        return [pattern]
    choices = []
    for group in groups:
        bounds = _RANGE.match(group)
        if bounds:
            first, last = bounds.groups()
            step = 1 if int(last) >= int(first) else -1
            width = len(first) if first.startswith("0") and len(first) > 1 else 0
            numbers = range(int(first), int(last) + step, step)
            choices.append([str(n).zfill(width) for n in numbers])
        elif "," in group:
            choices.append(group.split(","))
        else:
            raise ValueError(
                f"{pattern}: the group {{{group}}} is neither a range {{first..last}} of "
                "integers nor a list {a,b}; fix the pattern."
            )
    parts = _BRACE.split(pattern)
    fixed = parts[0::2]
    if any("{" in part or "}" in part for part in fixed):
        raise ValueError(f"{pattern}: nested braces are not supported; expand them by hand.")
    names = []
    for chosen in itertools.product(*choices):
        names.append(
            fixed[0] + "".join(c + rest for c, rest in zip(chosen, fixed[1:], strict=True))
        )
    return names


def _is_pattern(spec: str) -> bool:
    return "{" in spec or "}" in spec


def image_names(folder: str | os.PathLike) -> list[str]:
    """Names of the image files directly in `folder` (`IMAGE_SUFFIXES`, any case), sorted;
    hidden files skipped."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if not entry.name.startswith(".")
        and entry.is_file()
        and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
    )


def data_layout(spec: str | os.PathLike) -> str:
    """`"tars"` or `"folder"`: how the training images at `spec` are stored.

    A brace pattern or a .tar file is tar shards; a folder holding .tar files is tar shards
    (refused if it also holds images); any other folder is an image folder.
    """
    text = os.fspath(spec)
    if _is_pattern(text) or text.endswith(".tar"):
        return "tars"
    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"{text}: no such folder or .tar shard; {_LAYOUT_HELP}.")
    has_tars = any(entry.name.endswith(".tar") and entry.is_file() for entry in os.scandir(path))
    if not has_tars:
        return "folder"
    if image_names(path):
        raise ValueError(
            f"{text} holds both .tar shards and image files: it is unclear which are the "
            "training set; move one of them to another folder."
        )
    return "tars"


def shard_paths(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The tar shards `spec` names: a brace pattern, a folder (its .tar files, sorted by
    name), one .tar file, or a sequence of .tar paths (kept in its order).

    Raises FileNotFoundError naming the missing shards, ValueError for a non-.tar name.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if _is_pattern(text):
            paths = [Path(name) for name in expand_braces(text)]
        elif Path(text).is_dir():
            paths = sorted(Path(text) / entry.name for entry in os.scandir(text))
            paths = [p for p in paths if p.name.endswith(".tar") and p.is_file()]
            if not paths:
                raise FileNotFoundError(f"{text} holds no .tar shards; {_LAYOUT_HELP}.")
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in spec]
    if not paths:
        raise ValueError(f"no tar shards given; {_LAYOUT_HELP}.")
    wrong = [str(p) for p in paths if not p.name.endswith(".tar")]
    if wrong:
        raise ValueError(
            f"{wrong[0]} is not a .tar shard: fastinf reads members by offset, so shards must "
            "be uncompressed .tar files (decompress .tar.gz shards with gunzip first)."
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} tar shards do not exist ({shown}); fix the pattern "
            "or the folder."
        )
    return paths


@dataclass(frozen=True)
class ShardIndex:
    """The examples of one tar shard, in member order: `names[i]` is example i's image member,
    stored `sizes[i]` bytes from byte `offsets[i]` of the file; `labels[i]` is its `.cls`
    label, or None without one."""

    names: list[str]
    offsets: list[int]
    sizes: list[int]
    labels: list[int | None]

    def __len__(self) -> int:
        return len(self.names)


def index_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where tar shard indexes are cached: `cache_dir`, else $FASTINF_CACHE, else
    ./.fastinf_cache (the folder the default engine caches in), subfolder tar_index."""
    root = cache_dir or os.environ.get("FASTINF_CACHE", ".fastinf_cache")
    return Path(root) / "tar_index"


def _label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    handle = tar.extractfile(member) if member.size <= _MAX_LABEL_BYTES else None
    text = handle.read().decode("utf-8", errors="replace").strip() if handle else "(long text)"
    if not re.fullmatch(r"\d+", text):
        raise ValueError(
            f"member {member.name} of shard {path} holds {text!r:.40}, not a class label; a "
            ".cls member must hold one integer >= 0 as text (e.g. '3')."
        )
    return int(text)


def scan_shard(path: Path) -> ShardIndex:
    """Read a tar shard's headers (and its small .cls members) into a `ShardIndex`.

    Members are grouped by key, the member path up to the first dot of its file name, and
    typed by their last extension, as webdataset does (`a/cat.0001.jpg` is key `a/cat`'s
    image); each key needs exactly one image member.
    """
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, _ = base.partition(".")
                if not member.isfile() or not dot or stem == "":
                    continue
                key = f"{folder}/{stem}" if folder else stem
                kind = os.path.splitext(base)[1].lower()
                if kind in IMAGE_SUFFIXES:
                    if key in images:
                        raise ValueError(
                            f"shard {path} holds two images for key {key} ({images[key][0]} "
                            f"and {member.name}); keep one image per key."
                        )
                    if member.offset_data + member.size > file_size:
                        raise ValueError(
                            f"shard {path} is truncated: member {member.name} ends past the "
                            "end of the file; write the shard again."
                        )
                    images[key] = (member.name, member.offset_data, member.size)
                elif kind == ".cls":
                    labels[key] = _label(tar, member, path)
    except tarfile.TarError as error:
        raise ValueError(
            f"shard {path} cannot be read as an uncompressed tar file ({error}); fastinf reads "
            "members by offset, so write plain .tar shards (decompress .tar.gz shards with "
            "gunzip first)."
        ) from None
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ValueError(
            f"shard {path}: key {orphans[0]} has a .cls label but no image member "
            f"({'/'.join(IMAGE_SUFFIXES)}); add the image or remove the label."
        )
    entries = list(images.values())
    return ShardIndex(
        names=[name for name, _, _ in entries],
        offsets=[offset for _, offset, _ in entries],
        sizes=[size for _, _, size in entries],
        labels=[labels.get(key) for key in images],
    )


def _identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def shard_index(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> ShardIndex:
    """The `ShardIndex` of the tar shard at `path`, from the cache when the shard's resolved
    path, size and modification time match what was cached, else scanned (`scan_shard`) and
    cached in `index_cache_dir(cache_dir)`. A cache that cannot be written is skipped with a
    warning (the shard is scanned again next time)."""
    path = Path(path)
    identity = _identity(path)
    folder = index_cache_dir(cache_dir)
    cached = folder / (hashlib.sha256(identity["path"].encode()).hexdigest()[:24] + ".json")
    try:
        record = json.loads(cached.read_text())
        if record.get("format") == _INDEX_FORMAT and record.get("shard") == identity:
            return ShardIndex(**record["index"])
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no cache yet, or one this version cannot use: scan again
    index = scan_shard(path)
    record = {"format": _INDEX_FORMAT, "shard": identity, "index": dataclasses.asdict(index)}
    # Several ranks may scan the same shard at once: each writes its own temporary file.
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, separators=(",", ":")))
        os.replace(tmp, cached)
    except OSError as error:
        tmp.unlink(missing_ok=True)  # ours, half-written
        warnings.warn(
            f"could not cache tar shard indexes in {folder} ({error.strerror or error}); "
            "shards will be scanned again next time (set $FASTINF_CACHE to a writable folder).",
            stacklevel=2,
        )
    return index


class MemberReader:
    """Positioned reads of byte ranges of files, each file opened once per process.

    Files are opened lazily in the process that reads (a DataLoader worker opens its own
    after the fork; inherited handles are never used, nor pickled) and kept open for the
    next read, at most `max_open` at a time (least recently used closed first). Reads are
    serialised by a lock, so threads may share a reader.
    """

    def __init__(self, max_open: int = 32):
        self.max_open = max_open
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.max_open = state["max_open"]
        self._reset()

    def read(self, path: str | os.PathLike, offset: int, size: int) -> bytes:
        """`size` bytes of `path` from byte `offset`; ValueError if the file ends first."""
        if self._pid != os.getpid():
            self._reset()  # a forked worker: the parent's handles share its file positions
        key = os.fspath(path)
        with self._lock:
            handle = self._handles.get(key)
            if handle is None:
                handle = self._handles[key] = open(key, "rb")  # noqa: SIM115 (kept open)
                while len(self._handles) > self.max_open:
                    self._handles.popitem(last=False)[1].close()
            self._handles.move_to_end(key)
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise ValueError(
                f"{key} ends {size - len(data)} bytes short of a member at byte {offset}: the "
                "file was truncated or replaced after it was indexed; restore it."
            )
        return data

    def close(self) -> None:
        """Close every file this process opened."""
        if self._pid == os.getpid():
            with self._lock:
                while self._handles:
                    self._handles.popitem()[1].close()
