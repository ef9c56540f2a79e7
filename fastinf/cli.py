"""Command line: `fastinf train | fit | topk | index | lds | demo | serve` (see `--help`).

Without `--weights`/`--data` every command uses the embedded default (the shipped digits
DDPM and scikit-learn's digits). Tensor files may be .safetensors (keys `images`, optional
`labels`), .pt (a tensor or a dict with those keys) or .npy (images only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

# Only light modules at the top: parsing, `--help` and every argument or path error answer
# without importing torch, diffusers, faiss or scikit-learn (each command imports its own).
from .config import DIGITS_STEPS, STRATEGY_NAMES, CurvatureConfig, ScoreConfig
from .index.config import (
    COMPRESSIONS,
    FIRST_STAGE_PROJECTIONS,
    FIRST_STAGE_SEARCHES,
    RANKINGS,
    SEARCHES,
    STORAGES,
    IndexConfig,
)
from .locks import writer_lock
from .service.config import ServiceConfig

__all__ = ["build_parser", "main"]

TENSOR_SUFFIXES = (".safetensors", ".pt", ".npy")
LDS_METHODS = ("ekfac", "kfac", "grad-dot", "trak", "dtrak")


def load_tensors(path: str | Path):
    """(images, labels or None) from a .safetensors, .pt or .npy file."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix not in TENSOR_SUFFIXES:
        raise ValueError(f"{path}: use a .safetensors, .pt or .npy file.")
    try:
        if path.suffix == ".npy":
            content = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            content = load_file(str(path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each reader fails its own way on a damaged file
        raise ValueError(
            f"{path} cannot be read as {path.suffix} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'empty or truncated'}); "
            "write it again."
        ) from None
    labels = None
    if not isinstance(content, torch.Tensor):
        if not isinstance(content, dict) or "images" not in content:
            found = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{path} has no 'images' entry (found {found}).")
        content, labels = content["images"], content.get("labels")
    if content.numel() == 0:
        raise ValueError(f"{path} holds no images (shape {tuple(content.shape)}).")
    if not content.is_floating_point():
        raise ValueError(
            f"{path} holds {content.dtype} pixels; fastinf needs floating images in the "
            "model's input range (e.g. [-1, 1]): convert and scale them, e.g. "
            "images.float() / 127.5 - 1 for 0..255 pixels."
        )
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise ValueError(f"{path}: labels must be whole class numbers, got {labels[:5]}.")
        labels = labels.long()
    return content, labels


def _engine(args, config: ScoreConfig | None = None):
    from .data import ImageTensorDataset, load_digits_dataset
    from .engine import InfluenceEngine
    from .models import (
        default_schedule,
        load_digits_model,
        load_sidecar,
        load_unet,
        schedule_from_sidecar,
    )

    if args.pipeline:
        return _pipeline_engine(args, config)
    if args.weights:
        model = load_unet(args.weights)
        schedule = schedule_from_sidecar(load_sidecar(args.weights))
    else:
        model, schedule = load_digits_model(), default_schedule()
    if args.data and Path(args.data).suffix in TENSOR_SUFFIXES:
        images, labels = load_tensors(args.data)
        data = ImageTensorDataset(images, labels)
    elif args.data:  # an image folder or tar shards, read item by item at the model's shape
        from .models import resolve_sample_shape
        from .shards import TarShardDataset, open_image_data

        data = open_image_data(args.data, resolve_sample_shape(model))
        # The fingerprint hashes stored bytes without decoding: decode a spread of images
        # now, so a broken file is named before long work rather than in the middle of it.
        data.check(count=256)
        # Ranks read only their own tar shards when index shards cover whole data shards.
        per_shard = getattr(data, "shard_size", None)
        distributed = args.command == "index" and int(os.environ.get("WORLD_SIZE", 1)) > 1
        if (
            distributed
            and isinstance(data, TarShardDataset)
            and (per_shard is None or args.shard_size % per_shard)
        ):
            print(
                f"fastinf index: note: --shard-size {args.shard_size} is not a multiple of the "
                f"{per_shard or 'unequal numbers of'} examples per tar shard of {args.data}, so "
                "ranks also read shards of other ranks; pass a multiple of the tar shard size "
                "to keep each rank to its own shards.",
                file=sys.stderr,
            )
    else:
        data = load_digits_dataset()
    return InfluenceEngine(
        model, schedule, data, config=config, verify=args.verify, layers=args.layers
    )


def _pipeline_engine(args, config: ScoreConfig | None):
    """The engine of `--pipeline P --data DIR`: the training images encoded once into a
    latent store (resumed if a run was stopped), attributed through the pipeline's UNet.
    The loaded pipeline stays on `args.loaded_pipeline` for the queries."""
    from .engine import InfluenceEngine
    from .layers import find_layers
    from .pipeline import load_pipeline
    from .shards import ImageFolderDataset

    pipeline = load_pipeline(args.pipeline, lora=args.lora)
    find_layers(pipeline.model, args.layers)  # a --layers error comes before any encoding
    data = ImageFolderDataset(args.data, pipeline.image_shape)
    if data.captions is None:
        raise ValueError(
            f"--data {args.data} has no metadata.jsonl; a text-to-image pipeline is attributed "
            'on captioned images: add one line {"file_name": ..., "text": ...} per image.'
        )
    data.check(count=256)  # a broken image is named before any encoding
    print(
        f"encoding {len(data)} training images and captions with {args.pipeline} (resumed "
        "if a store exists)",
        file=sys.stderr,
        flush=True,
    )
    store = pipeline.latent_store(data, args.latents, verify=args.verify)
    args.loaded_pipeline = pipeline
    return InfluenceEngine(
        pipeline.model,
        pipeline.schedule,
        store.dataset(),
        config=config,
        verify=args.verify,
        layers=args.layers,
    )


def _pipeline_queries(args):
    """(query latents, text states) of `topk` with --pipeline: --generate N samples N from
    --prompt; --queries DIR encodes an image folder and its metadata.jsonl prompts (or
    --prompt for all); a --queries tensor file holds images (encoded) or latents."""
    import torch

    pipeline = args.loaded_pipeline
    if args.generate:
        latents = pipeline.generate(
            [args.prompt],
            args.generate,
            seed=args.seed,
            steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
        )
        return latents, pipeline.prompts.encode([args.prompt] * latents.shape[0])
    if Path(args.queries).is_dir():
        from .shards import ImageFolderDataset

        folder = ImageFolderDataset(args.queries, pipeline.image_shape)
        if folder.captions is None and args.prompt is None:
            raise ValueError(
                f"--queries {args.queries} has no metadata.jsonl and no --prompt was given; "
                "give each query image its prompt there, or one --prompt for all."
            )
        images = torch.stack([folder[i][0] for i in range(len(folder))])
        prompts = folder.captions if args.prompt is None else [args.prompt] * len(folder)
        return pipeline.encode_images(images), pipeline.prompts.encode(prompts)
    images, _ = load_tensors(args.queries)
    if images.dim() == 3:
        images = images[None]
    shape = tuple(images.shape[1:])
    if shape == tuple(pipeline.latent_shape):
        latents = images.float()
    elif shape == tuple(pipeline.image_shape):
        latents = pipeline.encode_images(images)
    else:
        raise ValueError(
            f"--queries {args.queries} holds items of shape {shape}; give images "
            f"{tuple(pipeline.image_shape)} in [-1, 1] or latents {tuple(pipeline.latent_shape)}."
        )
    return latents, pipeline.prompts.encode([args.prompt] * latents.shape[0])


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", help="UNet .safetensors with its JSON sidecar (default: the digits DDPM)"
    )
    parser.add_argument(
        "--data",
        help="training images: .safetensors (`images`, optional `labels`), .pt or .npy; an "
        "image folder (DIR/<class>/*.png for labels, or the images in DIR); or webdataset tar "
        "shards (KEY.png/.jpg, optional KEY.cls label), as a folder of .tar files or a pattern "
        "such as 'data/shard-{000000..000099}.tar', streamed at the model's sample shape "
        "(default: scikit-learn digits)",
    )
    parser.add_argument(
        "--pipeline",
        help="a text-to-image pipeline folder written by diffusers' save_pretrained (unet/, "
        "vae/, text_encoder/, tokenizer/, scheduler/), attributed in its latent space; --data "
        "is then an image folder with metadata.jsonl (file_name, text)",
    )
    parser.add_argument(
        "--lora",
        help="needs --pipeline: a LoRA adapter of its UNet (the folder unet.save_lora_adapter "
        "writes, or its .safetensors); only the adapter's weights are attributed",
    )
    parser.add_argument(
        "--latents",
        help="needs --pipeline: folder of the training set's latent store (default: one per "
        "VAE, text encoder and dataset under $FASTINF_CACHE or ./.fastinf_cache/latents)",
    )
    parser.add_argument(
        "--layers",
        help="the layers to attribute, as comma-separated name globs, e.g. '*attentions*' or "
        "'up_blocks.*', or 'lora' for a LoRA adapter's weights (default: every trainable "
        "Linear/Conv2d; a curvature or index is made for one choice and refused with another)",
    )
    parser.add_argument(
        "--verify",
        choices=["full", "sample"],
        help="how the training set is fingerprinted against saved artifacts: every item, or "
        "64 (default: every item up to 1,000,000 items)",
    )


def _score_config(args) -> ScoreConfig:
    return ScoreConfig(
        train_draws=args.train_draws,
        query_draws=args.query_draws,
        measurement=args.measurement,
        damping=args.damping,
        damping_mode=args.damping_mode,
        block_size=args.block_size,
    )


def _write_text(path, text: str) -> None:
    from .artifacts import atomic_write_text

    atomic_write_text(path, text)


def _save_or_fallback(
    save, target: str, what: str, *, folder: bool = False, suffix: str = ".json"
) -> None:
    """`save(target)`; if that fails, save to a new temporary path (a folder, or a file
    ending in `suffix`) and name it in the error, so that finished work is never lost to a
    full disk or a missing permission."""
    try:
        save(target)
    except OSError as error:
        import tempfile

        if folder:
            fallback = tempfile.mkdtemp(prefix=f"fastinf-{what}-")
        else:
            handle, fallback = tempfile.mkstemp(prefix=f"fastinf-{what}-", suffix=suffix)
            os.close(handle)
        save(fallback)
        raise OSError(
            f"could not write the {what} to {target} ({error.strerror or error}); it was saved "
            f"to {fallback} instead."
        ) from None


def _cmd_train(args) -> int:
    from .train import train_digits

    with writer_lock(args.out, "fastinf train"):
        path = train_digits(args.out, steps=args.steps, seed=args.seed)
    print(f"weights written to {path}")
    return 0


def _cmd_fit(args) -> int:
    from .curvature.memory import KRONECKER_STRATEGIES, memory_report
    from .distributed import init_distributed

    # Under torchrun the ranks share the examples; rank 0 holds the lock and writes.
    rank, world = init_distributed()
    engine = _engine(args)
    config = CurvatureConfig(
        strategy=args.strategy,
        ggn=args.ggn,
        kfac_approx=args.approx,
        factor_draws=args.factor_draws,
        eigval_draws=args.eigval_draws,
        projection_dim=args.projection_dim,
        seed=args.seed,
        fraction=args.fraction,
        max_examples=args.max_examples,
        chunk_examples=args.chunk_examples,
        max_layer_bytes=args.max_layer_bytes,
    )
    if rank == 0 and config.strategy in KRONECKER_STRATEGIES:
        print(memory_report(engine.layers), flush=True)
    start = time.perf_counter()
    with writer_lock(args.out, "fastinf fit") if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            for name in ("curvature.safetensors", "curvature.json"):  # a killed save's leftovers
                (Path(args.out) / f"{name}.tmp").unlink(missing_ok=True)
        try:
            engine.fit(config, checkpoint_dir=args.out)
        except OSError:
            if engine.curvature is None or rank != 0:
                raise
            # The fit is complete (and kept in --out); only writing the curvature failed.
            _save_or_fallback(engine.save_curvature, args.out, "curvature", folder=True)
    if rank == 0:
        processes = "" if world == 1 else f" by {world} processes"
        print(
            f"curvature fitted in {time.perf_counter() - start:.1f}s{processes} and saved to "
            f"{args.out}"
        )
    return 0


def _report_details(args, num_train: int, num_queries: int, strategy: str, score_s: float):
    """What `topk --html` shows above its gallery: what was attributed, and how."""
    scoring = f"index {args.index}" if args.index else "exact"
    return {
        "model": args.pipeline or args.weights or "embedded digits DDPM",
        "training set": f"{args.data or 'scikit-learn digits'} ({num_train} images)",
        "queries": args.queries or f"{num_queries} generated (seed {args.seed})",
        "curvature": f"{strategy} ({args.curvature})",
        "k": args.k,
        "scoring": f"{scoring}; {args.train_draws} train / {args.query_draws} query draws, "
        f"{args.measurement}, damping {args.damping:g} ({args.damping_mode})",
        "score time": f"{score_s:.2f} s",
    }


def _cmd_topk(args) -> int:
    from .distributed import all_gather_objects, init_distributed

    # Under torchrun the ranks share the work (each scores its share of the training set,
    # or searches its own index shards) and every rank holds the merged result; rank 0
    # writes it.
    rank, world = init_distributed()
    engine = _engine(args, _score_config(args))
    curvature = engine.load_curvature(args.curvature)
    if args.index:
        engine.load_index(args.index, sharded=world > 1)
    if args.pipeline:
        # Rank 0's queries for all (generated latents can differ in their last bits
        # between nodes, and their content ids seed the draws).
        pair = _pipeline_queries(args) if rank == 0 else None
        queries, cond = all_gather_objects(pair)[0]
    elif args.queries:
        queries, cond = load_tensors(args.queries)
        if cond is not None and not getattr(engine.model, "is_conditional", True):
            raise ValueError(
                f"--queries {args.queries} has labels but the model is unconditional; drop them."
            )
    else:
        from .sampling import sample_ddpm

        sampled = None
        if rank == 0:
            sampled = sample_ddpm(engine.model, engine.schedule, args.generate, seed=args.seed)
        # Rank 0's samples for all: a query's draws are seeded by its pixels, and nodes
        # with other CPUs or thread counts may sample other last bits.
        queries, cond = all_gather_objects(None if sampled is None else sampled.cpu())[0], None
    start = time.perf_counter()
    result = engine.score(
        queries.to(engine.dtype),
        k=args.k,
        cond=cond,
        exact_rerank=args.exact_rerank,
        rerank_sigmas=args.rerank_sigmas,
    )
    score_s = time.perf_counter() - start
    if rank != 0:
        return 0
    text = json.dumps(result.to_dict(), indent=1)
    if args.out:
        _save_or_fallback(lambda path: _write_text(path, text), args.out, "result")
        print(f"top-{args.k} proponents and opponents of {queries.shape[0]} queries in {args.out}")
    else:
        print(text)
    if args.html:
        from .report import write_report

        details = _report_details(
            args, len(engine.train_set), queries.shape[0], curvature.config.strategy, score_s
        )

        shown, train_images = queries, engine.train_set
        if args.pipeline:  # latents are shown through the VAE's decoder
            decode = args.loaded_pipeline.decode_latents
            shown = decode(queries)

            def train_images(index: int):
                return decode(engine.train_set[index][0][None])[0]

        def save(path):
            title = f"fastinf top-{args.k} proponents and opponents"
            write_report(path, shown, result, train_images, title=title, details=details)

        _save_or_fallback(save, args.html, "report", suffix=".html")
        # With the JSON on stdout, the notice goes to stderr so that stdout stays JSON.
        print(f"HTML report in {args.html}", file=sys.stdout if args.out else sys.stderr)
    return 0


def _cmd_index(args) -> int:
    from .distributed import init_distributed

    rank, world = init_distributed()
    engine = _engine(args, _score_config(args))
    engine.load_curvature(args.curvature)
    config = IndexConfig(
        compression=args.compression,
        dim=args.dim,
        storage=args.storage,
        rank_by=args.rank_by,
        sketch_seed=args.sketch_seed,
        calibration_examples=args.calibration_examples,
        shard_size=args.shard_size,
        search=args.search,
        nlist=args.nlist,
        nprobe=args.nprobe,
        first_stage_dim=args.first_stage_dim,
        first_stage_projection=args.first_stage_projection,
        first_stage_fit=args.first_stage_fit,
        first_stage_search=args.first_stage_search,
        first_stage_candidates=args.first_stage_candidates,
        first_stage_ef_search=args.first_stage_ef_search,
    )
    start = time.perf_counter()
    engine.build_index(args.out, config, overwrite=args.overwrite, load=False)
    if rank == 0:
        from .index.store import IndexStore

        manifest = IndexStore(args.out).read_manifest()
        print(
            f"index of {manifest['plan']['num_examples']} examples ({manifest['dim']} "
            f"{config.storage} values, {config.bytes_per_example(manifest['dim'])} bytes each) "
            f"built in {time.perf_counter() - start:.1f}s by {world} process(es) in {args.out}"
        )
    return 0


def _cmd_demo(args) -> int:
    from .demo import TEXT_DEMO_PROMPTS, run_demo, run_text_demo

    if args.text:
        summary = run_text_demo(
            args.out,
            prompts=args.prompt or TEXT_DEMO_PROMPTS,
            per_prompt=args.queries or 2,
            k=args.k,
            seed=args.seed,
        )
    elif args.prompt:
        raise ValueError("--prompt needs --text (the text-conditional default).")
    else:
        summary = run_demo(args.out, num_queries=args.queries or 8, k=args.k, seed=args.seed)
    print(json.dumps(summary["timings"]))
    print(f"grid: {Path(args.out) / 'grid.png'}  results: {Path(args.out) / 'results.json'}")
    return 0


def _cmd_serve(args) -> int:
    from .engine import default_engine, default_index
    from .service import create_app, serve

    config = ServiceConfig(**{name: getattr(args, name) for name in SERVICE_OPTIONS})
    changes = {name: getattr(args, name) for name in SCORE_OPTIONS}
    if args.curvature is None:  # the embedded default: its cached curvature and index
        engine = default_engine().with_config(**changes)
        if not args.no_index and args.index is None:
            print("loading the default index (built on first use, ~1.5 min)", flush=True)
            default_index(engine)
    else:
        engine = _engine(args, _score_config(args))
        engine.load_curvature(args.curvature)
    if args.index:
        engine.load_index(args.index)
    scoring = "exact scoring" if engine.index is None else f"index {engine.index.store.directory}"
    print(
        f"fastinf serve: {len(engine.train_set):,} training examples, {scoring}; "
        f"http://{args.host}:{args.port}/ (Ctrl-C stops)",
        flush=True,
    )
    app = create_app(engine, config, batch_thread=config.score_thread == "worker")
    serve(app, args.host, args.port)
    return 0


def _lds_methods(names: str, damping: float, damping_mode: str, train_draws: int, query_draws: int):
    from .lds import Method

    draws = {"train_draws": train_draws, "query_draws": query_draws}
    trak = CurvatureConfig(strategy="trak", factor_draws=train_draws)
    known = {
        "ekfac": Method("EK-FAC", CurvatureConfig(), damping, damping_mode, **draws),
        "kfac": Method("K-FAC", CurvatureConfig(strategy="kfac"), damping, damping_mode, **draws),
        "grad-dot": Method("gradient dot product", CurvatureConfig(strategy="identity"), **draws),
        "trak": Method("TRAK", trak, 1e-2, "relative", **draws),
        "dtrak": Method(
            "D-TRAK",
            dataclasses.replace(trak, objective="square_norm"),
            1e-2,
            "relative",
            measurement="square_norm",
            train_objective="square_norm",
            **draws,
        ),
    }
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    return [known[name] for name in chosen]


def _cmd_lds(args) -> int:
    from .lds import LDSConfig, LDSRun
    from .retrain import RetrainRecipe

    config = LDSConfig(
        num_train=args.num_train,
        model=args.model,
        lora_rank=args.lora_rank,
        num_subsets=args.subsets,
        fraction=args.fraction,
        oracle_subsets=args.oracle_subsets,
        num_queries=args.queries,
        seed=args.seed,
        recipe=RetrainRecipe(steps=args.steps),
    )
    methods = _lds_methods(
        args.methods, args.damping, args.damping_mode, args.train_draws, args.query_draws
    )
    run = LDSRun(args.run_dir, config, num_workers=args.workers)
    rows = run.evaluate(methods)
    for row in rows:
        print(f"{row['method']:<28} LDS {row['lds']:+.3f} ± {row['lds_sem']:.3f}")
    if args.counterfactual:
        rows += run.counterfactual(methods[0])
    if args.out:
        text = json.dumps(rows, indent=1)
        _save_or_fallback(lambda path: _write_text(path, text), args.out, "rows")
        print(f"rows written to {args.out}")
    return 0


# -- argument types: a bad number is an argparse error (exit 2) before any work ------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not (0.0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not (0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def fit_fraction(text: str) -> float:
    value = float(text)
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def example_cap(text: str) -> int | None:
    """A positive number of examples, or 'all' (no cap)."""
    if text.strip().lower() == "all":
        return None
    return positive_int(text)


def _help(cls, name: str) -> str:
    """An option's help: the config field's own help text (one source for API and CLI)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return fields[name].metadata.get("help", name.replace("_", " "))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it has none or says it already);
    the worked example keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        absent = action.default is None or action.default is False
        if absent or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _command(commands, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=_Formatter,
    )


SCORE_OPTIONS = {
    "train_draws": dict(type=positive_int),
    "query_draws": dict(type=positive_int),
    "measurement": dict(choices=["loss", "timestep_loss", "elbo_simplified", "square_norm"]),
    "damping": dict(type=nonnegative_float),
    "damping_mode": dict(choices=["absolute", "relative"]),
    "block_size": dict(type=positive_int),
}


SERVICE_OPTIONS = {
    "default_k": dict(type=positive_int),
    "k_max": dict(type=positive_int),
    "max_batch": dict(type=positive_int),
    "batch_window_ms": dict(type=nonnegative_float),
    "max_queue": dict(type=positive_int),
    "timeout_s": dict(type=nonnegative_float),
    "max_body_bytes": dict(type=positive_int),
    "exact_rerank": dict(type=nonnegative_int),
    "score_thread": dict(choices=["main", "worker"]),
    "thumbnail_scale": dict(type=positive_int),
    "generate_steps": dict(type=positive_int),
}


def _add_config_args(parser: argparse.ArgumentParser, cls, options: dict, names) -> None:
    """`--name` options for fields of a config dataclass, with its defaults and help."""
    for name in names:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=getattr(cls, name),
            help=_help(cls, name),
            **options[name],
        )


def build_parser() -> argparse.ArgumentParser:
    """The `fastinf` parser: every option has a help line with its default."""
    parser = argparse.ArgumentParser(
        prog="fastinf", description=__doc__.splitlines()[0], formatter_class=_Formatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = _command(
        commands,
        "train",
        "train the default digits DDPM (reproduces the shipped weights)",
        "fastinf train --out my_weights/",
    )
    train.add_argument("--out", required=True, help="folder for the weights and their sidecar")
    train.add_argument(
        "--steps",
        type=positive_int,
        default=DIGITS_STEPS,
        help="optimiser steps (the shipped weights were trained with the default)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of data order and noise")
    train.add_argument("--force", action="store_true", help="replace weights already in --out")
    train.set_defaults(run=_cmd_train)

    fit = _command(
        commands,
        "fit",
        "fit the curvature (EK-FAC by default) on the training set; an interrupted fit "
        "resumes from its progress in --out, and under `torchrun --nproc_per_node=N` the "
        "ranks share the examples",
        "fastinf fit --out curvature/",
    )
    _add_model_args(fit)
    fit.add_argument(
        "--out",
        required=True,
        help="folder for the curvature artifact; while fitting it keeps the progress "
        "(fit_progress/, deleted when the fit completes) that the same command resumes",
    )
    fit.add_argument(
        "--strategy",
        choices=list(STRATEGY_NAMES),
        default=CurvatureConfig.strategy,
        help=_help(CurvatureConfig, "strategy"),
    )
    fit.add_argument(
        "--ggn", choices=["model", "loss"], default="model", help=_help(CurvatureConfig, "ggn")
    )
    fit.add_argument(
        "--approx",
        choices=["expand", "reduce"],
        default="expand",
        help="K-FAC approximation of weight-shared layers: "
        + _help(CurvatureConfig, "kfac_approx"),
    )
    fit.add_argument(
        "--factor-draws",
        type=positive_int,
        default=CurvatureConfig.factor_draws,
        help=_help(CurvatureConfig, "factor_draws"),
    )
    fit.add_argument(
        "--eigval-draws",
        type=positive_int,
        default=CurvatureConfig.eigval_draws,
        help=_help(CurvatureConfig, "eigval_draws"),
    )
    fit.add_argument(
        "--projection-dim",
        type=positive_int,
        default=CurvatureConfig.projection_dim,
        help=_help(CurvatureConfig, "projection_dim"),
    )
    fit.add_argument("--seed", type=int, default=0, help=_help(CurvatureConfig, "seed"))
    fit.add_argument(
        "--fraction", type=fit_fraction, default=None, help=_help(CurvatureConfig, "fraction")
    )
    fit.add_argument(
        "--max-examples",
        type=example_cap,
        default=CurvatureConfig.max_examples,
        help=_help(CurvatureConfig, "max_examples") + "; 'all' fits every example",
    )
    fit.add_argument(
        "--chunk-examples",
        type=positive_int,
        default=CurvatureConfig.chunk_examples,
        help=_help(CurvatureConfig, "chunk_examples")
        + "; a resumed fit keeps the chunks it was started with",
    )
    fit.add_argument(
        "--max-layer-bytes",
        type=positive_int,
        default=CurvatureConfig.max_layer_bytes,
        help=_help(CurvatureConfig, "max_layer_bytes"),
    )
    fit.add_argument("--force", action="store_true", help="replace a curvature already in --out")
    fit.set_defaults(run=_cmd_fit)

    topk = _command(
        commands,
        "topk",
        "top proponents and opponents of query images; under `torchrun --nproc_per_node=N` "
        "(or --nnodes) the ranks share the scoring and rank 0 writes",
        "fastinf topk --curvature curvature/ --generate 8 --k 10 --out top.json",
    )
    _add_model_args(topk)
    topk.add_argument("--curvature", required=True, help="folder written by `fastinf fit`")
    source = topk.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--queries",
        help="query images file (.safetensors `images`/`labels`, .pt or .npy); with "
        "--pipeline also an image folder with metadata.jsonl prompts, or latents",
    )
    source.add_argument(
        "--generate", type=positive_int, help="sample this many queries from the model"
    )
    topk.add_argument(
        "--prompt",
        help="needs --pipeline: the text the queries are generated from (--generate) or "
        "measured with (--queries without metadata.jsonl)",
    )
    topk.add_argument(
        "--sample-steps",
        type=positive_int,
        default=50,
        help="needs --pipeline: sampler steps of --generate",
    )
    topk.add_argument(
        "--guidance-scale",
        type=nonnegative_float,
        default=1.0,
        help="needs --pipeline: classifier-free guidance of --generate (1: none)",
    )
    topk.add_argument(
        "--k", type=positive_int, default=10, help="proponents and opponents per query"
    )
    _add_config_args(topk, ScoreConfig, SCORE_OPTIONS, SCORE_OPTIONS)
    topk.add_argument("--seed", type=int, default=0, help="sampling seed for --generate")
    topk.add_argument("--out", help="write the JSON here instead of printing it")
    topk.add_argument(
        "--html", help="also write a self-contained HTML gallery here (.html or .htm)"
    )
    topk.add_argument(
        "--index",
        help="search this index (`fastinf index`) instead of scoring every training image; "
        "--train-draws/--damping/--damping-mode must be those it was built with",
    )
    topk.add_argument(
        "--exact-rerank",
        type=nonnegative_int,
        default=None,
        help="needs --index: the top-C candidates of each query and sign that may be "
        "re-scored exactly (None: the index's)",
    )
    topk.add_argument(
        "--rerank-sigmas",
        type=nonnegative_float,
        default=None,
        help="needs --index: re-score a candidate unless its place in or out of the top-k "
        "holds at ± this many standard deviations of the index error (0: re-score all C; "
        "None: the index's)",
    )
    topk.set_defaults(run=_cmd_topk)

    index = _command(
        commands,
        "index",
        "build (or resume) the persistent index of the training set; under "
        "`torchrun --nproc_per_node=N` the ranks share the work",
        "fastinf index --curvature curvature/ --out index/",
    )
    _add_model_args(index)
    index.add_argument("--curvature", required=True, help="folder written by `fastinf fit`")
    index.add_argument("--out", required=True, help="index folder (resumed if it exists)")
    score_names = ("train_draws", "damping", "damping_mode", "block_size")
    _add_config_args(index, ScoreConfig, SCORE_OPTIONS, score_names)
    options = {
        "compression": dict(choices=list(COMPRESSIONS)),
        "dim": dict(type=positive_int),
        "storage": dict(choices=list(STORAGES)),
        "rank_by": dict(choices=list(RANKINGS)),
        "sketch_seed": dict(type=int),
        "calibration_examples": dict(type=positive_int),
        "shard_size": dict(type=positive_int),
        "search": dict(choices=list(SEARCHES)),
        "nlist": dict(type=positive_int),
        "nprobe": dict(type=positive_int),
        "first_stage_dim": dict(type=positive_int),
        "first_stage_projection": dict(choices=list(FIRST_STAGE_PROJECTIONS)),
        "first_stage_fit": dict(type=positive_int),
        "first_stage_search": dict(choices=list(FIRST_STAGE_SEARCHES)),
        "first_stage_candidates": dict(type=positive_int),
        "first_stage_ef_search": dict(type=positive_int),
    }
    _add_config_args(index, IndexConfig, options, options)
    index.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an index of another configuration in --out",
    )
    index.set_defaults(
        run=_cmd_index, query_draws=ScoreConfig.query_draws, measurement=ScoreConfig.measurement
    )

    lds = _command(
        commands,
        "lds",
        "linear data-modelling score of methods on digits (retrains, cached)",
        "fastinf lds --run-dir lds_run/ --methods ekfac,trak --subsets 50",
    )
    lds.add_argument("--run-dir", required=True, help="cache of models, fits and scores")
    lds.add_argument(
        "--methods",
        default="ekfac,grad-dot",
        help=f"comma list of: {', '.join(LDS_METHODS)}",
    )
    lds.add_argument(
        "--model",
        choices=["digits", "text-digits"],
        default="digits",
        help="the model under test: the digits DDPM's architecture, or the text-conditional "
        "default's (captioned digits; queries sampled from prompts)",
    )
    lds.add_argument(
        "--lora-rank",
        type=nonnegative_int,
        default=0,
        help="with --model text-digits: > 0 fine-tunes a LoRA of this rank per subset on a "
        "base pretrained on the other digits, attributed through the LoRA weights only",
    )
    lds.add_argument("--subsets", type=positive_int, default=50, help="M retrained subsets")
    lds.add_argument(
        "--oracle-subsets", type=positive_int, default=25, help="subsets retrained with a 2nd seed"
    )
    lds.add_argument("--fraction", type=fraction, default=0.5, help="α kept per subset")
    lds.add_argument(
        "--num-train", type=positive_int, default=1000, help="digits in the training set"
    )
    lds.add_argument("--queries", type=positive_int, default=32, help="generated queries")
    lds.add_argument(
        "--steps", type=positive_int, default=500, help="training steps of every model"
    )
    score_names = ("train_draws", "query_draws", "damping", "damping_mode")
    _add_config_args(lds, ScoreConfig, SCORE_OPTIONS, score_names)
    lds.add_argument(
        "--workers", type=positive_int, default=2, help="parallel retraining processes"
    )
    lds.add_argument("--seed", type=int, default=0, help="seed of subsets and queries")
    lds.add_argument(
        "--counterfactual", action="store_true", help="also retrain without top influences"
    )
    lds.add_argument("--out", help="write the rows as JSON here")
    lds.set_defaults(run=_cmd_lds)

    demo = _command(
        commands,
        "demo",
        "sample, fit, attribute and draw the grid on the digits default (--text: prompt → "
        "sample → proponents and opponents on the text-conditional default)",
        "fastinf demo --out demo_out",
    )
    demo.add_argument("--out", default="demo_out", help="folder for grid.png and results.json")
    demo.add_argument("--text", action="store_true", help="use the text-conditional digits default")
    demo.add_argument(
        "--prompt",
        action="append",
        help="with --text: a prompt to sample from (repeat for several; default: four "
        "prompts of different digits)",
    )
    demo.add_argument(
        "--queries",
        type=positive_int,
        help="samples to attribute (default 8; with --text: samples per prompt, default 2)",
    )
    demo.add_argument("--k", type=positive_int, default=6, help="proponents and opponents shown")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.set_defaults(run=_cmd_demo)

    serve = _command(
        commands,
        "serve",
        "serve topk_influencers over HTTP (JSON API, web page at /, /metrics); with no "
        "arguments, the digits default with its index",
        "fastinf serve --port 8000   # then open http://127.0.0.1:8000/",
    )
    _add_model_args(serve)
    serve.add_argument(
        "--curvature", help="folder written by `fastinf fit` (needed with --weights/--data)"
    )
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--index", help="search this index (`fastinf index`)")
    which.add_argument(
        "--no-index",
        action="store_true",
        help="score every training image exactly (the default's index is otherwise used)",
    )
    _add_config_args(serve, ScoreConfig, SCORE_OPTIONS, SCORE_OPTIONS)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (another exposes the service)"
    )
    serve.add_argument("--port", type=nonnegative_int, default=8000, help="port to listen on")
    _add_config_args(serve, ServiceConfig, SERVICE_OPTIONS, SERVICE_OPTIONS)
    serve.set_defaults(run=_cmd_serve)
    return parser


# -- checks before any work ---------------------------------------------------------------
def _existing_file(path: str, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file.")
    if suffixes and Path(path).suffix not in suffixes:
        raise ValueError(f"{option} {path}: use a {', '.join(suffixes)} file.")


def _existing_data(path: str) -> None:
    """`--data` names a tensor file, an image folder, or tar shards that all exist."""
    from .shard_files import data_layout, shard_paths

    if Path(path).suffix in TENSOR_SUFFIXES:
        _existing_file(path, "--data", TENSOR_SUFFIXES)
        return
    if Path(path).is_file() and not path.endswith(".tar"):
        raise ValueError(
            f"--data {path}: use a {', '.join(TENSOR_SUFFIXES)} file, an image folder, a folder "
            "of .tar shards or a shard pattern such as data/shard-{000000..000099}.tar."
        )
    try:
        if data_layout(path) == "tars":
            shard_paths(path)
    except (OSError, ValueError) as error:
        raise type(error)(f"--data {error}") from None


def _existing_artifact(path: str, option: str, marker: str, maker: str) -> None:
    if not (Path(path) / marker).is_file():
        raise FileNotFoundError(f"{option} {path}: no {marker} there; create it with `{maker}`.")


def _writable(path: Path, option: str) -> None:
    """The nearest existing folder at or above `path` must let this process write."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: no permission to write in {folder}.")


def _output_folder(path: str, option: str) -> None:
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{option} {path} is an existing file; name a folder.")
    _writable(Path(path).absolute(), option)


def _output_file(path: str | None, option: str) -> None:
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{option} {path} is a folder; name a file to write.")
    if path is not None:
        _writable(Path(path).absolute(), option)


def _html_file(path: str, out: str | None) -> None:
    if Path(path).suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--html {path}: name a .html or .htm file, e.g. --html report.html.")
    if out is not None and Path(path).absolute() == Path(out).absolute():
        raise ValueError(f"--html {path} is also --out; give the JSON and the report two names.")
    _output_file(path, "--html")


def _check_pipeline_arguments(args: argparse.Namespace) -> None:
    """--pipeline and the options that need it or exclude it."""
    if not hasattr(args, "pipeline"):  # a command without model options
        return
    pipeline = args.pipeline
    if not pipeline:
        for option in ("lora", "latents", "prompt"):
            if getattr(args, option, None) is not None:
                raise ValueError(f"--{option} needs --pipeline (a text-to-image pipeline folder).")
        return
    if args.command == "serve":
        raise ValueError(
            "fastinf serve does not take --pipeline yet; attribute text-to-image queries with "
            "`fastinf topk --pipeline ... --prompt ...`."
        )
    if args.weights:
        raise ValueError("--weights and --pipeline both name the model; pass one of them.")
    if not Path(pipeline).is_dir():
        raise FileNotFoundError(
            f"--pipeline {pipeline} is not a folder; pass the folder save_pretrained wrote."
        )
    if not args.data or not Path(args.data).is_dir():
        raise ValueError(
            "--pipeline needs --data DIR: an image folder with metadata.jsonl (file_name, "
            "text), the captioned layout of diffusers' text-to-image training."
        )
    if args.lora is not None and not Path(args.lora).exists():
        raise FileNotFoundError(f"--lora {args.lora} does not exist.")
    if args.command == "topk":
        if args.generate and args.prompt is None:
            raise ValueError("--generate with --pipeline needs --prompt TEXT to sample from.")
        queries = args.queries
        if queries and not Path(queries).is_dir() and args.prompt is None:
            raise ValueError(
                f"--queries {queries} is a tensor file, which holds no prompts; pass --prompt "
                "TEXT, or an image folder with metadata.jsonl."
            )


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse missing inputs, outputs of the wrong kind, finished work that would be
    replaced and options given without the one they need — before anything is computed."""
    if getattr(args, "weights", None):
        _existing_file(args.weights, "--weights", (".safetensors",))
        _existing_file(str(Path(args.weights).with_suffix(".json")), "--weights' sidecar")
    if getattr(args, "data", None):
        _existing_data(args.data)
    _check_pipeline_arguments(args)
    topk_file = args.command == "topk" and args.queries
    if topk_file and not (args.pipeline and Path(args.queries).is_dir()):
        _existing_file(args.queries, "--queries", TENSOR_SUFFIXES)
    if getattr(args, "curvature", None):
        _existing_artifact(args.curvature, "--curvature", "curvature.json", "fastinf fit")
    command = args.command
    if command in ("train", "fit", "index", "demo"):
        _output_folder(args.out, "--out")
    if command == "lds":
        _output_folder(args.run_dir, "--run-dir")
    if command in ("topk", "lds"):
        _output_file(args.out, "--out")
    if command == "topk" and args.html is not None:
        _html_file(args.html, args.out)
    if command == "fit" and not args.force and (Path(args.out) / "curvature.json").exists():
        raise ValueError(
            f"--out {args.out} already holds a curvature (indexes built on it would no longer "
            "match); pass --force to replace it, or choose another folder."
        )
    if command == "train" and not args.force and any(Path(args.out).glob("*.safetensors")):
        raise ValueError(
            f"--out {args.out} already holds weights; pass --force to replace them, or choose "
            "another folder."
        )
    if command == "topk":
        if args.index:
            _existing_artifact(args.index, "--index", "index.json", "fastinf index")
        else:
            for option in ("exact_rerank", "rerank_sigmas"):
                if getattr(args, option) is not None:
                    flag = "--" + option.replace("_", "-")
                    raise ValueError(f"{flag} needs --index (it re-ranks an index's candidates).")
    if command == "serve":
        if (args.weights or args.data or args.layers) and args.curvature is None:
            raise ValueError(
                "--weights/--data/--layers need --curvature (fit one with `fastinf fit "
                "--weights ... --data ... --layers ... --out DIR`)."
            )
        if args.index:
            _existing_artifact(args.index, "--index", "index.json", "fastinf index")
        if args.timeout_s <= 0:
            raise ValueError("--timeout-s must be > 0.")
        if args.default_k > args.k_max:
            raise ValueError(f"--default-k {args.default_k} exceeds --k-max {args.k_max}.")
    if command == "lds" and args.lora_rank and args.model != "text-digits":
        raise ValueError("--lora-rank needs --model text-digits (the LoRA scenario).")
    if command == "lds":
        unknown = sorted(
            {m.strip() for m in args.methods.split(",") if m.strip()} - set(LDS_METHODS)
        )
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {list(LDS_METHODS)}.")


INTERRUPTED = {
    "train": "no weights were written",
    "fit": "finished chunks were kept in --out (fit_progress); the same command resumes the fit",
    "topk": "nothing was written",
    "index": "finished shards were kept; the same command resumes the build",
    "lds": "finished models and scores were kept in --run-dir; the same command resumes",
    "demo": "nothing was written; the same command starts the demo again",
    "serve": "the server stopped",
}


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # a polite kill ends like Ctrl-C
    try:
        check_arguments(args)
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"fastinf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastinf {args.command}: interrupted; {INTERRUPTED[args.command]}.", file=sys.stderr)
        return 130
