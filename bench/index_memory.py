"""Peak memory of an index build at three training-set sizes: it must not grow with N.

Run from the repository root (not collected by pytest; ~5 min on an idle 2-core CPU):

    .venv/bin/python bench/index_memory.py

Each size is built in a fresh subprocess (the default `IndexConfig` but 256-example shards,
so that every size spans several shards; the digits DDPM and EK-FAC of `default_engine()`;
the first N digits via `indices=`, cycling through the 1,797 digits again beyond them),
which reports its peak resident memory (VmHWM of /proc/self/status) before the build
(model, data and curvature loaded) and after it. The build streams blocks of
`ScoreConfig.block_size` examples into fixed-size shards, so the growth during the build
should be the same at every size; the stored index itself (N × bytes per example) is on
disk, memory-mapped when loaded. Rows go to `bench/results/index_memory_<device>.csv` and
the summary to `index_memory_<device>.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from index_common import RESULTS_DIR, append_rows, environment, write_summary

SIZES = (512, 1536, 4608)
SHARD_SIZE = 256  # both sizes span several shards: the shard buffer is the same


def _peak_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(size: int, directory: str) -> None:
    from fastinf.engine import default_engine
    from fastinf.index import IndexConfig

    engine = default_engine()
    before = _peak_mib()
    start = time.perf_counter()
    config = IndexConfig(shard_size=SHARD_SIZE)
    indices = [i % len(engine.train_set) for i in range(size)]
    engine.build_index(directory, config, indices=indices, load=False)
    seconds = time.perf_counter() - start
    after_build = _peak_mib()
    index = engine.load_index(directory)
    print(
        json.dumps(
            {
                "N": size,
                "peak_before_mib": round(before, 1),
                "peak_after_build_mib": round(after_build, 1),
                "peak_after_load_mib": round(_peak_mib(), 1),
                "build_seconds": round(seconds, 1),
                "bytes_per_example": index.bytes_per_example,
                "dim": index.dim,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir)
        return
    env = environment()
    rows = []
    for size in SIZES:
        with tempfile.TemporaryDirectory() as directory:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(size), "--dir", directory],
                capture_output=True,
                text=True,
                check=True,
            )
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        before = measured["peak_before_mib"]
        measured["build_growth_mib"] = round(measured["peak_after_build_mib"] - before, 1)
        rows.append({**env, **measured})
        print(measured, flush=True)
    append_rows(RESULTS_DIR / f"index_memory_{env['device']}.csv", rows)
    columns = ["N", "dim", "bytes_per_example", "build_seconds"]
    columns += ["peak_before_mib", "peak_after_build_mib", "build_growth_mib"]
    columns += ["peak_after_load_mib"]
    write_summary(
        f"index_memory_{env['device']}",
        "Index build peak memory at three training-set sizes (digits)",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, load before "
        f"{env['load_before']}. Command: `.venv/bin/python bench/index_memory.py`. Peak RSS "
        "(VmHWM) of a fresh process before the build (model, data, curvature loaded), after "
        "`build_index(..., load=False)`, and after `load_index` (which assembles the in-memory "
        "search structure, N × bytes per example).",
        rows,
        columns,
    )


if __name__ == "__main__":
    main()
