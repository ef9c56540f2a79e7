"""LDS on the text-conditional default: EK-FAC (engine defaults, untuned) against the tuned
baselines, on captioned digits with queries sampled from prompts.

    .venv/bin/python bench/lds_text.py                     # M = 50, 10 oracle replicates
    .venv/bin/python bench/lds_text.py --subsets 12 --oracle-subsets 4   # a quick look
    .venv/bin/python bench/lds_text.py --lora-rank 4 --num-train 500      # the LoRA scenario

The benchmark is `fastinf.lds.LDSRun` with `LDSConfig(model="text-digits")`: 1,000 captioned
digits, each subset model a cross-attention UNet (the default's architecture) trained by
`RetrainRecipe` on the digits it keeps, with every caption encoded by the shipped frozen text
encoder; the 32 queries are sampled from the base model with prompts (`query_prompts`), and
measured and scored under those prompts. Baselines are tuned over the damping sweeps of
bench/lds_digits.py at equal draws (K = 32, K_q = 64). Everything is cached in --run-dir, so
an interrupted run resumes. Writes bench/results/lds_text.csv and lds_text.md.

`--lora-rank r` runs the LoRA scenario instead (`LDSConfig.lora_rank`): a base pretrained on
the digits outside the training set, a rank-r LoRA of the attention projections fine-tuned
per subset, every method attributing through the LoRA weights only; it writes
lds_text_lora.csv and lds_text_lora.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from lds_digits import (
    RESULTS,
    _best,
    _default,
    _write_csv,
    method_grid,
    method_table,
    sweep_table,
)

from fastinf.lds import LDSConfig, LDSRun

BASELINES = ("gradient dot product", "TRAK", "D-TRAK")
TARGET = 1.2  # untuned EK-FAC's LDS over the best tuned baseline's


def run(args) -> dict:
    config = LDSConfig(
        model="text-digits",
        num_train=args.num_train,
        num_subsets=args.subsets,
        oracle_subsets=args.oracle_subsets,
        lora_rank=args.lora_rank,
    )
    stem = "lds_text_lora" if args.lora_rank else "lds_text"
    lds_run = LDSRun(args.run_dir, config, num_workers=args.workers)
    timings, started = {}, time.perf_counter()
    lds_run.queries()
    timings["base model + queries"] = time.perf_counter() - started
    mark = time.perf_counter()
    lds_run.retrain()
    timings["retraining"] = time.perf_counter() - mark
    mark = time.perf_counter()
    grid = method_grid(quick=False)
    families = {name: grid[name] for name in ("EK-FAC", *BASELINES)}
    default = _default()
    lds_run.scores([default] + [m for methods in families.values() for m in methods])
    family_rows = {name: lds_run.evaluate(methods)[:-1] for name, methods in families.items()}
    default_row, *oracle = lds_run.evaluate([default])  # the oracle needs >= 2 replicates
    oracle_row = oracle[0] if oracle else None
    timings["fits + scoring + LDS"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    timings["total CPU time (all processes)"] = sum(u.ru_utime + u.ru_stime for u in usage)

    best = {name: _best(family_rows[name]) for name in BASELINES}
    strongest = max(best.values(), key=lambda row: row["lds"])
    ratio = default_row["lds"] / strongest["lds"]
    rows = [default_row] + [row for rows in family_rows.values() for row in rows] + oracle
    _write_csv(RESULTS / f"{stem}.csv", rows)
    scenario = (
        f" — LoRA scenario: a base pretrained on the other {1797 - config.num_train} digits, "
        f"a rank-{config.lora_rank} LoRA (attention projections) fine-tuned per subset, every "
        "method attributing through the LoRA weights only"
        if config.lora_rank
        else ""
    )
    lines = [
        f"# LDS on the text-conditional digits default{scenario}",
        "",
        f"`.venv/bin/python bench/lds_text.py --num-train {config.num_train} --subsets "
        f"{config.num_subsets} --oracle-subsets {config.oracle_subsets} --lora-rank "
        f"{config.lora_rank}` — {config.num_train} captioned digits, M = "
        f"{config.num_subsets} subsets at α = {config.fraction}, {config.num_queries} queries "
        f"sampled from prompts, measurement `{config.measurement}` over "
        f"{config.measurement_draws} shared draws, conditioned on each query's prompt; every "
        f"model is the default's cross-attention UNet trained {config.recipe.steps} steps of "
        f"batch {config.recipe.batch_size}. LDS = mean Spearman over queries ± standard error.",
        "",
        *method_table(default_row, family_rows, oracle_row),
        "",
        f"Untuned EK-FAC / best tuned baseline ({strongest['method']}): **{ratio:.2f}×** "
        f"({'meets' if ratio >= TARGET else 'MISSES'} the ≥ {TARGET} × target).",
    ]
    lines += sweep_table(family_rows)
    lines += ["", "## Time (2-core CPU)", ""]
    lines += [f"- {key}: {value:.0f} s" for key, value in timings.items()]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"ratio": ratio, "timings": timings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="default: bench/lds_run_text (_lora for the LoRA one)")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--oracle-subsets", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    folder = "lds_run_text_lora" if args.lora_rank else "lds_run_text"
    args.run_dir = args.run_dir or str(Path(__file__).parent / folder)
    print(json.dumps(run(args)["timings"]))


if __name__ == "__main__":
    main()
