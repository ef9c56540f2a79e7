"""`ServiceConfig`: how `fastinf serve` batches, bounds and answers requests (light: the
command line reads its fields' help without importing torch or FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServiceConfig"]


@dataclass(frozen=True)
class ServiceConfig:
    """How the service batches, bounds and answers requests."""

    default_k: int = field(default=10, metadata={"help": "k when a request names none"})
    k_max: int = field(default=100, metadata={"help": "the largest k a request may ask"})
    max_batch: int = field(default=16, metadata={"help": "queries scored in one engine call"})
    batch_window_ms: float = field(
        default=5.0, metadata={"help": "how long a query waits for others to batch with"}
    )
    max_queue: int = field(default=64, metadata={"help": "queries waiting before new ones get 503"})
    timeout_s: float = field(
        default=300.0,
        metadata={
            "help": "seconds a request may wait and run before 504 (scoring every training "
            "image exactly, without an index, takes about a minute on a 2-core CPU)"
        },
    )
    max_body_bytes: int = field(
        default=4 << 20, metadata={"help": "largest request body accepted (else 413)"}
    )
    exact_rerank: int | None = field(
        default=None,
        metadata={"help": "with an index: candidates re-scored exactly (None: the index's own)"},
    )
    score_thread: str = field(
        default="main",
        metadata={
            "help": "fastinf serve: score on the main thread (HTTP on another), or on a "
            "worker thread (bench/engine_threads.py compares them)"
        },
    )
    thumbnail_scale: int = field(default=8, metadata={"help": "thumbnail upscaling factor"})
    generate_steps: int = field(
        default=100, metadata={"help": "denoising steps of POST /v1/generate"}
    )

    def __post_init__(self):
        for name in ("default_k", "k_max", "max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServiceConfig.{name}={getattr(self, name)} must be >= 1.")
        if not 1 <= self.default_k <= self.k_max:
            raise ValueError(f"default_k={self.default_k} must be in 1..k_max={self.k_max}.")
        if self.score_thread not in ("main", "worker"):
            raise ValueError(f"score_thread={self.score_thread!r} must be 'main' or 'worker'.")
        if self.batch_window_ms < 0 or self.timeout_s <= 0:
            raise ValueError("batch_window_ms must be >= 0 and timeout_s > 0.")
