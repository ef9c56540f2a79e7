"""The LDS benchmark on digits: retrain on subsets, score with each method, compare.

`LDSConfig.model` picks the model under test: "digits" (the unconditional digits DDPM's
architecture) or "text-digits" (the text-conditional default's cross-attention UNet on the
captioned digits: queries are sampled from prompts, and measured and scored with them).
With `lora_rank` > 0 (text-digits) the scenario is a LoRA fine-tune: a base model is
pretrained on the digits outside the training set (`models_pretrained/`), every LDS model
is that base plus a rank-r LoRA trained alone on its subset, and the methods attribute
through the LoRA weights only (`layers="lora"`).

`LDSRun(run_dir, LDSConfig())` owns one benchmark directory:

    run_dir/setup.json               the config the directory was made with
    run_dir/models/                  base, subset, oracle and counterfactual models
    run_dir/queries.safetensors      queries sampled from the base model
    run_dir/curvature/<key>/         fitted curvatures
    run_dir/scores/<key>.safetensors score matrices [Q, N] per method

Everything is cached and reused, so an interrupted run resumes where it stopped and a
rerun with more methods only scores the new ones. Methods are settings of the one engine
(`Method`): EK-FAC and its variants, and the baselines (gradient dot product, TRAK, D-TRAK).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .artifacts import atomic_write, atomic_write_text
from .config import CurvatureConfig, ScoreConfig
from .curvature import as_kfac
from .data import ImageTensorDataset, TextStatesDataset, load_digits_dataset
from .engine import InfluenceEngine
from .evaluation import LDSResult, lds, oracle_lds, subset_masks
from .index.config import IndexConfig
from .models import default_schedule, digits_unet_config
from .retrain import ModelStore, QueryProbe, RetrainJob, RetrainRecipe
from .sampling import sample_ddpm
from .text_digits import (
    digit_caption,
    load_text_digits_dataset,
    load_text_encoder,
    text_digits_unet_config,
)

__all__ = ["LDS_MODELS", "LDSConfig", "LDSRun", "Method", "default_methods", "query_prompts"]

LDS_MODELS = ("digits", "text-digits")


def query_prompts(count: int, seed: int = 0) -> list[str]:
    """The prompts of a text-digits benchmark's queries: digits 0..9 in turn, each round in
    the next caption template."""
    return [digit_caption(q % 10, q // 10 + seed) for q in range(count)]


@dataclass(frozen=True)
class LDSConfig:
    """The digits LDS benchmark (defaults fit in an hour on a 2-core CPU)."""

    num_train: int = field(default=1000, metadata={"help": "digits in the training set"})
    model: str = field(
        default="digits",
        metadata={"help": "digits (unconditional) or text-digits (captioned, cross-attention)"},
    )
    lora_rank: int = field(
        default=0,
        metadata={"help": "text-digits: > 0 fine-tunes a LoRA of this rank on a pretrained base"},
    )
    num_subsets: int = field(default=50, metadata={"help": "M: retrained subsets"})
    fraction: float = field(default=0.5, metadata={"help": "α: fraction each subset keeps"})
    oracle_subsets: int = field(
        default=25, metadata={"help": "subsets retrained with a second seed (the oracle)"}
    )
    num_queries: int = field(default=32, metadata={"help": "queries sampled from the base model"})
    sampling_steps: int | None = field(
        default=None, metadata={"help": "DDPM steps when sampling the queries (None: all T)"}
    )
    measurement: str = field(default="loss", metadata={"help": "the measurement m under test"})
    measurement_draws: int = field(
        default=512, metadata={"help": "draws per query measurement, shared across models"}
    )
    seed: int = field(default=0, metadata={"help": "train set, subsets and queries"})
    train_seed: int = field(default=0, metadata={"help": "seed of the base and subset models"})
    oracle_seed: int = field(default=1, metadata={"help": "seed of the oracle replicates"})
    recipe: RetrainRecipe = field(default_factory=RetrainRecipe)
    counterfactual_queries: int = field(
        default=4, metadata={"help": "queries for retraining without top influences"}
    )
    counterfactual_percents: tuple[float, ...] = (2.0, 10.0)

    def __post_init__(self) -> None:
        if self.model not in LDS_MODELS:
            raise ValueError(f"model={self.model!r} is not one of {LDS_MODELS}.")
        if self.lora_rank < 0 or (self.lora_rank and self.model != "text-digits"):
            raise ValueError(
                f"lora_rank={self.lora_rank} needs model='text-digits' and must be >= 0."
            )
        if not 0 <= self.oracle_subsets <= self.num_subsets:
            raise ValueError(
                f"oracle_subsets={self.oracle_subsets} must be between 0 and num_subsets="
                f"{self.num_subsets}."
            )
        if self.counterfactual_queries > self.num_queries:
            raise ValueError("counterfactual_queries cannot exceed num_queries.")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Method:
    """An attribution method as a setting of the engine, with a label for tables."""

    name: str
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    damping: float = ScoreConfig.damping
    damping_mode: str = ScoreConfig.damping_mode
    train_draws: int = ScoreConfig.train_draws
    query_draws: int = ScoreConfig.query_draws
    measurement: str = "loss"
    train_objective: str = "loss"

    def key(self) -> str:
        """A digest of every field that changes the scores (not the name)."""
        fields = dataclasses.asdict(self)
        fields.pop("name")
        fields["curvature"] = self.curvature.fingerprint()
        return _digest(fields)

    def row(self) -> dict:
        """The method's settings as flat table columns."""
        return {
            "method": self.name,
            "strategy": self.curvature.strategy,
            "ggn": self.curvature.ggn,
            "kfac_approx": self.curvature.kfac_approx,
            "damping": self.damping,
            "damping_mode": self.damping_mode,
            "train_draws": self.train_draws,
            "query_draws": self.query_draws,
            "measurement": self.measurement,
            "train_objective": self.train_objective,
        }


def _digest(fields: dict, length: int = 16) -> str:
    """A short SHA-256 of JSON-serialisable settings (the cache keys of this module)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:length]


def _curvature_key(config: CurvatureConfig) -> str:
    return _digest(config.fingerprint())


def _save_tensor(path: Path, name: str, tensor: Tensor) -> None:
    """Write one tensor to `path` atomically (a killed run never leaves half a file)."""
    atomic_write(path, lambda tmp: save_file({name: tensor.contiguous()}, str(tmp)))


class LDSRun:
    """One LDS benchmark directory: setup, retraining, scoring and evaluation, all cached.

    Args:
        run_dir: the directory (created; a directory made with another config is refused).
        config: the benchmark settings.
        num_workers: processes that retrain models in parallel (one thread each).
    """

    def __init__(self, run_dir: str | os.PathLike, config: LDSConfig, *, num_workers: int = 2):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} must be an integer >= 1.")
        self.run_dir = Path(run_dir)
        self.config = config
        self.num_workers = num_workers
        digits = load_digits_dataset()
        if not 1 < config.num_train <= len(digits):  # refused before anything is written
            raise ValueError(f"num_train must be in 2..{len(digits)}, got {config.num_train}.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup = self.run_dir / "setup.json"
        # Counts only add models, so a directory can grow (more subsets, more queries
        # retrained without their top influences); anything else changes every model.
        growable = ("num_subsets", "oracle_subsets", "counterfactual_queries")
        recorded = json.loads(json.dumps(config.to_json()))
        if setup.exists():
            older = {"model": "digits", "lora_rank": 0}  # records written before these fields
            found = older | json.loads(setup.read_text())
            if _without(found, growable) != _without(recorded, growable):
                raise ValueError(
                    f"{self.run_dir} holds a benchmark made with another config "
                    f"({found}); use a new --run-dir or the same settings."
                )
        else:
            atomic_write_text(setup, json.dumps(recorded, indent=1) + "\n")
        generator = torch.Generator().manual_seed(config.seed)
        chosen = torch.randperm(len(digits), generator=generator)[: config.num_train]
        self.encoder = None
        self.pretrained: ModelStore | None = None
        if config.model == "text-digits":
            self.encoder = load_text_encoder()
            captioned = load_text_digits_dataset(self.encoder)
            self.train_set = TextStatesDataset(
                captioned.images[chosen].clone(),
                captioned.states[chosen].clone(),
                captions=[captioned.captions[i] for i in chosen.tolist()],
                labels=captioned.labels[chosen],
            )
            unet_class, unet_config = "UNet2DConditionModel", text_digits_unet_config()
            if config.lora_rank:
                rest = torch.ones(len(digits), dtype=torch.bool)
                rest[chosen] = False
                outside = rest.nonzero().flatten()
                self.pretrained = ModelStore(
                    self.run_dir / "models_pretrained",
                    unet_config,
                    TextStatesDataset(captioned.images[outside], captioned.states[outside]),
                    default_schedule(),
                    config.recipe,
                    unet_class=unet_class,
                )
                self._pretrained_job = self._job("pretrained", torch.arange(len(outside)), 0)
        else:
            self.train_set = ImageTensorDataset(digits.images[chosen].clone())
            unet_class, unet_config = "UNet2DModel", digits_unet_config()
        self.schedule = default_schedule()
        self.store = ModelStore(
            self.run_dir / "models",
            unet_config,
            self.train_set,
            self.schedule,
            config.recipe,
            unet_class=unet_class,
            init=None if self.pretrained is None else self.pretrained.path("pretrained"),
            lora_rank=config.lora_rank,
        )
        self.masks = subset_masks(
            config.num_train, config.num_subsets, config.fraction, config.seed
        )
        self._engine: InfluenceEngine | None = None
        self._queries: Tensor | None = None
        self._query_cond: Tensor | None = None
        self._curvatures: dict[str, object] = {}

    # -- models and measurements -----------------------------------------------------------
    def _train(self, jobs: list[RetrainJob], num_workers: int, probe=None) -> int:
        """Train the jobs not on disk yet (after the pretrained base of a LoRA scenario)."""
        if self.pretrained is not None:
            self.pretrained.train([self._pretrained_job], num_workers=1)
        return self.store.train(jobs, num_workers=num_workers, probe=probe)

    def _job(self, name: str, kept: Tensor, seed: int) -> RetrainJob:
        return RetrainJob(name, tuple(int(i) for i in kept.tolist()), seed)

    def base_job(self) -> RetrainJob:
        return self._job("base", torch.arange(self.config.num_train), self.config.train_seed)

    def subset_jobs(self, seed: int, count: int) -> list[RetrainJob]:
        return [
            self._job(f"subset_{m:03d}_seed{seed}", self.masks[m].nonzero().flatten(), seed)
            for m in range(count)
        ]

    def queries(self) -> Tensor:
        """[Q, 1, 8, 8] samples of the base model (trained first if needed); text-digits
        samples each query from its prompt (`query_prompts`, states in `query_cond`)."""
        if self._queries is None:
            path = self.run_dir / "queries.safetensors"
            if path.exists():
                stored = load_file(str(path))
                self._queries, self._query_cond = stored["queries"], stored.get("cond")
            else:
                self._train([self.base_job()], num_workers=1)
                model = self.store.load("base")
                cond = None
                if self.encoder is not None:
                    prompts = query_prompts(self.config.num_queries, self.config.seed)
                    cond = self.encoder.encode(prompts)
                samples = sample_ddpm(
                    model,
                    self.schedule,
                    self.config.num_queries,
                    seed=self.config.seed,
                    num_inference_steps=self.config.sampling_steps,
                    cond=cond,
                )
                tensors = {"queries": samples} | ({} if cond is None else {"cond": cond})
                atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
                self._queries, self._query_cond = samples, cond
        return self._queries

    def query_cond(self) -> Tensor | None:
        """The queries' conditioning: their prompts' text states [Q, L, D], or None."""
        self.queries()
        return self._query_cond

    def probe(self) -> QueryProbe:
        config = self.config
        return QueryProbe(
            self.queries(),
            config.measurement,
            config.measurement_draws,
            config.seed,
            cond=self.query_cond(),
        )

    def retrain(self) -> int:
        """Train every subset and oracle model not on disk yet; returns how many."""
        config = self.config
        jobs = self.subset_jobs(config.train_seed, config.num_subsets)
        jobs += self.subset_jobs(config.oracle_seed, config.oracle_subsets)
        return self._train(jobs, self.num_workers, self.probe())

    def measurements(self) -> tuple[Tensor, Tensor]:
        """([M, Q] measurements under the subset models, [M_oracle, Q] under the replicates)."""
        self.retrain()
        config, probe = self.config, self.probe()
        main = self.store.measurements(
            self.subset_jobs(config.train_seed, config.num_subsets), probe
        )
        replicate = (
            self.store.measurements(
                self.subset_jobs(config.oracle_seed, config.oracle_subsets), probe
            )
            if config.oracle_subsets
            else main.new_empty((0, main.shape[1]))  # no replicates asked for
        )
        return main, replicate

    # -- scores ----------------------------------------------------------------------------
    def engine(self) -> InfluenceEngine:
        """The engine on the base model and the benchmark's training set."""
        if self._engine is None:
            self._train([self.base_job()], num_workers=1)
            layers = "lora" if self.config.lora_rank else None  # a LoRA: its weights only
            self._engine = InfluenceEngine(
                self.store.load("base"), self.schedule, self.train_set, layers=layers
            )
        return self._engine

    def _curvature(self, config: CurvatureConfig):
        """The fitted curvature for `config` (K-FAC comes from the EK-FAC fit's factors)."""
        if config.strategy == "kfac":
            return as_kfac(self._curvature(dataclasses.replace(config, strategy="ekfac")))
        key = _curvature_key(config)
        if key not in self._curvatures:
            view = self.engine().with_config()
            directory = self.run_dir / "curvature" / key
            try:
                view.load_curvature(directory)
            except FileNotFoundError:
                view.fit(config)
                view.save_curvature(directory)
            self._curvatures[key] = view.curvature
        return self._curvatures[key]

    def _view(self, method: Method) -> InfluenceEngine:
        """The engine with `method`'s curvature, measurement, query draws and damping."""
        return self.engine().with_config(
            curvature=self._curvature(method.curvature),
            measurement=method.measurement,
            query_draws=method.query_draws,
            damping=method.damping,
            damping_mode=method.damping_mode,
        )

    def _score_path(self, method: Method) -> Path:
        return self.run_dir / "scores" / f"{method.key()}.safetensors"

    def scores(self, methods: list[Method]) -> dict[str, Tensor]:
        """Score matrices [Q, N] by method key; computed once per method, then loaded.

        Methods that share the train objective and K are scored in one pass over the
        training set (their query caches are concatenated).
        """
        queries, cond = self.queries(), self.query_cond()
        engine = self.engine()
        ids = engine.query_ids(queries, cond)
        todo = [m for m in methods if not self._score_path(m).exists()]
        groups: dict[tuple[str, int], list[Method]] = defaultdict(list)
        for method in todo:
            groups[(method.train_objective, method.train_draws)].append(method)
        query_grads: dict[tuple[str, int], dict] = {}
        for (objective, draws), members in groups.items():
            caches = []
            for method in members:
                grad_key = (method.measurement, method.query_draws)
                view = self._view(method)
                if grad_key not in query_grads:
                    query_grads[grad_key] = view.query_gradients(queries, cond)
                caches.append(view.precondition_queries(query_grads[grad_key], ids))
            view = engine.with_config(train_objective=objective, train_draws=draws)
            matrices = view.score_matrices(caches)
            for method, matrix in zip(members, matrices, strict=True):
                _save_tensor(self._score_path(method), "scores", matrix)
        return {m.key(): load_file(str(self._score_path(m)))["scores"] for m in methods}

    def index_scores(self, method: Method, index: IndexConfig) -> Tensor:
        """Score matrix [Q, N] of `method` read from an index of the training set.

        The index (built once under `index/`) stores each train gradient whitened and
        compressed by `index`; the scores are its inner products with the queries' index
        vectors, what a search ranks by, for every training example in dataset order.
        """
        key = f"{method.key()}_{_digest(index.to_dict(), 12)}"
        path = self.run_dir / "scores" / f"index_{key}.safetensors"
        if not path.exists():
            view = self._view(method).with_config(
                train_draws=method.train_draws, train_objective=method.train_objective
            )
            built = view.build_index(self.run_dir / "index" / key, index)
            vectors, _ = view.scorer.query_vectors(self.queries())
            scores = torch.empty(vectors.shape[0], built.num_examples, dtype=torch.float64)
            scores[:, built.order] = built.scores(vectors)
            _save_tensor(path, "scores", scores)
        return load_file(str(path))["scores"]

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, methods: list[Method]) -> list[dict]:
        """Rows (method settings, LDS mean ± sem) for each method, then the oracle's row."""
        main, replicate = self.measurements()
        scores = self.scores(methods)
        rows = []
        for method in methods:
            result = lds(scores[method.key()], self.masks, main)
            rows.append(method.row() | _result_columns(result, self.config.num_subsets))
        if self.config.oracle_subsets >= 2:
            count = self.config.oracle_subsets
            result = oracle_lds(main[:count], replicate)
            rows.append({"method": "oracle (seed to seed)"} | _result_columns(result, count))
        return rows

    def counterfactual(self, method: Method) -> list[dict]:
        """Retraining without the top p% proponents of a query vs without a random p%.

        Returns one row per (query, p): the change of the query's measurement from the base
        model to the model retrained without its top proponents, and without random ones
        (all with the base model's seed, so the data is the only difference).
        """
        config = self.config
        scores = self.scores([method])[method.key()]
        base = self.store.measurements([self.base_job()], self.probe())[0]
        generator = torch.Generator().manual_seed(config.seed + 1)
        jobs, plan = [], []
        everyone = torch.arange(config.num_train)
        for percent in config.counterfactual_percents:
            removed = round(percent / 100 * config.num_train)
            random_removed = torch.randperm(config.num_train, generator=generator)[:removed]
            random_job = self._job(
                f"without_random_{percent:g}pct",
                everyone[~torch.isin(everyone, random_removed)],
                config.train_seed,
            )
            jobs.append(random_job)
            for query in range(config.counterfactual_queries):
                top = scores[query].argsort(descending=True)[:removed]
                kept = everyone[~torch.isin(everyone, top)]
                # Named by the kept set, so methods that agree on the top share the model.
                digest = self._job("", kept, 0).kept_digest()[:8]
                job = self._job(
                    f"without_top_{percent:g}pct_q{query:02d}_{digest}", kept, config.train_seed
                )
                jobs.append(job)
                plan.append((query, percent, job, random_job))
        self._train(jobs, self.num_workers, self.probe())
        rows = []
        for query, percent, job, random_job in plan:
            top_value, random_value = self.store.measurements([job, random_job], self.probe())
            rows.append(
                {
                    "method": method.name,
                    "query": query,
                    "percent_removed": percent,
                    "base": float(base[query]),
                    "delta_top": float(top_value[query] - base[query]),
                    "delta_random": float(random_value[query] - base[query]),
                }
            )
        return rows


def _without(values: dict, keys: tuple[str, ...]) -> dict:
    return {key: value for key, value in values.items() if key not in keys}


def _result_columns(result: LDSResult, num_subsets: int) -> dict:
    return {
        "lds": round(result.mean, 4),
        "lds_sem": round(result.sem, 4),
        "num_subsets": num_subsets,
        "num_queries": int(result.per_query.numel()),
    }


def default_methods() -> list[Method]:
    """The configuration under test: EK-FAC with the engine's defaults."""
    return [Method("EK-FAC")]
