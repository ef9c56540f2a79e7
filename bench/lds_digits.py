"""The digits LDS benchmark: EK-FAC and the baselines, damping and draw curves, plots.

    .venv/bin/python bench/lds_digits.py                # the full benchmark (cached)
    .venv/bin/python bench/lds_digits.py --quick        # 12 subsets, a few methods

Retrained models, fits and scores are cached in --run-dir (default bench/lds_run), so a
rerun takes minutes and an interrupted run resumes. Writes bench/results/lds_digits.csv
(one row per method and setting), lds_digits.md (tables), lds_counterfactual.csv and
the plots lds_methods.png, lds_damping.png and lds_draws.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import resource
import time
from pathlib import Path

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.lds import LDSConfig, LDSRun, Method

RESULTS = Path(__file__).resolve().parent / "results"
RELATIVE_DAMPINGS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TRAK_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
TRAIN_DRAWS = (4, 8, 16, 32, 64)
QUERY_DRAWS = (8, 16, 32, 64, 128)
PROJECTION_DIM = 4096
# Methods are compared at equal draws (the sweeps); the draw curves vary them separately.
SWEEP_DRAWS = {"train_draws": 32, "query_draws": 64}


def _default() -> Method:
    defaults = ScoreConfig()
    return Method(
        "EK-FAC (default)",
        CurvatureConfig(),
        damping=defaults.damping,
        damping_mode=defaults.damping_mode,
        train_draws=defaults.train_draws,
        query_draws=defaults.query_draws,
    )


def _sweep(name: str, curvature: CurvatureConfig, dampings, **fields) -> list[Method]:
    fields = SWEEP_DRAWS | fields
    methods = [
        Method(name, curvature, damping=value, damping_mode="relative", **fields)
        for value in dampings
    ]
    if curvature.strategy in ("ekfac", "kfac"):
        methods.insert(0, Method(name, curvature, damping=1e-8, damping_mode="absolute", **fields))
    return methods


def method_grid(quick: bool) -> dict[str, list[Method]]:
    """Families of methods; each family is a damping sweep of one setting."""
    ekfac = CurvatureConfig()
    dampings = (1e-3, 1e-1) if quick else RELATIVE_DAMPINGS
    trak_dampings = (1e-2,) if quick else TRAK_DAMPINGS
    trak = CurvatureConfig(strategy="trak", projection_dim=PROJECTION_DIM, factor_draws=32)
    families = {
        "EK-FAC": _sweep("EK-FAC", ekfac, dampings),
        "K-FAC": _sweep("K-FAC", CurvatureConfig(strategy="kfac"), dampings),
        "gradient dot product": [
            # The damping only scales its scores by 1/(1 + λ); rankings do not change.
            Method(
                "gradient dot product",
                CurvatureConfig(strategy="identity"),
                damping=1e-8,
                damping_mode="absolute",
                **SWEEP_DRAWS,
            )
        ],
        "TRAK": _sweep("TRAK", trak, trak_dampings),
        "D-TRAK": _sweep(
            "D-TRAK",
            dataclasses.replace(trak, objective="square_norm"),
            trak_dampings,
            measurement="square_norm",
            train_objective="square_norm",
        ),
    }
    if not quick:
        families["EK-FAC reduce"] = _sweep(
            "EK-FAC reduce", CurvatureConfig(kfac_approx="reduce"), (1e-3, 1e-1)
        )
        families["EK-FAC GGN^loss"] = _sweep(
            "EK-FAC GGN^loss", CurvatureConfig(ggn="loss"), (1e-3, 1e-1)
        )
    return families


def _best(rows: list[dict]) -> dict:
    return max(rows, key=lambda row: -math.inf if math.isnan(row["lds"]) else row["lds"])


def _setting(row: dict) -> str:
    if row["strategy"] == "identity":
        return "-"
    kind = "abs" if row["damping_mode"] == "absolute" else "rel"
    return f"λ={row['damping']:g} ({kind})"


def run(args) -> None:
    config = LDSConfig(num_subsets=args.subsets, oracle_subsets=args.oracle_subsets)
    lds_run = LDSRun(args.run_dir, config, num_workers=args.workers)
    timings = {}
    started = time.perf_counter()
    lds_run.queries()
    timings["base model + queries"] = time.perf_counter() - started
    mark = time.perf_counter()
    lds_run.retrain()
    timings["retraining"] = time.perf_counter() - mark

    mark = time.perf_counter()
    families = method_grid(args.quick)
    default = _default()
    # One scoring pass per (train objective, K) for every method, then cached evaluations.
    lds_run.scores([default] + [m for methods in families.values() for m in methods])
    family_rows = {name: lds_run.evaluate(methods)[:-1] for name, methods in families.items()}
    default_row = lds_run.evaluate([default])
    default_row, oracle_row = default_row[0], default_row[1]
    best_ekfac = _best(family_rows["EK-FAC"])
    tuned = Method(
        "EK-FAC",
        CurvatureConfig(),
        damping=best_ekfac["damping"],
        damping_mode=best_ekfac["damping_mode"],
        **SWEEP_DRAWS,
    )
    draws = TRAIN_DRAWS[2:4] if args.quick else TRAIN_DRAWS
    query_draws = QUERY_DRAWS[2:4] if args.quick else QUERY_DRAWS
    k_methods = [dataclasses.replace(tuned, train_draws=k) for k in draws]
    kq_methods = [dataclasses.replace(tuned, query_draws=k) for k in query_draws]
    lds_run.scores(k_methods + kq_methods)
    k_rows = lds_run.evaluate(k_methods)[:-1]
    kq_rows = lds_run.evaluate(kq_methods)[:-1]
    timings["fits + scoring + LDS"] = time.perf_counter() - mark

    mark = time.perf_counter()
    counterfactual = lds_run.counterfactual(tuned) if not args.quick else []
    timings["retraining without top influences"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    cpu = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    timings["total CPU time (all processes)"] = sum(u.ru_utime + u.ru_stime for u in cpu)

    suffix = "_quick" if args.quick else ""
    all_rows = [default_row]
    for rows in family_rows.values():
        all_rows += rows
    all_rows += k_rows + kq_rows + [oracle_row]
    _write_csv(RESULTS / f"lds_digits{suffix}.csv", all_rows)
    if counterfactual:
        _write_csv(RESULTS / f"lds_counterfactual{suffix}.csv", counterfactual)
    _write_markdown(
        RESULTS / f"lds_digits{suffix}.md",
        config,
        default_row,
        family_rows,
        k_rows,
        kq_rows,
        oracle_row,
        counterfactual,
        timings,
        args,
    )
    _plot(suffix, default_row, family_rows, k_rows, kq_rows, oracle_row)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    print((RESULTS / f"lds_digits{suffix}.md").read_text())


def method_table(default_row: dict, family_rows: dict, oracle_row: dict | None) -> list[str]:
    """Markdown rows: untuned EK-FAC, each family at its best setting, the oracle (if any)."""
    lines = [
        "| method | setting | LDS | ± |",
        "| --- | --- | --- | --- |",
        f"| EK-FAC, engine defaults (untuned) | {_setting(default_row)} | "
        f"{default_row['lds']:.3f} | {default_row['lds_sem']:.3f} |",
    ]
    for name, rows in family_rows.items():
        best = _best(rows)
        lines.append(
            f"| {name} (tuned) | {_setting(best)} | {best['lds']:.3f} | {best['lds_sem']:.3f} |"
        )
    if oracle_row is not None:
        lines.append(
            f"| exact retraining (oracle, seed to seed) | {oracle_row['num_subsets']} subsets | "
            f"{oracle_row['lds']:.3f} | {oracle_row['lds_sem']:.3f} |"
        )
    return lines


def sweep_table(family_rows: dict) -> list[str]:
    """Markdown lines: the "Damping sweeps" section, every setting of every family."""
    lines = [
        "",
        "## Damping sweeps",
        "",
        "| method | setting | LDS | ± |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in family_rows.items():
        for row in rows:
            lines.append(f"| {name} | {_setting(row)} | {row['lds']:.3f} | {row['lds_sem']:.3f} |")
    return lines


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _write_markdown(
    path,
    config,
    default_row,
    family_rows,
    k_rows,
    kq_rows,
    oracle_row,
    counterfactual,
    timings,
    args,
):
    lines = [
        "# LDS on digits",
        "",
        f"`.venv/bin/python bench/lds_digits.py{' --quick' if args.quick else ''}` — "
        f"{config.num_train} training digits, M = {config.num_subsets} subsets at "
        f"α = {config.fraction}, {config.num_queries} generated queries, measurement "
        f"`{config.measurement}` over {config.measurement_draws} shared draws; every model "
        f"trains {config.recipe.steps} steps of batch {config.recipe.batch_size} "
        f"(`RetrainRecipe`). Oracle: {config.oracle_subsets} subsets retrained with seed "
        f"{config.oracle_seed}. LDS = mean Spearman over queries ± standard error.",
        "",
        "## Methods (each at its best damping: tuned), and EK-FAC with the defaults",
        "",
        "The sweeps compare every method at the same draws, K = 32 and K_q = 64; the engine "
        "defaults (first row) use the draws and damping these curves chose.",
        "",
        *method_table(default_row, family_rows, oracle_row),
    ]
    lines += sweep_table(family_rows)
    lines += ["", "## Draws (EK-FAC at its best damping)", "", "| K | K_q | LDS | ± |"]
    lines.append("| --- | --- | --- | --- |")
    for row in k_rows + kq_rows:
        draws = f"| {row['train_draws']} | {row['query_draws']} "
        lines.append(f"{draws}| {row['lds']:.3f} | {row['lds_sem']:.3f} |")
    if counterfactual:
        lines += [
            "",
            "## Retraining without top influences (EK-FAC at its best damping)",
            "",
            "Change of the query's loss from the base model when its top p% proponents are "
            "removed, against removing a random p% (same seed, so the data is the only "
            "difference).",
            "",
            "| p | query | Δ loss, top removed | Δ loss, random removed |",
            "| --- | --- | --- | --- |",
        ]
        for row in counterfactual:
            lines.append(
                f"| {row['percent_removed']:g}% | {row['query']} | {row['delta_top']:+.5f} | "
                f"{row['delta_random']:+.5f} |"
            )
        for percent in sorted({row["percent_removed"] for row in counterfactual}):
            chosen = [row for row in counterfactual if row["percent_removed"] == percent]
            top = sum(row["delta_top"] for row in chosen) / len(chosen)
            random = sum(row["delta_random"] for row in chosen) / len(chosen)
            lines.append(f"| {percent:g}% | **mean** | **{top:+.5f}** | **{random:+.5f}** |")
    lines += [
        "",
        "## Time of this run (2-core CPU; cached stages take seconds; CPU time / 2 is the "
        "wall time on an otherwise idle machine)",
        "",
    ]
    lines += [f"- {name}: {seconds:.0f} s" for name, seconds in timings.items()]
    path.write_text("\n".join(lines) + "\n")


def _plot(suffix, default_row, family_rows, k_rows, kq_rows, oracle_row) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["EK-FAC defaults"] + [f"{name} (tuned)" for name in family_rows]
    bests = [default_row] + [_best(rows) for rows in family_rows.values()]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.bar(
        range(len(bests)),
        [row["lds"] for row in bests],
        yerr=[row["lds_sem"] for row in bests],
        capsize=3,
        color="tab:blue",
    )
    axis.axhline(oracle_row["lds"], color="tab:red", linestyle="--", label="oracle (seed to seed)")
    axis.set_xticks(range(len(bests)), names, rotation=30, ha="right")
    axis.set_ylabel("LDS (mean Spearman ± s.e.)")
    axis.set_title("LDS on digits")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"lds_methods{suffix}.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in family_rows.items():
        relative = [row for row in rows if row["damping_mode"] == "relative"]
        if len(relative) < 2:
            continue
        axis.errorbar(
            [row["damping"] for row in relative],
            [row["lds"] for row in relative],
            yerr=[row["lds_sem"] for row in relative],
            marker="o",
            capsize=3,
            label=name,
        )
    axis.set_xscale("log")
    axis.set_xlabel("relative damping λ / mean(Λ)")
    axis.set_ylabel("LDS")
    axis.set_title("LDS vs damping")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / f"lds_damping{suffix}.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharey=True)
    for axis, rows, key, label in (
        (axes[0], k_rows, "train_draws", "K (train draws)"),
        (axes[1], kq_rows, "query_draws", "K_q (query draws)"),
    ):
        axis.errorbar(
            [row[key] for row in rows],
            [row["lds"] for row in rows],
            yerr=[row["lds_sem"] for row in rows],
            marker="o",
            capsize=3,
        )
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
    axes[0].set_ylabel("LDS (EK-FAC)")
    figure.suptitle("LDS vs draws")
    figure.tight_layout()
    figure.savefig(RESULTS / f"lds_draws{suffix}.png", dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(Path(__file__).resolve().parent / "lds_run"))
    parser.add_argument("--subsets", type=int, default=LDSConfig.num_subsets)
    parser.add_argument("--oracle-subsets", type=int, default=LDSConfig.oracle_subsets)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="12 subsets, few methods")
    args = parser.parse_args()
    if args.quick:
        args.subsets, args.oracle_subsets = 12, 6
    run(args)


if __name__ == "__main__":
    main()
