"""fastinf against kronfluence on identical work, side by side in one process.

Run from the repository root in the peer venv (built by `bash bench/setup_peer_env.sh`):

    .venv-peer/bin/python bench/peer_kronfluence.py

The work (the issue's setting): the first 1,000 digits, the shipped digits UNet, K = 32
train draws, K_q = 64 query draws, 32 queries (DDPM samples of the model, 50 steps, seed 0),
EK-FAC of the GGN^model as an MC-Fisher, damping 1e-8 absolute, factors and eigenvalues
each fitted over 4 draws per training image.

kronfluence has no notion of diffusion draws, so every draw (x_n, t, ε) is one kronfluence
example: 32,000 train draws and 2,048 query draws, made with `fastinf.diffusion.make_draws`
from the same ids, purposes and seed fastinf uses, so both tools see the same draws. The
fitting datasets are fastinf's own fitting draws too (purposes FIT_FACTORS / FIT_EIGVALS),
and the MC-Fisher output noise η is fastinf's `output_noise`, so the sampled Fisher of both
tools is built from identical samples. kronfluence's [2048, 32000] pairwise scores are
averaged over each query's and each image's draws back to [32, 1000] and compared with
fastinf's scores (Spearman per query).

kronfluence's pairwise scoring is first timed on two fractions of the train images (fixed
query cost + cost per image, fitted as a line); it is then timed in full when that line
predicts at most `--max-full-minutes`, and extrapolated otherwise (stated in the output and
the rows' notes).

Rows are appended to `bench/results/e2e_kronfluence_<device>.csv`; the run's summary goes
to `bench/results/e2e_kronfluence_<device>.md`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.data import ImageTensorDataset, load_digits_dataset
from fastinf.diffusion import Purpose, make_draws, output_noise
from fastinf.engine import InfluenceEngine
from fastinf.models import default_schedule, load_digits_model
from fastinf.sampling import sample_ddpm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import RESULTS_DIR, Context, linear_fit, timed, wait_for_idle, write_rows

FACTORS = "ekfac"


class DiffusionDrawTask(Task):
    """One kronfluence example = one diffusion draw: a batch is (x_t, t, ε[, η]).

    Train loss and measurement: the per-pixel-mean squared error of the draw, summed over
    the batch (kronfluence expects per-example losses summed). With `sample=True` the target
    is ε̂ + √(P/2)·η, so ∂loss/∂ε̂ = −√(2/P)·η: the MC-Fisher of GGN^model with the same η
    fastinf back-propagates (DESIGN §1).
    """

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        x_t, timesteps, noise = batch[0], batch[1], batch[2]
        eps_pred = model(x_t, timesteps)
        if sample:
            num_pixels = eps_pred[0].numel()
            target = eps_pred.detach() + math.sqrt(num_pixels / 2.0) * batch[3]
        else:
            target = noise
        return (eps_pred - target).square().flatten(1).mean(1).sum()

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)


def draw_dataset(
    images: torch.Tensor, ids: torch.Tensor, num_draws: int, purpose: Purpose, schedule, seed: int
) -> TensorDataset:
    """Draws of `images` (example-major: item n·K + k is draw k of image n) as a dataset of
    (x_t, t, ε, η); η is the MC-Fisher output noise fastinf uses for the same purpose."""
    draw_ids = torch.arange(num_draws)
    shape = tuple(images.shape[1:])
    draws = make_draws(
        ids, draw_ids, shape, num_timesteps=schedule.num_timesteps, purpose=purpose, seed=seed
    )
    noise = draws.noise.flatten(0, 1)
    timesteps = draws.timesteps.flatten()
    x_t = schedule.add_noise(images.repeat_interleave(num_draws, dim=0), noise, timesteps)
    eta = output_noise(ids, draw_ids, shape, purpose=purpose, seed=seed).flatten(0, 1).float()
    return TensorDataset(x_t, timesteps, noise, eta)


def per_query_spearman(fastinf_scores: torch.Tensor, peer_scores: torch.Tensor) -> list[float]:
    return [
        float(spearmanr(a.numpy(), b.numpy()).statistic)
        for a, b in zip(fastinf_scores, peer_scores, strict=True)
    ]


def run(args) -> None:
    load_before = wait_for_idle(args.max_load, args.wait)
    ctx = Context("peer", torch.device("cpu"), load_before)
    wall_start = time.perf_counter()
    score_config = ScoreConfig(train_draws=args.train_draws, query_draws=args.query_draws)
    fit_config = CurvatureConfig()
    num_train, k, k_q = args.train_images, score_config.train_draws, score_config.query_draws
    print(
        f"peer: torch {torch.__version__}, {torch.get_num_threads()} threads, commit "
        f"{ctx.commit}, load {load_before:.2f}; N={num_train}, K={k}, K_q={k_q}, "
        f"Q={args.queries}"
    )

    schedule = default_schedule()
    images = load_digits_dataset().images[:num_train]
    train_set = ImageTensorDataset(images)
    model = load_digits_model()
    queries = sample_ddpm(model, schedule, args.queries, seed=0, num_inference_steps=50)
    csv_path = RESULTS_DIR / f"e2e_kronfluence_{ctx.device_tag}.csv"

    def add(method: str, seconds: float, load: float, q=0, kk=0, kq=0, note="", n=num_train):
        # Each row is saved as soon as it is measured: a run stopped midway keeps its rows.
        row = ctx.row("kronfluence_compare", method, n, q, kk, kq, [seconds], [load], note=note)
        write_rows([row], csv_path)
        print(f"{method}: {seconds:.4g} {note}")

    # -- fastinf ---------------------------------------------------------------------------
    engine = InfluenceEngine(model, schedule, train_set, config=score_config)
    _, seconds, load = timed(lambda: engine.fit(fit_config), ctx.device)
    fit_note = f"EK-FAC, {fit_config.factor_draws}+{fit_config.eigval_draws} draws/example"
    add("fastinf_fit", seconds, load, note=fit_note)
    fastinf_fit_s = seconds
    cache, seconds, load = timed(lambda: engine.prepare_queries(queries), ctx.device)
    add("fastinf_prepare_queries", seconds, load, q=args.queries, kq=k_q)
    fastinf_score_s = seconds
    result, seconds, load = timed(lambda: engine.score(cache, k=10, return_scores=True), ctx.device)
    add("fastinf_score", seconds, load, q=args.queries, kk=k, kq=k_q)
    fastinf_score_s += seconds
    fastinf_total = fastinf_fit_s + fastinf_score_s
    fastinf_scores = result.scores.double()

    # -- kronfluence -----------------------------------------------------------------------
    task = DiffusionDrawTask()
    peer_model = prepare_model(load_digits_model(), task)
    output_dir = tempfile.mkdtemp(prefix="kronfluence_e2e_")
    analyzer = Analyzer(
        "e2e",
        peer_model,
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=output_dir,
        log_level=logging.WARNING,
    )
    ids = torch.arange(num_train)

    def make_all_draws():
        return (
            draw_dataset(
                images, ids, fit_config.factor_draws, Purpose.FIT_FACTORS, schedule, fit_config.seed
            ),
            draw_dataset(
                images, ids, fit_config.eigval_draws, Purpose.FIT_EIGVALS, schedule, fit_config.seed
            ),
            draw_dataset(images, ids, k, Purpose.TRAIN_GRADIENT, schedule, score_config.seed),
            draw_dataset(
                queries, cache.query_ids, k_q, Purpose.QUERY_GRADIENT, schedule, score_config.seed
            ),
        )

    (factor_set, lambda_set, train_draws, query_draws), seconds, load = timed(
        make_all_draws, ctx.device
    )
    add("kronfluence_make_draws", seconds, load, note="draws → kronfluence examples")
    peer_fit = seconds
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=False)
    fit_steps = (
        (
            "kronfluence_fit_covariance",
            lambda: analyzer.fit_covariance_matrices(
                FACTORS,
                factor_set,
                per_device_batch_size=fit_config.batch_size,
                factor_args=factor_args,
            ),
        ),
        (
            "kronfluence_eigendecomposition",
            lambda: analyzer.perform_eigendecomposition(FACTORS, factor_args=factor_args),
        ),
        (
            "kronfluence_fit_lambda",
            lambda: analyzer.fit_lambda_matrices(
                FACTORS,
                lambda_set,
                per_device_batch_size=fit_config.batch_size,
                factor_args=factor_args,
            ),
        ),
    )
    for method, step in fit_steps:
        _, seconds, load = timed(step, ctx.device)
        add(method, seconds, load)
        peer_fit += seconds
    add("kronfluence_fit", peer_fit, load, note="make_draws + covariance + eigen + lambda")

    score_args = ScoreArguments(
        damping_factor=score_config.damping,
        query_gradient_accumulation_steps=math.ceil(len(query_draws) / args.query_batch),
    )

    def pairwise(num_images: int) -> tuple[torch.Tensor, float, float]:
        def call():
            analyzer.compute_pairwise_scores(
                scores_name=f"pairwise_{num_images}",
                factors_name=FACTORS,
                query_dataset=query_draws,
                train_dataset=train_draws,
                per_device_query_batch_size=args.query_batch,
                per_device_train_batch_size=score_config.batch_size,
                train_indices=list(range(num_images * k)),
                score_args=score_args,
            )
            return analyzer.load_pairwise_scores(f"pairwise_{num_images}")["all_modules"]

        scores, seconds, load = timed(call, ctx.device)
        note = f"measured on {num_images} of {num_train} images ({num_images * k} train draws)"
        add(
            f"kronfluence_pairwise_{num_images}",
            seconds,
            load,
            q=args.queries,
            kk=k,
            kq=k_q,
            note=note,
        )
        averaged = scores.double().reshape(args.queries, k_q, num_images, k).mean(dim=(1, 3))
        return averaged, seconds, load

    # Two fractions give a linear model of the scoring time (fixed query cost + per image);
    # the full scoring is then measured when the model predicts it fits the time limit.
    first, second = sorted(args.fractions)
    _, first_s, _ = pairwise(first)
    peer_scores, second_s, load = pairwise(second)
    fixed_s, per_image_s, _ = linear_fit([first, second], [first_s, second_s])
    predicted_s = fixed_s + per_image_s * num_train
    model_note = (
        f"linear model from {first} and {second} of {num_train} images: {fixed_s:.1f}s fixed "
        f"+ {per_image_s:.3f}s/image = {predicted_s:.1f}s"
    )
    if predicted_s <= args.max_full_minutes * 60:
        peer_scores, peer_score_s, load = pairwise(num_train)
        how = f"measured in full ({num_train * k} train draws); {model_note}"
    else:
        peer_score_s = predicted_s
        how = f"EXTRAPOLATED, {model_note}"
    add("kronfluence_pairwise", peer_score_s, load, q=args.queries, kk=k, kq=k_q, note=how)
    peer_total = peer_fit + peer_score_s
    add("kronfluence_total", peer_total, load, q=args.queries, kk=k, kq=k_q, note=how)
    add("fastinf_total", fastinf_total, load, q=args.queries, kk=k, kq=k_q)

    compared = peer_scores.shape[1]
    spearman = per_query_spearman(fastinf_scores[:, :compared], peer_scores)
    scale = (peer_scores / fastinf_scores[:, :compared]).flatten().median().item()
    total_s = time.perf_counter() - wall_start
    lines = [
        f"# fastinf vs kronfluence (run {ctx.run})",
        "",
        f"Digits UNet, first {num_train} digits, K={k}, K_q={k_q}, {args.queries} queries "
        f"(DDPM samples), EK-FAC MC-Fisher, damping {score_config.damping:g}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, commit {ctx.commit}, load "
        f"average before {load_before:.2f}; one process, one repeat each; total wall time "
        f"{total_s / 60:.1f} min.",
        "",
        "| step | fastinf s | kronfluence s | kronfluence / fastinf |",
        "|---|---|---|---|",
        f"| fit (factors + eigen + eigenvalues) | {fastinf_fit_s:.1f} | {peer_fit:.1f} | "
        f"{peer_fit / fastinf_fit_s:.1f} |",
        f"| queries + scoring | {fastinf_score_s:.1f} | {peer_score_s:.1f} | "
        f"{peer_score_s / fastinf_score_s:.1f} |",
        f"| whole pipeline | {fastinf_total:.1f} | {peer_total:.1f} | "
        f"{peer_total / fastinf_total:.1f} |",
        "",
        f"kronfluence pairwise scoring: {how}.",
        f"Agreement over {compared} images × {args.queries} queries: Spearman per query "
        f"mean {statistics.mean(spearman):.4f}, median {statistics.median(spearman):.4f}, "
        f"min {min(spearman):.4f}; median kronfluence/fastinf score ratio {scale:.4f}.",
    ]
    add(
        "spearman_per_query_mean",
        statistics.mean(spearman),
        load,
        q=args.queries,
        kk=k,
        kq=k_q,
        n=compared,
        note=f"agreement, not seconds: min {min(spearman):.4f}; median score ratio {scale:.4f}",
    )
    print("\n".join(lines))
    (RESULTS_DIR / f"e2e_kronfluence_{ctx.device_tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--train-draws", type=int, default=32)
    parser.add_argument("--query-draws", type=int, default=64)
    parser.add_argument(
        "--query-batch",
        type=int,
        default=256,
        help="kronfluence query batch; batches are accumulated so all queries meet the train "
        "set in one pass",
    )
    parser.add_argument(
        "--fractions",
        type=int,
        nargs=2,
        default=(32, 128),
        help="train images of the two timed fractions that predict the full scoring time",
    )
    parser.add_argument("--max-full-minutes", type=float, default=20.0)
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--wait", type=float, default=600.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("FASTINF_PROGRESS", "0")
    # kronfluence 1.0.1 builds a deprecated torch.cuda.amp.GradScaler on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
