"""How long the command line takes to answer when it has nothing to compute.

Times, in fresh interpreters and alternated run by run (so machine load hits all alike):
`fastinf --help`, an argument error (`fastinf topk` with a curvature folder that does not
exist), and, for reference, `import torch` alone — what every command paid before the CLI
imported its heavy modules lazily. Target on the 2-core development CPU, idle: <= 1 s.

    .venv/bin/python bench/cli_startup.py [--repeats 7]

Rows are appended to `results/cli_startup.csv`; `results/cli_startup.md` holds the last run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from index_common import RESULTS_DIR, append_rows, environment, write_summary

CASES = {
    "fastinf --help": ["-m", "fastinf", "--help"],
    "fastinf topk (missing curvature)": [
        "-m",
        "fastinf",
        "topk",
        "--curvature",
        "no_such_folder",
        "--generate",
        "2",
    ],
    "import torch (reference)": ["-c", "import torch"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    env = environment()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, command in CASES.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, *command], capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    rows = [
        {
            **env,
            "what": name,
            "seconds_median": round(statistics.median(values), 3),
            "seconds_min": round(min(values), 3),
            "repeats": args.repeats,
        }
        for name, values in times.items()
    ]
    append_rows(RESULTS_DIR / "cli_startup.csv", rows)
    write_summary(
        "cli_startup",
        "Command-line start-up",
        f"Fresh interpreter per run, {args.repeats} repeats alternated; machine load before "
        f"the run {env['load_before']}. `import torch` is the cost every command paid before "
        "the heavy imports became lazy.",
        rows,
        ["what", "seconds_median", "seconds_min", "repeats", "load_before", "git_commit"],
    )
    for row in rows:
        print(f"{row['what']:<36} {row['seconds_median']:.3f} s (median)")


if __name__ == "__main__":
    main()
