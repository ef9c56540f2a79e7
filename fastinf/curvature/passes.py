"""How a fit goes through its examples: which ones, in which chunks, on which rank, and how
the ranks' sums are combined and checkpointed (DESIGN §2 step 1, §4).

- **Examples.** Every training example (or `indices`), or the seeded subset that
  `CurvatureConfig.fraction` / `max_examples` ask for (`fit_examples`).
- **Chunks.** A pass (the K-FAC factors, the EK-FAC eigenvalues, TRAK's sketched Fisher)
  goes through the examples in fixed chunks of `CurvatureConfig.chunk_examples`, in order.
  The chunks do not depend on the number of ranks.
- **Ranks.** Under torch.distributed each rank runs its share of every chunk: its
  consecutive W-th of the chunk (`distributed.contiguous`), so a rank reads one stretch of
  stored data (its own tar shards) rather than every shard. Draws are seeded per example,
  so an example's contribution is the same whichever rank runs it.
- **Sums.** A strategy accumulates float64 sums of its chunk share; at the end of each chunk
  they are all-reduced (every rank gets the same bits) and added to the pass's totals, in
  chunk order. The totals are therefore the same whether a pass runs in one go or is
  resumed, and differ across rank counts only by float64 summation order.
- **Checkpoints.** With a checkpoint folder, rank 0 saves the totals after every chunk
  in its `PROGRESS_DIR` subfolder (`checkpoint.FitProgress`); a rerun of the same fit
  resumes after the last saved chunk, on any number of ranks. Each chunk's example count
  is all-reduced too and checked, so a chunk is never counted twice or missed.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import CurvatureConfig
from ..data import validate_indices
from ..distributed import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    broadcast_tensors,
    contiguous,
    rank_world,
)
from ..locks import writer_lock
from ..source import GradientSource
from .base import Curvature
from .checkpoint import PROGRESS_DIR, FitProgress

__all__ = ["PROGRESS_DIR", "FitPasses", "finish_fit", "fit_examples", "open_passes"]

_SUBSET_SALT = 0x5EED_F17E_C0DE_0001  # keeps the subset's hash apart from the draws' seeds
_MASK64 = (1 << 64) - 1

ChunkRunner = Callable[[list[list[int]]], Iterable[object]]
"""Runs a pass over chunk shares (lists of dataset ids), yielding once per finished chunk."""


def _subset_keys(seed: int, ids: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, dataset id): a random order of the examples that depends on
    neither their number nor the machine, so one seed's subsets are nested."""
    offset = np.uint64((seed * 0x9E3779B97F4A7C15 + _SUBSET_SALT) & _MASK64)
    keys = ids.astype(np.uint64) + offset
    keys = (keys ^ (keys >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    keys = (keys ^ (keys >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return keys ^ (keys >> np.uint64(31))


def fit_examples(
    num_train: int, config: CurvatureConfig, indices: Sequence[int] | None = None
) -> list[int]:
    """The dataset ids a fit goes through, in order.

    Every example (or `indices`), unless `config.fraction` / `config.max_examples` ask for
    fewer: then the round(fraction · N) (at most `max_examples`, at least 1) examples with
    the smallest seeded hash keys, kept in their order. The subset depends only on the
    examples and `config.seed`: it is the same on any number of ranks, and a smaller
    fraction's subset lies inside a larger one's.
    """
    order = list(range(num_train)) if indices is None else validate_indices(indices, num_train)
    if not order:
        raise ValueError("a fit needs at least one training example; `indices` is empty.")
    count = len(order)
    if config.fraction is not None:
        count = max(1, math.floor(config.fraction * len(order) + 0.5))
    if config.max_examples is not None:
        count = min(count, config.max_examples)
    if count >= len(order):
        return order
    keys = _subset_keys(config.seed, np.asarray(order, dtype=np.int64))
    picked = np.sort(np.argsort(keys, kind="stable")[:count])
    return [order[int(position)] for position in picked]


class FitPasses:
    """The passes of one fit: its examples, their chunks, the ranks' shares, the reduction
    of the ranks' sums and (with a progress folder) the checkpoint after each chunk.

    Every rank builds it, in the same order of calls (it talks to the other ranks).

    Args:
        source: the gradient source the fit runs on.
        config: the fit's configuration (examples, chunk size).
        indices: dataset ids to fit on (default: every example).
        progress_dir: rank 0 of a checkpointed fit: the progress folder, resumed when it
            holds this fit's progress (`checkpoint.FitProgress`); None otherwise.
    """

    def __init__(
        self,
        source: GradientSource,
        config: CurvatureConfig,
        indices: Sequence[int] | None = None,
        progress_dir: str | os.PathLike | None = None,
    ):
        self.source = source
        self.examples = fit_examples(len(source.train_set), config, indices)
        self.rank = rank_world()[0]
        self._progress = None
        self._saving = progress_dir is not None
        recorded, error = None, None
        if progress_dir is not None:
            try:
                self._progress = FitProgress(progress_dir)
                recorded = self._progress.load(self.identity(config), config.chunk_examples)
            except (ValueError, OSError) as failure:  # mismatch, damage, unreadable
                error = failure
        # Rank 0 decides where the fit stands; the others follow (or fail with it).
        recorded, error = broadcast_object((recorded, error))
        if error is not None:
            raise error
        self.chunk_examples = (recorded or {}).get("chunk_examples", config.chunk_examples)
        self.done = {
            name: entry["completed"][-1][1]
            for name, entry in (recorded or {}).get("passes", {}).items()
        }
        if self.done and self.rank == 0:
            finished = ", ".join(f"{n} {stop}/{self.num_examples}" for n, stop in self.done.items())
            print(
                f"fastinf: resuming the fit from {progress_dir} (examples done: {finished}).",
                file=sys.stderr,
            )

    @property
    def num_examples(self) -> int:
        """How many examples each pass goes through (N, or the subset's size)."""
        return len(self.examples)

    def identity(self, config: CurvatureConfig) -> dict:
        """What a checkpoint of this fit must match: config, provenance and examples."""
        ids = np.asarray(self.examples, dtype=np.int64)
        return {
            "config": config.fingerprint(),
            "provenance": self.source.provenance,
            "examples": {"count": len(ids), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()},
        }

    def run(self, name: str, sums: dict[str, Tensor], runner: ChunkRunner) -> None:
        """Run pass `name` over the examples not yet done, chunk by chunk; afterwards `sums`
        hold the totals over every example of the fit (identical on every rank).

        Args:
            name: the pass (`factors`, `eigenvalues`, `sketched_fisher`), as checkpointed.
            sums: float64 tensors the runner accumulates into (they are zeroed here).
            runner: called once with this rank's share of every remaining chunk; it must
                add each chunk's contributions to `sums` and then yield, chunk by chunk.
        """
        totals = {key: torch.zeros_like(value) for key, value in sums.items()}
        counted = torch.zeros((), dtype=torch.float64)
        start = self.done.get(name, 0)
        if start:
            if self.rank == 0:
                self._restore(name, totals, counted)
            broadcast_tensors([*totals.values(), counted])
        bounds = [
            (begin, min(begin + self.chunk_examples, self.num_examples))
            for begin in range(start, self.num_examples, self.chunk_examples)
        ]
        rank, world = rank_world()
        shares = [contiguous(self.examples[begin:end], rank, world) for begin, end in bounds]
        for value in sums.values():
            value.zero_()
        finished = iter(zip(bounds, shares, strict=True))
        for _ in runner(shares) if bounds else ():
            (begin, end), share = next(finished)
            examples = torch.tensor(float(len(share)), dtype=torch.float64)
            all_reduce_sum([*sums.values(), examples])
            if int(examples) != end - begin:
                raise RuntimeError(
                    f"the fit's {name!r} pass summed {int(examples)} examples for the chunk "
                    f"[{begin}, {end}) of {end - begin}: the ranks disagree on the examples "
                    "(were they started with different data or options?)."
                )
            for key, value in sums.items():
                totals[key] += value
                value.zero_()
            counted += examples
            if self._saving:
                self._checkpoint(name, end, {**totals, "examples": counted})
        if int(counted) != self.num_examples:
            raise RuntimeError(
                f"the fit's {name!r} pass covered {int(counted)} of {self.num_examples} "
                "examples; the pass stopped early."
            )
        for key, value in sums.items():
            value.copy_(totals[key])

    def agree(self, tensors: Iterable[Tensor]) -> None:
        """Give every rank rank 0's float64 tensors (e.g. eigenvectors), so that the ranks
        hold the same curvature bit for bit."""
        broadcast_tensors(list(tensors))

    def _checkpoint(self, name: str, stop: int, sums: dict[str, Tensor]) -> None:
        """Save the pass's totals; if the disk refuses, warn and go on without checkpoints
        (the fit itself is not lost to a full disk: its result is saved or falls back)."""
        try:
            self._progress.save(name, stop, stop == self.num_examples, sums)
        except OSError as error:
            self._saving = False
            warnings.warn(
                f"could not save the fit's progress in {self._progress.directory} ({error}); "
                "the fit goes on without checkpoints, so an interruption would lose it. Free "
                "space or fix the folder's permissions to keep checkpoints in later fits.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _restore(self, name: str, totals: dict[str, Tensor], counted: Tensor) -> None:
        saved = self._progress.sums(name)
        expected = {*totals, "examples"}
        if set(saved) != expected or any(saved[k].shape != totals[k].shape for k in totals):
            raise RuntimeError(
                f"the saved sums of the fit's {name!r} pass in {self._progress.directory} do "
                "not have this model's layers; delete that folder to start the fit afresh."
            )
        for key, value in totals.items():
            value.copy_(saved[key])
        counted.copy_(saved["examples"])
        if int(counted) != self.done[name]:
            raise RuntimeError(
                f"the saved sums of the fit's {name!r} pass count {int(counted)} examples, "
                f"the record {self.done[name]}; delete {self._progress.directory} to start "
                "the fit afresh."
            )


@contextmanager
def open_passes(
    source: GradientSource,
    config: CurvatureConfig,
    indices: Sequence[int] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Iterator[FitPasses]:
    """The `FitPasses` of one fit; with `checkpoint_dir`, rank 0 keeps and resumes the fit's
    progress in `checkpoint_dir/fit_progress`, holding that folder's writer lock meanwhile."""
    if checkpoint_dir is None or rank_world()[0] != 0:
        yield FitPasses(source, config, indices)
        return
    directory = Path(checkpoint_dir) / PROGRESS_DIR
    with writer_lock(directory, "fit"):
        yield FitPasses(source, config, indices, directory)


def finish_fit(curvature: Curvature, checkpoint_dir: str | os.PathLike) -> None:
    """Rank 0 writes `curvature` into `checkpoint_dir` (`Curvature.save`), then deletes the
    fit progress kept there (its own files only); every rank waits for it and raises rank 0's
    error if it failed (the progress is then kept: rerunning the fit only writes it)."""
    error = None
    if rank_world()[0] == 0:
        try:
            curvature.save(checkpoint_dir)
            FitProgress(Path(checkpoint_dir) / PROGRESS_DIR).discard()
        except OSError as failure:
            error = failure
    error = broadcast_object(error)
    barrier()
    if error is not None:
        raise error
