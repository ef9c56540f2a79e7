"""faiss structures over the stored vectors: maximum inner product search (DESIGN §4).

`flat` is exact: IndexFlatIP for fp32, IndexScalarQuantizer for fp16 (QT_fp16) and
int8/int4 (QT_8bit/QT_4bit with the per-dimension range pinned to the index's scales, so
that faiss's code is the stored integer itself and decodes to exactly code × scale;
faiss's "direct" int8 codec would round the query to integers too). The search returns the largest
⟨query, stored value⟩ exactly. `ivf`, `ivfpq` and `hnsw` are
approximate structures for very large N (their recall against flat is measured, never
assumed). Proponents are the largest inner products; opponents the largest with the
negated query. A GPU copy is used when faiss sees a GPU and supports the structure there.
`flat_over_stored` scores chosen stored rows exactly as `flat` would (the second stage of
search="twostage", whose first stage is one of these structures over sketches).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import faiss
import numpy as np

from .config import IndexConfig

__all__ = ["SearchIndex", "flat_over_stored"]

_QTYPES = {
    "fp16": faiss.ScalarQuantizer.QT_fp16,
    "int8": faiss.ScalarQuantizer.QT_8bit,
    "int4": faiss.ScalarQuantizer.QT_4bit,
}
_TRAIN_PER_LIST = 64  # training vectors per IVF list (faiss warns below 39)
_MAX_TRAIN = 262_144
_MAX_TRAIN_BYTES = 4 << 30  # float32 training rows held at once (32,768 rows of 32,768 values)


def _nlist(config: IndexConfig, num_examples: int) -> int:
    wanted = config.nlist or round(4 * math.sqrt(num_examples))
    return max(1, min(wanted, num_examples))


def _flat(config: IndexConfig, dim: int):
    if config.storage == "fp32":
        return faiss.IndexFlatIP(dim)
    return faiss.IndexScalarQuantizer(dim, _QTYPES[config.storage], faiss.METRIC_INNER_PRODUCT)


def _make(config: IndexConfig, dim: int, num_examples: int):
    ip = faiss.METRIC_INNER_PRODUCT
    if config.search == "flat":
        return _flat(config, dim)
    if config.search == "hnsw":
        if config.storage == "fp32":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_neighbors, ip)
        else:
            index = faiss.IndexHNSWSQ(dim, _QTYPES[config.storage], config.hnsw_neighbors, ip)
        index.hnsw.efSearch = config.hnsw_ef_search
        return index
    nlist = _nlist(config, num_examples)
    coarse = faiss.IndexFlatIP(dim)
    if config.search == "ivfpq":
        if dim % config.pq_bytes:
            raise ValueError(
                f"IndexConfig.pq_bytes={config.pq_bytes} must divide the vector size {dim}; "
                "pick a divisor."
            )
        index = faiss.IndexIVFPQ(coarse, dim, nlist, config.pq_bytes, 8, ip)
    elif config.storage == "fp32":
        index = faiss.IndexIVFFlat(coarse, dim, nlist, ip)
    else:
        index = faiss.IndexIVFScalarQuantizer(coarse, dim, nlist, _QTYPES[config.storage], ip)
        # Store the vectors themselves, not residuals to their centroid: codes stay exact.
        index.by_residual = False
    # faiss's Python constructors keep `coarse` alive as long as `index`.
    index.nprobe = min(config.nprobe, nlist)
    return index


# faiss decodes code c of a b-bit range as vmin + (c + ½)·vdiff/(2^b − 1); with these
# (vmin, vdiff) in units of the scale, code c = stored + offset decodes to stored × scale.
_PINNED_RANGES = {"int8": (-128.5, 255.0), "int4": (-7.5, 15.0)}


def _pin_ranges(index, storage: str, scale: np.ndarray) -> None:
    """Make faiss's scalar quantizer store and decode exactly the index's integers."""
    holder = faiss.downcast_index(index.storage) if hasattr(index, "storage") else index
    low, span = _PINNED_RANGES[storage]
    trained = np.concatenate([low * scale, span * scale]).astype(np.float32)
    faiss.copy_array_to_vector(trained, holder.sq.trained)
    holder.is_trained = True


def _faiss_codes(storage: str, stored: np.ndarray, dim: int) -> np.ndarray:
    """The codes faiss's flat structure (with `_pin_ranges`) holds for these stored values:
    the same bytes for fp32/fp16, the integer + 128 for int8, each nibble − 1 for int4
    (faiss: value + 7, the index: value + 8; faiss pads an odd vector with a 0 nibble)."""
    raw = np.ascontiguousarray(stored).view(np.uint8)
    if storage == "int8":
        return raw ^ np.uint8(0x80)
    if storage == "int4":
        codes = raw - np.uint8(0x11)
        if dim % 2:
            codes[:, -1] &= np.uint8(0x0F)
        return codes
    return raw


def flat_over_stored(
    config: IndexConfig, dim: int, stored: np.ndarray, scale: np.ndarray | None = None
):
    """An exact faiss structure whose rows are `stored` [rows, width] (values as the shards
    hold them), taken as they are instead of re-encoded: its inner products are exactly the
    flat search's for those rows (the same codes and kernel). A CPU structure.
    """
    index = _flat(config, dim)
    if config.storage in _PINNED_RANGES:
        _pin_ranges(index, config.storage, scale)
    codes = _faiss_codes(config.storage, stored, dim)
    faiss.copy_array_to_vector(codes.ravel(), index.codes)
    index.ntotal = codes.shape[0]
    return index


def _to_gpu(index):
    """A GPU copy when faiss has GPUs and supports this structure there; else `index`."""
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


class SearchIndex:
    """A faiss structure over the stored vectors (row r = row r of the build order)."""

    def __init__(self, index, config: IndexConfig):
        self.cpu_index = index
        self.index = _to_gpu(index)
        self.config = config

    @classmethod
    def build(
        cls,
        config: IndexConfig,
        dim: int,
        num_examples: int,
        batches: Iterator[np.ndarray],
        scale: np.ndarray | None = None,
    ) -> SearchIndex:
        """Fill a new structure from float32 batches of stored values, in row order.

        Args:
            batches: [rows, dim] float32 values (integer storage: code × scale).
            scale: integer storage: the per-dimension scales [dim].
        Approximate structures are trained on the first rows (up to 64 per IVF list and
        4 GiB of float32 rows).
        """
        index = _make(config, dim, num_examples)
        pinned = config.storage in _PINNED_RANGES and config.search != "ivfpq"
        if pinned and config.search == "flat":
            _pin_ranges(index, config.storage, scale)
        pending: list[np.ndarray] = []
        if not index.is_trained:
            nlist = _nlist(config, num_examples)
            wanted = min(_MAX_TRAIN, _TRAIN_PER_LIST * nlist, _MAX_TRAIN_BYTES // (4 * dim))
            wanted = min(num_examples, max(wanted, nlist))  # k-means needs a row per list
            if config.search == "ivfpq":
                wanted = min(num_examples, max(wanted, 256 * 39))
            held = 0
            for batch in batches:
                pending.append(batch)
                held += batch.shape[0]
                if held >= wanted:
                    break
            rows = np.concatenate(pending)[:wanted]
            try:
                index.train(rows)
            except RuntimeError as error:  # faiss's C++ message, translated to the option
                detail = str(error).strip().splitlines()[-1].split("failed: ")[-1]
                raise ValueError(
                    f"IndexConfig.search={config.search!r} cannot be trained on {len(rows)} "
                    f"rows ({detail}); use search='flat' for a training set this small, or a "
                    "smaller nlist."
                ) from None
            if pinned:
                _pin_ranges(index, config.storage, scale)
        while pending:  # release the training rows as they are added
            index.add(pending.pop(0))
        for batch in batches:
            index.add(batch)
        return cls(index, config)

    @classmethod
    def read(cls, path: str, config: IndexConfig) -> SearchIndex:
        index = faiss.read_index(path)
        if config.search == "hnsw":
            index.hnsw.efSearch = config.hnsw_ef_search
        elif config.search in ("ivf", "ivfpq"):
            index.nprobe = min(config.nprobe, index.nlist)
        return cls(index, config)

    def write(self, path: str) -> None:
        faiss.write_index(self.cpu_index, path)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Largest inner products: (scores [Q, k] float32, rows [Q, k] int64, -1 past N)."""
        k = max(1, min(k, self.size))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows
