"""Recall@10 of every index compression against exact EK-FAC scores, vs bytes per example.

Run from the repository root (not collected by pytest; ~15 min on an idle 2-core CPU, 28
under load):

    .venv/bin/python bench/index_recall.py
    .venv/bin/python bench/index_recall.py --plot-only   # redraw from the saved rows

On the embedded digits DDPM (1,797 training images, EK-FAC of `default_engine()`, K = 32
train draws, K_q = 64 query draws) and 32 generated queries (`sample_ddpm`, seed 1234, 50
steps), at two dampings (the default absolute 1e-8 and relative 0.1), one pass over the
training set projects every train gradient into the eigenbasis once and feeds it to:

- the exact whitened vectors, whose inner products with the whitened queries are the exact
  EK-FAC scores (checked against `engine.score` on a subset before anything is reported);
- every compression of `fastinf.index` (countsketch, gaussian, kronecker, truncate by
  Λ/(Λ+λ) or by calibration energy, hybrid) at 256 … 32,768 dimensions, each stored as
  fp32, fp16, int8 and int4 exactly as the index stores them.

For each (damping, compression, dim, storage) it reports recall@10 of the proponents and
of the opponents (mean and worst query), and recall after an exact re-rank of the top
15/20/50 candidates (the share of the exact top-10 among the index's top-C). Rows go to
`bench/results/index_recall_<device>.csv`, the summary to `index_recall_<device>.md` and
the curves to `index_recall_<device>.png`.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from index_common import RESULTS_DIR, append_rows, environment, markdown_table, recall_at_k

from fastinf.config import ScoreConfig
from fastinf.engine import default_engine
from fastinf.index.compress import CoordinateLayout, damped_ratio, make_compressor
from fastinf.index.config import IndexConfig
from fastinf.index.encode import Quantizer, VectorEncoder
from fastinf.sampling import sample_ddpm

# The engine's default damping first (the check against `engine.score` uses it), then the
# paper's absolute 1e-8 and a relative 0.1, without repeats.
DAMPINGS = tuple(
    dict.fromkeys(
        ((ScoreConfig.damping_mode, ScoreConfig.damping), ("absolute", 1e-8), ("relative", 0.1))
    )
)
DIMS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TRUNCATE_DIMS = DIMS[:-1]  # truncate/hybrid trail countsketch at every size below
GAUSSIAN_DIMS = (256, 512, 1024, 2048)  # dense sketches beyond cost minutes per block
STORAGES = ("fp32", "fp16", "int8", "int4")
RERANK = (15, 20, 50)
TOP_K = 10
BUDGET = 16384  # bytes per example (the target)
BLOCK = 64
CALIBRATION = 128
CHECK_QUERIES, CHECK_EXAMPLES = 4, 48
CHECK_TOLERANCE = 1e-3  # float32 gradients contracted in another order


def variants(layout, curvature, damping, energy):
    """(label, IndexConfig, ranking) of every compression measured."""
    ratio = damped_ratio(curvature, damping[1], damping[0])
    out = []
    for dim in DIMS:
        out.append(("countsketch", IndexConfig(compression="countsketch", dim=dim), ratio))
        out.append(("kronecker", IndexConfig(compression="kronecker", dim=dim), ratio))
        if dim in GAUSSIAN_DIMS:
            out.append(("gaussian", IndexConfig(compression="gaussian", dim=dim), ratio))
        if dim not in TRUNCATE_DIMS:
            continue
        for rank_by, ranking, name in (
            ("damped_ratio", ratio, "Λ/(Λ+λ)"),
            ("energy", energy, "energy"),
        ):
            for compression in ("truncate", "hybrid"):
                config = IndexConfig(compression=compression, dim=dim, rank_by=rank_by)
                out.append((f"{compression} ({name})", config, ranking))
    return [
        (label, config, make_compressor(layout, config, ranking)) for label, config, ranking in out
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--examples", type=int, default=0, help="first N training images (0: all)")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the plot from the latest saved rows"
    )
    args = parser.parse_args()
    if args.plot_only:
        rows = latest_rows()
        plot(rows, rows[0])
        return
    env = environment()
    engine = default_engine()
    curvature = engine.curvature
    layout = CoordinateLayout(curvature)
    total = args.examples or len(engine.train_set)
    positions = list(range(total))
    start = time.perf_counter()
    queries = sample_ddpm(
        engine.model, engine.schedule, args.queries, seed=1234, num_inference_steps=50
    )
    query_grads = engine.query_gradients(queries)
    exact_config = IndexConfig(compression="exact")

    def exact_encoder(damping):
        return VectorEncoder(
            curvature, damping[1], damping[0], make_compressor(layout, exact_config, None)
        )

    exact = {d: exact_encoder(d) for d in DAMPINGS}
    # Calibration energies: mean squared whitened coordinate over the first examples.
    energy = {d: torch.zeros(layout.size, dtype=torch.float64) for d in DAMPINGS}
    for begin in range(0, CALIBRATION, BLOCK):
        coords = exact[DAMPINGS[0]].rotate(engine.train_gradients(positions[begin : begin + BLOCK]))
        for d in DAMPINGS:
            energy[d] += exact[d].compress(coords).double().square().sum(0) / CALIBRATION
    runs = {}
    for d in DAMPINGS:
        encoders = [
            (label, config, VectorEncoder(curvature, d[1], d[0], compressor))
            for label, config, compressor in variants(layout, curvature, d, layout.split(energy[d]))
        ]
        query_coords = exact[d].rotate({n: (w.double(), b) for n, (w, b) in query_grads.items()})
        runs[d] = {
            "query_exact": exact[d].compress(query_coords).float(),
            "encoders": encoders,
            "query": [enc.compress(query_coords).float() for _, _, enc in encoders],
            "train": [[] for _ in encoders],
            "exact": [],
        }
    print(f"setup {time.perf_counter() - start:.0f}s", flush=True)
    for begin in range(0, total, BLOCK):
        coords = exact[DAMPINGS[0]].rotate(engine.train_gradients(positions[begin : begin + BLOCK]))
        for d in DAMPINGS:
            run = runs[d]
            whitened = exact[d].compress(coords)
            run["exact"].append(run["query_exact"].double() @ whitened.double().T)
            for i, (_, _, encoder) in enumerate(run["encoders"]):
                run["train"][i].append(encoder.compress(coords).float())
        print(f"{begin + BLOCK}/{total} {time.perf_counter() - start:.0f}s", flush=True)

    check = engine.score(
        queries[:CHECK_QUERIES], k=1, indices=positions[:CHECK_EXAMPLES], return_scores=True
    ).scores
    mine = torch.cat(runs[DAMPINGS[0]]["exact"], 1)[:CHECK_QUERIES, :CHECK_EXAMPLES]
    error = float((mine - check).abs().max() / check.abs().max())
    print(f"exact scores vs engine.score: max relative error {error:.2e}")
    if error > CHECK_TOLERANCE:
        raise SystemExit("the exact index scores do not match engine.score; nothing reported")

    rows = []
    for d in DAMPINGS:
        run = runs[d]
        exact_scores = torch.cat(run["exact"], 1)
        for i, (label, _, encoder) in enumerate(run["encoders"]):
            train = torch.cat(run["train"][i])
            for storage in STORAGES:
                quantizer = Quantizer.calibrate(IndexConfig(storage=storage), train[:CALIBRATION])
                stored = torch.from_numpy(quantizer.values(quantizer.store(train)))
                approx = (
                    torch.from_numpy(quantizer.query(run["query"][i])).double() @ stored.double().T
                )
                row = {
                    **env,
                    "damping_mode": d[0],
                    "damping": d[1],
                    "compression": label,
                    "dim": encoder.dim,
                    "storage": storage,
                    "bytes_per_example": IndexConfig(storage=storage).bytes_per_example(
                        encoder.dim
                    ),
                    "N": total,
                    "Q": args.queries,
                }
                for candidates in (TOP_K, *RERANK):
                    recall = recall_at_k(approx, exact_scores, TOP_K, candidates)
                    suffix = "" if candidates == TOP_K else f"_rerank{candidates}"
                    for name, (mean, worst) in recall.items():
                        row[f"recall_{name}{suffix}"] = round(mean, 4)
                        if candidates == TOP_K:
                            row[f"recall_{name}_min"] = round(worst, 4)
                rows.append(row)
    append_rows(RESULTS_DIR / f"index_recall_{env['device']}.csv", rows)
    write_summary(rows, env, error, time.perf_counter() - start)
    plot(rows, env)


def _number(value):
    try:
        return float(value) if "." in str(value) or "e" in str(value) else int(value)
    except ValueError:
        return value


def latest_rows() -> list[dict]:
    """The rows of the latest run saved in the CSV (for re-plotting without re-running)."""
    import csv

    with open(RESULTS_DIR / "index_recall_cpu.csv") as handle:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    last = rows[-1]["run"]
    return [row for row in rows if row["run"] == last]


def _damping(row) -> tuple[str, float]:
    return (row["damping_mode"], row["damping"])


def _best_by_compression(rows, damping):
    """Per compression, its row of highest min(recall) within 16 KB."""
    best = {}
    for row in rows:
        if _damping(row) != damping or row["bytes_per_example"] > BUDGET:
            continue
        score = min(row["recall_proponents"], row["recall_opponents"])
        if score > best.get(row["compression"], (-1.0, None))[0]:
            best[row["compression"]] = (score, row)
    return [row for _, row in sorted(best.values(), key=lambda pair: -pair[0])]


def write_summary(rows, env, error, seconds) -> None:
    columns = ["compression", "dim", "storage", "bytes_per_example", "recall_proponents"]
    columns += ["recall_opponents", "recall_proponents_min", "recall_opponents_min"]
    columns += ["recall_proponents_rerank15", "recall_opponents_rerank15"]
    columns += ["recall_proponents_rerank20", "recall_opponents_rerank20"]
    columns += ["recall_proponents_rerank50", "recall_opponents_rerank50"]
    text = [
        "# Index recall@10 vs bytes per example (digits, 1,797 images, 32 generated queries)",
        "",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {env['threads']} "
        f"threads, {seconds:.0f}s. Exact scores from the index's exact whitened vectors match "
        f"`engine.score` to {error:.1e} (relative). Command: "
        "`.venv/bin/python bench/index_recall.py` (all rows: `index_recall_cpu.csv`; plot: "
        "`index_recall_cpu.png`). `rerankC`: recall after an exact re-rank of the index's "
        "top-C candidates per sign (the share of the exact top-10 among them).",
    ]
    for mode, value in _dampings(rows):
        text += [
            "",
            f"## Damping {mode} {value:g}: best storage and size of each compression, ≤ 16 KB",
            "",
            markdown_table(_best_by_compression(rows, (mode, value)), columns),
            "",
            f"## Damping {mode} {value:g}: countsketch, int4, by size",
            "",
            markdown_table(
                [
                    r
                    for r in rows
                    if _damping(r) == (mode, value)
                    and r["compression"] == "countsketch"
                    and r["storage"] == "int4"
                ],
                columns,
            ),
        ]
    path = RESULTS_DIR / f"index_recall_{env['device']}.md"
    path.write_text("\n".join(text) + "\n")


def _dampings(rows) -> list[tuple[str, float]]:
    return list(dict.fromkeys(_damping(r) for r in rows))


def _curve(ax, rows, damping, select, key, **style) -> None:
    points = sorted(
        (r["bytes_per_example"], r[key]) for r in rows if _damping(r) == damping and select(r)
    )
    if points:
        ax.plot(*zip(*points, strict=True), **style)


def plot(rows, env) -> None:
    dampings = _dampings(rows)
    figure, axes = plt.subplots(
        2, len(dampings), figsize=(6 * len(dampings), 9), sharex=True, sharey=True
    )
    labels = sorted({r["compression"] for r in rows})
    for col, (mode, value) in enumerate(dampings):
        for row_i, sign in enumerate(("proponents", "opponents")):
            ax = axes[row_i][col]

            for j, label in enumerate(labels):
                _curve(
                    ax,
                    rows,
                    (mode, value),
                    lambda r, label=label: r["compression"] == label and r["storage"] == "int4",
                    f"recall_{sign}",
                    marker="o",
                    color=f"C{j}",
                    label=f"{label}, int4",
                )
            for storage, marker in (("fp32", "s"), ("fp16", "D"), ("int8", "^")):
                _curve(
                    ax,
                    rows,
                    (mode, value),
                    lambda r, storage=storage: (
                        r["compression"] == "countsketch" and r["storage"] == storage
                    ),
                    f"recall_{sign}",
                    marker=marker,
                    color="grey",
                    linestyle=":",
                    markersize=4,
                    label=f"countsketch, {storage}",
                )
            _curve(
                ax,
                rows,
                (mode, value),
                lambda r: r["compression"] == "countsketch" and r["storage"] == "int4",
                f"recall_{sign}_rerank20",
                marker="*",
                color="black",
                linestyle="--",
                label="countsketch, int4, + exact re-rank of top-20",
            )
            ax.axvline(BUDGET, color="grey", linewidth=0.8)
            ax.axhline(0.95, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{sign}, damping {mode} {value:g}")
            ax.set_xlabel("bytes per training example")
            ax.set_ylabel("recall@10 vs exact EK-FAC")
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(RESULTS_DIR / f"index_recall_{env['device']}.png", dpi=110)


if __name__ == "__main__":
    main()
