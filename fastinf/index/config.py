"""How an index of the training set is compressed, stored and searched (DESIGN §2 step 3b).

Fields that change the stored vectors are the index's fingerprint (checked when a build is
resumed); shard size changes only the file layout and is part of the build plan; the search
fields choose the faiss structure built over the stored vectors. With search="twostage"
every example also stores a low-dimensional sketch of its stored vector (first stage), and
the sketch's size and projection join the fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMPRESSIONS",
    "FIRST_STAGE_PROJECTIONS",
    "FIRST_STAGE_SEARCHES",
    "SEARCHES",
    "STORAGES",
    "IndexConfig",
]

COMPRESSIONS = ("exact", "countsketch", "gaussian", "kronecker", "truncate", "hybrid")
STORAGES = ("fp32", "fp16", "int8", "int4")
SEARCHES = ("flat", "ivf", "ivfpq", "hnsw", "twostage")
FIRST_STAGE_SEARCHES = ("flat", "hnsw", "ivf")
FIRST_STAGE_PROJECTIONS = ("pca", "countsketch")
RANKINGS = ("damped_ratio", "energy")
BITS_PER_VALUE = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"IndexConfig.{name}={value!r} must be a positive integer.")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"IndexConfig.{name}={value!r} is not one of {choices}; pick one of those."
        )


@dataclass(frozen=True)
class IndexConfig:
    """Compression, storage and search of the index vectors (DESIGN §1 whitening, §2 step 3b).

    An index vector is the whitened eigenbasis coordinates W^½∘Q_Sᵀ ∇ℓ_n Q_A of every tracked
    layer (one model-wide vector, ‖·‖² summed over layers), compressed to `dim` values so
    that ⟨query vector, train vector⟩ ≈ τ(q, n).
    """

    compression: str = field(
        default="countsketch",
        metadata={
            "help": "exact: every whitened coordinate (tiny models, tests); countsketch: "
            "signed hashing into `dim` buckets (sparse random projection); gaussian: dense "
            "per-layer Gaussian projection; kronecker: per-layer S_out C S_inᵀ; truncate: "
            "the `dim` coordinates ranked highest by `rank_by`; hybrid: the top "
            "`exact_fraction`·dim coordinates kept, the rest count-sketched"
        },
    )
    dim: int = field(default=32768, metadata={"help": "values per index vector"})
    storage: str = field(
        default="int4",
        metadata={
            "help": "fp32, fp16, int8 or int4 (symmetric integers, one scale per dimension; "
            "int4 packs two values per byte)"
        },
    )
    rank_by: str = field(
        default="energy",
        metadata={
            "help": "truncate/hybrid: 'damped_ratio' ranks coordinates by Λ/(Λ+λ); 'energy' "
            "by the mean squared whitened coordinate over the calibration examples"
        },
    )
    exact_fraction: float = field(
        default=0.5, metadata={"help": "hybrid: share of `dim` given to kept coordinates"}
    )
    sketch_seed: int = field(default=0, metadata={"help": "seed of the random sketches"})
    calibration_examples: int = field(
        default=128,
        metadata={
            "help": "first examples of the build order used to rank coordinates (energy) "
            "and to set the int8/int4 scales"
        },
    )
    shard_size: int = field(default=1024, metadata={"help": "examples per shard file"})
    search: str = field(
        default="flat",
        metadata={
            "help": "faiss structure: flat (exact inner product), ivf, ivfpq, hnsw (approximate, "
            "for very large N; recall reported by bench/index_search.py); twostage: a faiss "
            "search over small sketches of the stored vectors yields candidates, whose stored "
            "vectors are then scored exactly (large N; bench/index_twostage.py)"
        },
    )
    first_stage_dim: int = field(
        default=2048,
        metadata={
            "help": "twostage: values per sketch, stored as fp16 beside each vector (2048: "
            "4 KB; fewer need many more candidates for the same recall, "
            "bench/results/index_twostage.md)"
        },
    )
    first_stage_projection: str = field(
        default="pca",
        metadata={
            "help": "twostage: how a stored vector becomes its sketch — pca (its coordinates "
            "on the top principal directions of `first_stage_fit` stored vectors) or "
            "countsketch (signed hashing of its values into the buckets, seeded by sketch_seed)"
        },
    )
    first_stage_fit: int = field(
        default=4096,
        metadata={
            "help": "twostage, pca: examples, spread evenly over the build order, whose stored "
            "vectors give the principal directions (computed once more at the build's start)"
        },
    )
    first_stage_search: str = field(
        default="hnsw",
        metadata={
            "help": "twostage: faiss structure over the sketches — flat (exact), hnsw "
            "(hnsw_neighbors, efSearch ≥ candidates) or ivf (nlist, nprobe)"
        },
    )
    first_stage_candidates: int = field(
        default=1000,
        metadata={
            "help": "twostage: candidates per query and sign taken from the sketches and "
            "scored with their stored vectors"
        },
    )
    first_stage_ef_search: int = field(
        default=4000,
        metadata={
            "help": "twostage, hnsw: search breadth over the sketches (at least the "
            "candidates; a wider search finds more of the sketches' true top candidates)"
        },
    )
    nlist: int = field(default=0, metadata={"help": "ivf/ivfpq: lists (0: 4·√N)"})
    nprobe: int = field(default=32, metadata={"help": "ivf/ivfpq: lists visited per query"})
    pq_bytes: int = field(default=256, metadata={"help": "ivfpq: bytes per PQ code"})
    hnsw_neighbors: int = field(default=32, metadata={"help": "hnsw: graph degree M"})
    hnsw_ef_search: int = field(default=128, metadata={"help": "hnsw: search breadth"})
    exact_rerank: int = field(
        default=32,
        metadata={
            "help": "candidates per query and sign that may be re-scored exactly at query "
            "time (0: none); `score(..., exact_rerank=C)` overrides"
        },
    )
    rerank_sigmas: float = field(
        default=1.0,
        metadata={
            "help": "bounded re-rank (countsketch and exact compressions): candidates are "
            "re-scored, closest to the top-k boundary first, until every candidate's place "
            "in or out of the top-k holds with its index score ± this many standard "
            "deviations of the compression error; 0: re-score all C candidates"
        },
    )

    def __post_init__(self) -> None:
        _choice("compression", self.compression, COMPRESSIONS)
        _choice("storage", self.storage, STORAGES)
        _choice("rank_by", self.rank_by, RANKINGS)
        _choice("search", self.search, SEARCHES)
        _choice("first_stage_projection", self.first_stage_projection, FIRST_STAGE_PROJECTIONS)
        _choice("first_stage_search", self.first_stage_search, FIRST_STAGE_SEARCHES)
        for name in ("dim", "calibration_examples", "shard_size", "nprobe", "pq_bytes"):
            _positive(name, getattr(self, name))
        _positive("first_stage_dim", self.first_stage_dim)
        _positive("first_stage_fit", self.first_stage_fit)
        _positive("first_stage_candidates", self.first_stage_candidates)
        _positive("first_stage_ef_search", self.first_stage_ef_search)
        _positive("hnsw_neighbors", self.hnsw_neighbors)
        _positive("hnsw_ef_search", self.hnsw_ef_search)
        if not isinstance(self.nlist, int) or self.nlist < 0:
            raise ValueError(f"IndexConfig.nlist={self.nlist!r} must be >= 0 (0: automatic).")
        if not isinstance(self.exact_rerank, int) or self.exact_rerank < 0:
            raise ValueError(f"IndexConfig.exact_rerank={self.exact_rerank!r} must be >= 0.")
        if not 0.0 <= self.rerank_sigmas < math.inf:
            raise ValueError(
                f"IndexConfig.rerank_sigmas={self.rerank_sigmas!r} must be a finite number >= 0."
            )
        if not 0.0 < self.exact_fraction < 1.0:
            raise ValueError(
                f"IndexConfig.exact_fraction={self.exact_fraction!r} must be in (0, 1)."
            )

    def vector_fingerprint(self) -> dict[str, Any]:
        """The fields that change the stored vectors (and, for twostage, their sketches)."""
        keys = ("compression", "dim", "storage", "rank_by", "exact_fraction", "sketch_seed")
        values = {k: getattr(self, k) for k in keys}
        if self.needs_calibration():
            values["calibration_examples"] = self.calibration_examples
        # None without a first stage: an index recorded before these fields reads the same.
        twostage = self.search == "twostage"
        values["first_stage_dim"] = self.first_stage_dim if twostage else None
        values["first_stage_projection"] = self.first_stage_projection if twostage else None
        fitted = twostage and self.first_stage_projection == "pca"
        values["first_stage_fit"] = self.first_stage_fit if fitted else None
        return values

    def first_stage_config(self) -> IndexConfig:
        """twostage: the config of the faiss structure over the fp16 sketches."""
        if self.search != "twostage":
            raise ValueError(f"IndexConfig.search={self.search!r} has no first stage.")
        return dataclasses.replace(
            self,
            search=self.first_stage_search,
            storage="fp16",
            hnsw_ef_search=max(self.first_stage_ef_search, self.first_stage_candidates),
        )

    def needs_calibration(self) -> bool:
        """Whether building needs a first pass over the calibration examples."""
        ranked = self.compression in ("truncate", "hybrid") and self.rank_by == "energy"
        return ranked or self.storage in ("int8", "int4")

    def bytes_per_example(self, dim: int) -> int:
        """Stored bytes of one index vector of `dim` values."""
        return (dim * BITS_PER_VALUE[self.storage] + 7) // 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
