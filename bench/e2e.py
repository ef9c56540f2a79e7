"""End-to-end pipeline benchmark: fastinf exact scoring against the forward+backward floor.

Run from the repository root (not collected by pytest):

    .venv/bin/python bench/e2e.py            # full run, ~13-16 min on a 2-core CPU
    .venv/bin/python bench/e2e.py --quick    # ~2-3 min
    .venv/bin/python bench/e2e.py --model text-digits   # the text-conditional default

On the embedded digits DDPM (`load_digits_model`, `default_schedule`, `load_digits_dataset`)
it times, side by side in this one process:

- floor: plain `loss.backward()` (parameters requiring grad, eval mode) over exactly the
  draws that exact scoring uses — N examples × K draws, x_t drawn with
  `fastinf.diffusion.make_draws`, in the same passes as fastinf (blocks of
  `ScoreConfig.block_size` examples, passes of `ScoreConfig.batch_size // K` examples);
- fastinf exact scoring: `engine.score(cache, k=10)` with the curvature fitted and the
  queries prepared beforehand (fit and query preparation are timed and reported apart);
- scaling of scoring in N, Q and K, each point with its own floor.

Queries are DDPM samples of the model itself (`sample_ddpm(..., seed=0,
num_inference_steps=50)`). With `--model text-digits` the model is the text-conditional
default (cross-attention to text states): the training set is the captioned digits, each
example's caption states go through the floor as through fastinf, and the queries are
sampled from, prepared with and scored under their prompts (`fastinf.lds.query_prompts`);
its files are `e2e_<device>_text*`. Every score/floor pair is timed in alternating rounds and the
median is reported. Rows are appended to `bench/results/e2e_<device>.csv` and the run's
summary is written to `bench/results/e2e_<device>.md`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.data import load_digits_dataset
from fastinf.diffusion import Purpose
from fastinf.engine import InfluenceEngine
from fastinf.gradients import DrawSpec, ExampleBlock, draw_passes, forward_draws
from fastinf.lds import query_prompts
from fastinf.models import default_schedule, load_digits_model
from fastinf.sampling import sample_ddpm
from fastinf.text_digits import load_text_digits_dataset, load_text_digits_model, load_text_encoder

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_K = 10
FLOOR_TOLERANCE = 1e-3  # float32 sums in a different order


# -- rows and environment ------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One timing: the median of `repeats` wall-clock measurements of a whole pipeline step."""

    run: str
    mode: str
    bench: str
    method: str
    N: int
    Q: int
    K: int
    K_q: int
    seconds_median: float
    seconds_min: float
    repeats: int
    ratio_to_floor: float | None
    load_before: float
    load_max: float
    threads: int
    device: str
    torch: str
    git_commit: str
    note: str = ""


def git_commit() -> str:
    """HEAD of the repository, with `+dirty` when fastinf/ has local changes."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "fastinf")
    return head + ("+dirty" if dirty else "")


def load_1m() -> float:
    return os.getloadavg()[0]


def wait_for_idle(max_load: float, wait_s: float) -> float:
    """Wait (up to `wait_s`) until the 1-minute load average is below `max_load`."""
    deadline = time.monotonic() + wait_s
    load = load_1m()
    while load > max_load and time.monotonic() < deadline:
        print(f"load average {load:.2f} > {max_load}: waiting for the machine to be idle ...")
        time.sleep(30)
        load = load_1m()
    if load > max_load:
        print(f"WARNING: starting with load average {load:.2f} > {max_load}; re-run when idle.")
    return load


def write_rows(rows: list[Row], path: Path) -> None:
    """Append rows (long format) to `path`, writing the header for a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        if new_file:
            writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


class Context:
    """What every row of a run shares: run id, mode, device, versions, load before the run."""

    def __init__(self, mode: str, device: torch.device, load_before: float):
        self.run = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
        self.mode = mode
        self.device = device
        self.load_before = load_before
        self.commit = git_commit()

    @property
    def device_tag(self) -> str:
        if self.device.type != "cuda":
            return "cpu"
        return torch.cuda.get_device_name(self.device).replace(" ", "-")

    def row(self, bench, method, n, q, k, k_q, times, loads, floor=None, note="") -> Row:
        median = statistics.median(times)
        return Row(
            run=self.run,
            mode=self.mode,
            bench=bench,
            method=method,
            N=n,
            Q=q,
            K=k,
            K_q=k_q,
            seconds_median=median,
            seconds_min=min(times),
            repeats=len(times),
            ratio_to_floor=None if floor is None else median / floor,
            load_before=round(self.load_before, 2),
            load_max=round(max(loads), 2),
            threads=torch.get_num_threads(),
            device=self.device_tag,
            torch=torch.__version__,
            git_commit=self.commit,
            note=note,
        )


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """(`fn()`, its wall seconds, the higher 1-minute load average of just before and just
    after it; this process's own threads add about their number to it)."""
    load = load_1m()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start, max(load, load_1m())


# -- the floor -----------------------------------------------------------------------------
def floor_pass(
    model, schedule, images: torch.Tensor, num_examples: int, config: ScoreConfig, conds=None
):
    """Plain forward + `loss.backward()` over the draws `engine.score` uses, in its passes.

    Same draws (ids 0..N-1, draw ids 0..K-1, purpose TRAIN_GRADIENT, same seed), same pass
    shapes; parameter gradients are formed as in ordinary training.
    """
    device = next(model.parameters()).device
    spec = DrawSpec(Purpose.TRAIN_GRADIENT, config.train_draws, config.seed)
    for block_start in range(0, num_examples, config.block_size):
        ids = torch.arange(block_start, min(block_start + config.block_size, num_examples))
        cond = None if conds is None else conds[ids].to(device)
        block = ExampleBlock(ids, images[ids].to(device), cond)
        for _, part, part_spec in draw_passes(block, spec, config.batch_size):
            eps_pred, noise, _ = forward_draws(model, schedule, part, part_spec)
            per_draw = (eps_pred - noise).square().flatten(1).mean(1)
            model.zero_grad(set_to_none=True)
            (per_draw.sum() / config.train_draws).backward()


def floor_mismatch(engine: InfluenceEngine, images: torch.Tensor, conds=None) -> float:
    """Largest relative difference, over tracked layers, between the floor's parameter
    gradient for example 0 and fastinf's train gradient of it.

    The floor stands for the same work only if both back-propagate the same loss of the
    same draws; the benchmark refuses to report ratios when they disagree.
    """
    model = engine.model
    floor_pass(model, engine.schedule, images, 1, engine.config, conds)
    grads = engine.train_gradients([0])
    worst = 0.0
    for name, info in engine.layers.items():
        expected = info.module.weight.grad.flatten(1)
        got = grads[name][0][0].to(expected)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    model.zero_grad(set_to_none=True)
    return worst


# -- plans ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The points to time. The headline is (N, max Q, K=32); the axes share points."""

    headline: tuple[int, int, int]
    scale_n: tuple[int, ...]  # at Q = headline Q, K = headline K
    scale_q: tuple[int, ...]  # at N = base_n, K = headline K
    scale_k: tuple[int, ...]  # at N = base_n, Q = headline Q
    base_n: int
    repeats: int


def make_plan(quick: bool, num_train: int) -> Plan:
    """Full: all N against 256 queries (the issue target), ~13-16 min on 2 cores; quick: ~2-3."""
    if quick:
        return Plan((256, 64, 32), (64, 128, 256), (1, 16, 64), (4, 8, 16, 32), 64, 3)
    return Plan(
        (num_train, 256, 32), (128, 256, 512, num_train), (1, 16, 64, 256), (4, 8, 16, 32), 128, 3
    )


def plan_points(plan: Plan) -> dict[str, list[tuple[int, int, int]]]:
    _, q_max, k_max = plan.headline
    return {
        "headline": [plan.headline],
        "scale_N": [(n, q_max, k_max) for n in plan.scale_n],
        "scale_Q": [(plan.base_n, q, k_max) for q in plan.scale_q],
        "scale_K": [(plan.base_n, q_max, k) for k in plan.scale_k],
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b·x: (a, b, R²)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx > 0 else 0.0
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return intercept, slope, (1.0 - ss_res / ss_tot) if ss_tot > 0 else 1.0


# -- the run -------------------------------------------------------------------------------
def run(args) -> list[Row]:
    device = torch.device(args.device)
    load_before = wait_for_idle(args.max_load, args.wait)
    ctx = Context("quick" if args.quick else "full", device, load_before)
    wall_start = time.perf_counter()
    print(
        f"e2e: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"commit {ctx.commit}, load {load_before:.2f}"
    )

    schedule = default_schedule()
    if args.model == "text-digits":
        encoder = load_text_encoder()
        model = load_text_digits_model(device)
        dataset = load_text_digits_dataset(encoder)
        conds = dataset.states
        subject = "text-conditional digits DDPM (cross-attention)"
    else:
        model, dataset, conds = load_digits_model(device), load_digits_dataset(), None
        subject = "digits DDPM"
    plan = make_plan(args.quick, len(dataset))
    points = plan_points(plan)
    all_points = [point for axis in points.values() for point in axis]
    q_max = max(q for _, q, _ in all_points)
    base_config = ScoreConfig()
    rows: list[Row] = []

    query_cond = None if conds is None else encoder.encode(query_prompts(q_max))
    queries, seconds, _ = timed(
        lambda: sample_ddpm(
            model, schedule, q_max, seed=0, num_inference_steps=50, cond=query_cond
        ),
        device,
    )
    print(f"queries: {q_max} DDPM samples (50 steps) in {seconds:.1f}s")

    engines: dict[int, InfluenceEngine] = {}

    def engine_for(num_draws: int) -> InfluenceEngine:
        if num_draws not in engines:
            config = ScoreConfig(train_draws=num_draws)
            engine = InfluenceEngine(model, schedule, dataset, config=config)
            engine.curvature = engines[base_config.train_draws].curvature
            engines[num_draws] = engine
        return engines[num_draws]

    base = InfluenceEngine(model, schedule, dataset, config=base_config)
    engines[base_config.train_draws] = base
    fit_config = CurvatureConfig()
    fit_n = plan.headline[0]
    fit_indices = None if fit_n == len(dataset) else list(range(fit_n))
    _, seconds, load = timed(lambda: base.fit(fit_config, indices=fit_indices), device)
    note = f"EK-FAC, {fit_config.factor_draws}+{fit_config.eigval_draws} draws/example"
    rows.append(ctx.row("fit", "fastinf_fit", fit_n, 0, 0, 0, [seconds], [load], note=note))
    print(f"fit: N={fit_n} in {seconds:.1f}s")

    full_cache, seconds, load = timed(lambda: base.prepare_queries(queries, query_cond), device)
    k_q = base_config.query_draws
    rows.append(
        ctx.row("prepare_queries", "fastinf_prepare_queries", 0, q_max, 0, k_q, [seconds], [load])
    )
    print(f"prepare_queries: Q={q_max}, K_q={k_q} in {seconds:.1f}s")
    caches = {q: full_cache.select(slice(0, q)) for _, q, _ in all_points}

    mismatch = floor_mismatch(base, dataset.images, conds)
    if mismatch > FLOOR_TOLERANCE:
        raise SystemExit(
            f"the floor's gradient differs from fastinf's by {mismatch:.2e} (relative); the "
            "floor does not do the same work, so no ratio is reported."
        )
    print(f"floor check: parameter gradients match fastinf's to {mismatch:.1e} (relative)")

    # Warm-up (allocator, first-call costs), untimed.
    floor_pass(model, schedule, dataset.images, 16, base_config, conds)
    model.zero_grad(set_to_none=True)
    base.score(caches[q_max], k=TOP_K, indices=list(range(16)))

    def score_once(n: int, q: int, k: int) -> None:
        indices = None if n == len(dataset) else list(range(n))
        engine_for(k).score(caches[q], k=min(TOP_K, n), indices=indices)

    def floor_once(n: int, k: int) -> None:
        floor_pass(model, schedule, dataset.images, n, ScoreConfig(train_draws=k), conds)
        model.zero_grad(set_to_none=True)

    unique_scores = sorted(set(all_points))
    unique_floors = sorted({(n, k) for n, _, k in unique_scores})
    score_times = {p: ([], []) for p in unique_scores}
    floor_times = {p: ([], []) for p in unique_floors}

    # Alternating rounds: every point's score and its floor once per round, so slow drift
    # of the machine affects both sides alike.
    for round_index in range(plan.repeats):
        for n, k in unique_floors:
            for q in sorted({q for (pn, q, pk) in unique_scores if (pn, pk) == (n, k)}):
                _, seconds, load = timed(lambda n=n, q=q, k=k: score_once(n, q, k), device)
                score_times[(n, q, k)][0].append(seconds)
                score_times[(n, q, k)][1].append(load)
                print(f"round {round_index}: score N={n} Q={q} K={k}: {seconds:.2f}s")
            _, seconds, load = timed(lambda n=n, k=k: floor_once(n, k), device)
            floor_times[(n, k)][0].append(seconds)
            floor_times[(n, k)][1].append(load)
            print(f"round {round_index}: floor N={n} K={k}: {seconds:.2f}s")

    for bench, axis in points.items():
        for n, q, k in axis:
            floor_t, floor_l = floor_times[(n, k)]
            score_t, score_l = score_times[(n, q, k)]
            floor_median = statistics.median(floor_t)
            rows.append(ctx.row(bench, "floor_fwd_bwd", n, 0, k, 0, floor_t, floor_l))
            rows.append(
                ctx.row(bench, "fastinf_score", n, q, k, k_q, score_t, score_l, floor_median)
            )

    total = time.perf_counter() - wall_start
    params = sum(param.numel() for param in model.parameters()) / 1e6
    summary = summarise(rows, plan, total, mismatch, f"{subject} ({params:.2f}M params)")
    print("\n".join(summary))
    tag = ctx.device_tag + ("_text" if args.model == "text-digits" else "")
    path = RESULTS_DIR / f"e2e_{tag}.csv"
    write_rows(rows, path)
    suffix = "_quick" if args.quick else ""
    (RESULTS_DIR / f"e2e_{tag}{suffix}.md").write_text("\n".join(summary) + "\n")
    print(f"rows appended to {path}")
    return rows


def summarise(
    rows: list[Row], plan: Plan, total_s: float, mismatch: float, subject: str
) -> list[str]:
    """The markdown summary of one run: headline, fit/prepare, scaling tables and fits."""

    def pick(bench: str, method: str) -> list[Row]:
        return [r for r in rows if r.bench == bench and r.method == method]

    first = rows[0]
    lines = [
        f"# fastinf end-to-end benchmark ({first.mode} run {first.run})",
        "",
        f"{subject}, device {first.device}, torch {first.torch}, "
        f"{first.threads} threads, commit {first.git_commit}, load average before the run "
        f"{first.load_before}; total wall time {total_s / 60:.1f} min. Medians of repeats; "
        "ratio = fastinf scoring / floor (plain forward+backward over the same draws; its "
        f"parameter gradient matches fastinf's train gradient to {mismatch:.1e} relative).",
        "",
    ]
    fit = pick("fit", "fastinf_fit")[0]
    prep = pick("prepare_queries", "fastinf_prepare_queries")[0]
    lines += [
        f"- fit (once, N={fit.N}, {fit.note}): {fit.seconds_median:.1f} s",
        f"- prepare_queries (once, Q={prep.Q}, K_q={prep.K_q}): {prep.seconds_median:.1f} s "
        f"({prep.seconds_median / prep.Q:.2f} s/query)",
        "",
        "| bench | N | Q | K | floor s | fastinf score s | ratio | repeats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bench in ("headline", "scale_N", "scale_Q", "scale_K"):
        floors = pick(bench, "floor_fwd_bwd")
        for floor, score in zip(floors, pick(bench, "fastinf_score"), strict=True):
            lines.append(
                f"| {bench} | {score.N} | {score.Q} | {score.K} | {floor.seconds_median:.2f} | "
                f"{score.seconds_median:.2f} | {score.ratio_to_floor:.2f} | {score.repeats} |"
            )
    head = pick("headline", "fastinf_score")[0]
    verdict = "meets" if head.ratio_to_floor <= 1.5 else "MISSES"
    lines += [
        "",
        f"Headline: N={head.N}, Q={head.Q}, K={head.K}: scoring {head.seconds_median:.1f} s = "
        f"{head.ratio_to_floor:.2f} × floor ({verdict} the ≤ 1.5 × floor target).",
    ]
    draws_rows = [
        r for r in rows if r.bench in ("scale_N", "scale_K") and r.method == "fastinf_score"
    ]
    floor_rows = [
        r for r in rows if r.bench in ("scale_N", "scale_K") and r.method == "floor_fwd_bwd"
    ]
    for label, chosen in (("fastinf score", draws_rows), ("floor", floor_rows)):
        a, b, r2 = linear_fit(
            [float(r.N * r.K) for r in chosen], [r.seconds_median for r in chosen]
        )
        lines.append(
            f"- {label}: seconds ≈ {a:.2f} + {b * 1e3:.3f} ms × (N·K)  (R² = {r2:.4f}, "
            f"scale_N and scale_K points, Q={plan.headline[1]})"
        )
    by_q = sorted(pick("scale_Q", "fastinf_score"), key=lambda r: r.Q)
    lines.append(
        f"- flatness in Q (N={plan.base_n}, K={plan.headline[2]}): score(Q={by_q[-1].Q}) / "
        f"score(Q={by_q[0].Q}) = {by_q[-1].seconds_median / by_q[0].seconds_median:.2f}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2-3 minute version")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--model",
        choices=["digits", "text-digits"],
        default="digits",
        help="the embedded default to time: the digits DDPM or the text-conditional one",
    )
    parser.add_argument(
        "--max-load", type=float, default=1.5, help="wait until the 1-min load is below this"
    )
    parser.add_argument("--wait", type=float, default=600.0, help="longest wait for idle, s")
    args = parser.parse_args(argv)
    os.environ.setdefault("FASTINF_PROGRESS", "0")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
