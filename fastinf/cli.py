"""Command line: `fastinf train | fit | topk | index | lds | demo` (run `fastinf COMMAND --help`).

Without `--weights`/`--data` every command uses the embedded default (the shipped digits
DDPM and scikit-learn's digits). Tensor files may be .safetensors (keys `images`, optional
`labels`), .pt (a tensor or a dict with those keys) or .npy (images only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .artifacts import atomic_write_text
from .config import CurvatureConfig, ScoreConfig
from .data import ImageTensorDataset, load_digits_dataset
from .engine import InfluenceEngine
from .index.config import COMPRESSIONS, RANKINGS, SEARCHES, STORAGES, IndexConfig
from .index.store import IndexStore
from .models import (
    DIGITS_STEPS,
    default_schedule,
    load_digits_model,
    load_unet,
    schedule_from_sidecar,
)

__all__ = ["main"]


def load_tensors(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) from a .safetensors, .pt or .npy file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)), None
    if path.suffix == ".safetensors":
        content = load_file(str(path))
    elif path.suffix == ".pt":
        content = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: use a .safetensors, .pt or .npy file.")
    if isinstance(content, torch.Tensor):
        return content, None
    if "images" not in content:
        raise ValueError(f"{path} has no 'images' entry (found {sorted(content)}).")
    return content["images"], content.get("labels")


def _engine(args, config: ScoreConfig | None = None) -> InfluenceEngine:
    if args.weights:
        from .models import load_sidecar

        model = load_unet(args.weights)
        schedule = schedule_from_sidecar(load_sidecar(args.weights))
    else:
        model, schedule = load_digits_model(), default_schedule()
    if args.data:
        images, labels = load_tensors(args.data)
        data = ImageTensorDataset(images.float(), labels)
    else:
        data = load_digits_dataset()
    return InfluenceEngine(model, schedule, data, config=config)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", help="UNet .safetensors with its JSON sidecar (default: digits)"
    )
    parser.add_argument("--data", help="training images file (default: scikit-learn digits)")


def _score_config(args) -> ScoreConfig:
    return ScoreConfig(
        train_draws=args.train_draws,
        query_draws=args.query_draws,
        measurement=args.measurement,
        damping=args.damping,
        damping_mode=args.damping_mode,
        block_size=args.block_size,
    )


def _cmd_train(args) -> int:
    from .train import train_digits

    path = train_digits(args.out, steps=args.steps, seed=args.seed)
    print(f"weights written to {path}")
    return 0


def _cmd_fit(args) -> int:
    engine = _engine(args)
    config = CurvatureConfig(
        strategy=args.strategy,
        ggn=args.ggn,
        kfac_approx=args.approx,
        factor_draws=args.factor_draws,
        eigval_draws=args.eigval_draws,
        seed=args.seed,
    )
    start = time.perf_counter()
    engine.fit(config)
    engine.save_curvature(args.out)
    print(f"curvature fitted in {time.perf_counter() - start:.1f}s and saved to {args.out}")
    return 0


def _cmd_topk(args) -> int:
    engine = _engine(args, _score_config(args))
    engine.load_curvature(args.curvature)
    rank = 0
    if args.index:
        from .distributed import init_distributed

        # Under torchrun, each rank searches its own shards; rank 0 writes the result.
        rank, world = init_distributed()
        engine.load_index(args.index, sharded=world > 1)
    if args.queries:
        queries, cond = load_tensors(args.queries)
    else:
        from .sampling import sample_ddpm

        queries, cond = (
            sample_ddpm(engine.model, engine.schedule, args.generate, seed=args.seed),
            None,
        )
    result = engine.score(
        queries.to(engine.dtype),
        k=args.k,
        cond=cond,
        exact_rerank=args.exact_rerank,
        rerank_sigmas=args.rerank_sigmas,
    )
    if rank != 0:
        return 0
    text = json.dumps(result.to_dict(), indent=1)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"top-{args.k} proponents and opponents of {queries.shape[0]} queries in {args.out}")
    else:
        print(text)
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
    )
    start = time.perf_counter()
    engine.build_index(args.out, config, overwrite=args.overwrite, load=False)
    if rank == 0:
        manifest = IndexStore(args.out).read_manifest()
        print(
            f"index of {manifest['plan']['num_examples']} examples ({manifest['dim']} "
            f"{config.storage} values, {config.bytes_per_example(manifest['dim'])} bytes each) "
            f"built in {time.perf_counter() - start:.1f}s by {world} process(es) in {args.out}"
        )
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, num_queries=args.queries, k=args.k, seed=args.seed)
    print(json.dumps(summary["timings"]))
    print(f"grid: {Path(args.out) / 'grid.png'}  results: {Path(args.out) / 'results.json'}")
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
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(known)}.")
    return [known[name] for name in chosen]


def _cmd_lds(args) -> int:
    from .lds import LDSConfig, LDSRun
    from .retrain import RetrainRecipe

    config = LDSConfig(
        num_train=args.num_train,
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
        atomic_write_text(args.out, json.dumps(rows, indent=1))
        print(f"rows written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train the default digits DDPM (reproduces the shipped weights)"
    )
    train.add_argument("--out", required=True)
    train.add_argument(
        "--steps",
        type=int,
        default=DIGITS_STEPS,
        help=f"optimiser steps (default {DIGITS_STEPS}, as the shipped weights were trained)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=_cmd_train)

    fit = commands.add_parser("fit", help="fit (E)K-FAC curvature on the training set")
    _add_model_args(fit)
    fit.add_argument("--out", required=True, help="directory for the curvature artifact")
    fit.add_argument("--strategy", choices=["ekfac", "kfac"], default="ekfac")
    fit.add_argument("--ggn", choices=["model", "loss"], default="model")
    fit.add_argument("--approx", choices=["expand", "reduce"], default="expand")
    fit.add_argument("--factor-draws", type=int, default=CurvatureConfig.factor_draws)
    fit.add_argument("--eigval-draws", type=int, default=CurvatureConfig.eigval_draws)
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(run=_cmd_fit)

    topk = commands.add_parser("topk", help="top proponents and opponents of query images")
    _add_model_args(topk)
    topk.add_argument("--curvature", required=True, help="directory written by `fastinf fit`")
    source = topk.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help="query images file")
    source.add_argument("--generate", type=int, help="sample this many queries from the model")
    topk.add_argument("--k", type=int, default=10)
    topk.add_argument("--train-draws", type=int, default=ScoreConfig.train_draws)
    topk.add_argument("--query-draws", type=int, default=ScoreConfig.query_draws)
    topk.add_argument("--measurement", default="loss")
    topk.add_argument("--damping", type=float, default=ScoreConfig.damping)
    topk.add_argument(
        "--damping-mode", choices=["absolute", "relative"], default=ScoreConfig.damping_mode
    )
    topk.add_argument("--block-size", type=int, default=ScoreConfig.block_size)
    topk.add_argument("--seed", type=int, default=0, help="sampling seed for --generate")
    topk.add_argument("--out", help="write the JSON here instead of printing it")
    topk.add_argument(
        "--index",
        help="search this index (`fastinf index`) instead of scoring every training image; "
        "--train-draws/--damping/--damping-mode must be those it was built with",
    )
    topk.add_argument(
        "--exact-rerank",
        type=int,
        default=None,
        help="with --index: the top-C candidates of each query and sign that may be re-scored "
        "exactly (default: the index's)",
    )
    topk.add_argument(
        "--rerank-sigmas",
        type=float,
        default=None,
        help="with --index: re-score a candidate unless its place in or out of the top-k holds "
        "at ± this many standard deviations of the index error (0: re-score all C; default: "
        "the index's)",
    )
    topk.set_defaults(run=_cmd_topk)

    index = commands.add_parser(
        "index",
        help="build (or resume) the persistent index of the training set; under "
        "`torchrun --nproc_per_node=N` the ranks share the work",
    )
    _add_model_args(index)
    index.add_argument("--curvature", required=True, help="directory written by `fastinf fit`")
    index.add_argument("--out", required=True, help="index directory (resumed if it exists)")
    index.add_argument("--train-draws", type=int, default=ScoreConfig.train_draws)
    index.add_argument("--damping", type=float, default=ScoreConfig.damping)
    index.add_argument(
        "--damping-mode", choices=["absolute", "relative"], default=ScoreConfig.damping_mode
    )
    index.add_argument("--block-size", type=int, default=ScoreConfig.block_size)
    index.add_argument("--compression", choices=list(COMPRESSIONS), default=IndexConfig.compression)
    index.add_argument("--dim", type=int, default=IndexConfig.dim)
    index.add_argument("--storage", choices=list(STORAGES), default=IndexConfig.storage)
    index.add_argument("--rank-by", choices=list(RANKINGS), default=IndexConfig.rank_by)
    index.add_argument("--sketch-seed", type=int, default=IndexConfig.sketch_seed)
    index.add_argument("--calibration-examples", type=int, default=IndexConfig.calibration_examples)
    index.add_argument("--shard-size", type=int, default=IndexConfig.shard_size)
    index.add_argument("--search", choices=list(SEARCHES), default=IndexConfig.search)
    index.add_argument("--nlist", type=int, default=IndexConfig.nlist)
    index.add_argument("--nprobe", type=int, default=IndexConfig.nprobe)
    index.add_argument(
        "--overwrite", action="store_true", help="replace an index of another configuration"
    )
    index.set_defaults(
        run=_cmd_index, query_draws=ScoreConfig.query_draws, measurement=ScoreConfig.measurement
    )

    lds = commands.add_parser(
        "lds", help="linear data-modelling score of methods on digits (retrains, cached)"
    )
    lds.add_argument("--run-dir", required=True, help="cache of models, fits and scores")
    lds.add_argument(
        "--methods", default="ekfac,grad-dot", help="comma list: ekfac,kfac,grad-dot,trak,dtrak"
    )
    lds.add_argument("--subsets", type=int, default=50, help="M retrained subsets")
    lds.add_argument("--oracle-subsets", type=int, default=25, help="subsets with a 2nd seed")
    lds.add_argument("--fraction", type=float, default=0.5, help="α kept per subset")
    lds.add_argument("--num-train", type=int, default=1000, help="digits in the training set")
    lds.add_argument("--queries", type=int, default=32, help="generated queries")
    lds.add_argument("--steps", type=int, default=500, help="training steps of every model")
    lds.add_argument("--damping", type=float, default=ScoreConfig.damping)
    lds.add_argument(
        "--damping-mode", choices=["absolute", "relative"], default=ScoreConfig.damping_mode
    )
    lds.add_argument("--train-draws", type=int, default=ScoreConfig.train_draws)
    lds.add_argument("--query-draws", type=int, default=ScoreConfig.query_draws)
    lds.add_argument("--workers", type=int, default=2, help="parallel retraining processes")
    lds.add_argument("--seed", type=int, default=0)
    lds.add_argument(
        "--counterfactual", action="store_true", help="also retrain without top influences"
    )
    lds.add_argument("--out", help="write the rows as JSON here")
    lds.set_defaults(run=_cmd_lds)

    demo = commands.add_parser(
        "demo", help="sample, fit, attribute and draw the grid on the digits default"
    )
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--queries", type=int, default=8)
    demo.add_argument("--k", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"fastinf {args.command}: error: {error}", file=sys.stderr)
        return 2
