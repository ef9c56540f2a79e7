"""Retraining for evaluation: many small models on subsets, cached on disk, in parallel.

A `RetrainJob` names a model (its file stem), the training examples it keeps and its
training seed; `ModelStore.train(jobs)` trains the jobs whose weights are not on disk yet,
in worker processes of one thread each, and writes each model atomically (weights, then
the sidecar that marks it complete). An interrupted run loses at most the models being
trained and never leaves a half-written model that looks complete. A job whose recipe or
kept examples differ from what is on disk is an error, not a silent reuse.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .artifacts import atomic_write_text, file_sha256
from .diffusion import NoiseSchedule
from .evaluation import measure_queries
from .models import UNET_CLASSES, add_lora, load_sidecar, load_unet, save_unet
from .progress import progress_bar
from .train import train_diffusion

__all__ = ["ModelSpec", "ModelStore", "QueryProbe", "RetrainJob", "RetrainRecipe"]


@dataclass(frozen=True)
class RetrainRecipe:
    """How every evaluation model is trained (`fastinf.train.train_diffusion` arguments)."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    warmup: int = 25
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RetrainJob:
    """One model to train: `name` (file stem), kept training positions, training seed."""

    name: str
    kept: tuple[int, ...]
    seed: int

    def kept_digest(self) -> str:
        return hashlib.sha256(json.dumps(list(self.kept)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QueryProbe:
    """Queries measured under each model right after it is trained (saves reloading)."""

    queries: Tensor
    measurement: str = "loss"
    num_draws: int = 512
    seed: int = 0
    cond: Tensor | None = None  # each query's conditioning (e.g. its prompt's text states)

    def key(self) -> str:
        digest = hashlib.sha256(self.queries.contiguous().numpy().tobytes())
        if self.cond is not None:
            digest.update(self.cond.contiguous().numpy().tobytes())
        return f"{self.measurement}:{self.num_draws}:{self.seed}:{digest.hexdigest()[:16]}"

    def measure(self, model, schedule: NoiseSchedule) -> Tensor:
        """[Q] float64: the queries' measurement under `model`."""
        return measure_queries(
            model,
            schedule,
            self.queries,
            measurement=self.measurement,
            num_draws=self.num_draws,
            seed=self.seed,
            cond=self.cond,
        )


@dataclass(frozen=True)
class ModelSpec:
    """How every model of a store starts: a UNet class and config, optionally the weights
    of a pretrained model (`init`) and a rank-`lora_rank` LoRA adapter on top of them (then
    only the adapter is trained)."""

    unet_class: str
    unet_config: dict
    init: str | None = None
    lora_rank: int = 0

    def build(self):
        unet = UNET_CLASSES[self.unet_class](**self.unet_config)
        if self.init is not None:
            unet.load_state_dict(load_file(self.init), strict=True)
        if self.lora_rank:
            add_lora(unet, self.lora_rank)
        return unet

    def identity(self) -> dict:
        """What a trained model's sidecar must record to be reused (nothing for a plain
        model, so stores written before LoRA support stay valid)."""
        if self.init is None and not self.lora_rank:
            return {}
        init = None if self.init is None else file_sha256(Path(self.init))[:16]
        return {"init_sha256": init, "lora_rank": self.lora_rank}


def _train_one(
    spec: ModelSpec,
    identity: dict,
    dataset: Dataset,
    schedule: NoiseSchedule,
    recipe: RetrainRecipe,
    job: RetrainJob,
    path: str,
    probe: QueryProbe | None,
) -> str:
    """Train one model and write it (weights first, sidecar last)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        unet = spec.build()
    _, ema_model, history = train_diffusion(
        unet,
        Subset(dataset, list(job.kept)),
        schedule,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        ema_decay=recipe.ema_decay,
        warmup=recipe.warmup,
        weight_decay=recipe.weight_decay,
        seed=job.seed,
        progress=False,
    )
    metadata = _job_metadata(schedule, recipe, job) | identity
    metadata["final_train_loss"] = history.final_loss(50)
    metadata["wall_time_s"] = round(history.wall_time_s, 1)
    if probe is not None:
        metadata["measurements"] = {probe.key(): probe.measure(ema_model, schedule).tolist()}
    # The weights land before their sidecar: a run killed in between is not `is_trained`.
    save_unet(ema_model, path, metadata)
    return job.name


def _single_thread() -> None:
    """Worker initialiser: one thread per worker, so workers do not oversubscribe cores."""
    torch.set_num_threads(1)


def _job_metadata(schedule: NoiseSchedule, recipe: RetrainRecipe, job: RetrainJob) -> dict:
    return {
        "schedule_fingerprint": schedule.fingerprint(),
        "recipe": asdict(recipe),
        "seed": job.seed,
        "kept_count": len(job.kept),
        "kept_digest": job.kept_digest(),
    }


class ModelStore:
    """A directory of retrained models: `<name>.safetensors` + `<name>.json` each.

    Args:
        directory: where models are kept (created if missing).
        unet_config: the UNet constructor arguments every model shares.
        dataset: the training set the jobs' `kept` positions index.
        schedule: the noise schedule of training.
        recipe: the training recipe shared by every model.
        unet_class: the UNet class (a `fastinf.models.UNET_CLASSES` name).
        init: weights every model starts from (a pretrained model's .safetensors).
        lora_rank: > 0: every model is `init` plus a LoRA adapter of this rank, trained
            alone (`fastinf.models.add_lora`).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        unet_config: dict,
        dataset: Dataset,
        schedule: NoiseSchedule,
        recipe: RetrainRecipe,
        unet_class: str = "UNet2DModel",
        init: str | os.PathLike | None = None,
        lora_rank: int = 0,
    ):
        if unet_class not in UNET_CLASSES:
            raise ValueError(f"unet_class {unet_class!r} is not one of {sorted(UNET_CLASSES)}.")
        self.spec = ModelSpec(
            unet_class, unet_config, None if init is None else str(init), lora_rank
        )
        self._spec_identity: dict | None = None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dataset = dataset
        self.schedule = schedule
        self.recipe = recipe

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def _identity(self) -> dict:
        """`spec.identity()`, computed once (it hashes the init weights, which exist by the
        time a model of this store is checked or trained)."""
        if self._spec_identity is None:
            self._spec_identity = self.spec.identity()
        return self._spec_identity

    def is_trained(self, job: RetrainJob) -> bool:
        """Whether `job`'s model is on disk and complete; a mismatching one is an error."""
        path = self.path(job.name)
        if not (path.exists() and path.with_suffix(".json").exists()):
            return False
        sidecar = load_sidecar(path)
        expected = _job_metadata(self.schedule, self.recipe, job) | self._identity()
        found = {key: sidecar.get(key) for key in expected}
        if found != expected:
            raise ValueError(
                f"{path} was trained with {found}, not {expected}: the recipe, seed or subset "
                "changed. Use another run directory, or delete that model to retrain it."
            )
        return True

    def train(
        self, jobs: list[RetrainJob], *, num_workers: int = 2, probe: QueryProbe | None = None
    ) -> int:
        """Train the jobs not on disk yet, `num_workers` at a time; returns how many."""
        missing = [job for job in jobs if not self.is_trained(job)]
        if not missing:
            return 0
        args = (self.spec, self._identity(), self.dataset, self.schedule, self.recipe)
        with progress_bar(len(missing), "retrain") as bar:
            if num_workers <= 1:
                for job in missing:
                    _train_one(*args, job, str(self.path(job.name)), probe)
                    bar.update(1)
                return len(missing)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                num_workers, mp_context=context, initializer=_single_thread
            ) as pool:
                futures = [
                    pool.submit(_train_one, *args, job, str(self.path(job.name)), probe)
                    for job in missing
                ]
                for future in as_completed(futures):
                    future.result()
                    bar.update(1)
        return len(missing)

    def measurements(self, jobs: list[RetrainJob], probe: QueryProbe) -> Tensor:
        """[len(jobs), Q] float64: each model's measurement of the probe's queries (from
        its sidecar when recorded at training time, else measured now and recorded)."""
        rows = []
        for job in jobs:
            path = self.path(job.name)
            sidecar = load_sidecar(path)
            recorded = sidecar.get("measurements", {}).get(probe.key())
            if recorded is None:
                recorded = probe.measure(load_unet(path), self.schedule).tolist()
                sidecar.setdefault("measurements", {})[probe.key()] = recorded
                atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
            rows.append(torch.tensor(recorded, dtype=torch.float64))
        return torch.stack(rows)

    def load(self, name: str):
        """The trained model `name` (fastinf's adapter of its UNet, in eval mode)."""
        return load_unet(self.path(name))
