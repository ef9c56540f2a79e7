"""Streaming training images from tar shards: images/s with 0, 1, 2 DataLoader workers vs the
same pixels held in memory, and resident memory as the number of images grows.

Run from the repository root (not collected by pytest):

    .venv/bin/python bench/data_streaming.py            # 100,000 images, 3 rounds
    .venv/bin/python bench/data_streaming.py --quick    # 20,000 images, 1 round

The data: `deformed_digits(N)` (bench/deformed_digits.py), upsampled bilinearly to 32 × 32
and rounded to 8-bit grey levels, written as PNG members (`KEY.png` + `KEY.cls`) of tar
shards of 1,000 examples in a temporary folder, which is deleted at the end. Every
measurement runs in a fresh process that builds the dataset and streams it once with
`fastinf.gradients.example_blocks` (blocks of 256, the DataLoader workers started by each
pass, as the engine does):

- **stream, W workers**: `TarShardDataset` over the first N/1,000 shards (the shard index
  read from fastinf's cache, written by a first scan timed as `index scan`);
- **memory**: `ImageTensorDataset` of the same N images, loaded from a .npy file.

Before any timing, the parent process checks that the streamed blocks (2 workers) hold
exactly the in-memory pixels and labels of all N images (tests/test_shards.py checks that
0 and 2 workers give the same blocks); a run that differs writes no rows. Sets of N/10 and
N/3 images run once (for memory), N `--repeats` times. Reported: median and minimum seconds
over the rounds, images/s of the median, the process's peak resident memory (VmHWM) and the
largest worker's (RUSAGE_CHILDREN), each with the dataset built and streamed. Also timed
once in the parent: writing the shards, the index scan (cold, then cached), the dataset's
own `fingerprint` ("full": every stored byte; "sample": 64 images) and the engine's generic
`fastinf.artifacts.dataset_fingerprint`, which decodes every item for "full".

Rows go to `bench/results/data_streaming.csv`; `data_streaming.md` shows the latest run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from deformed_digits import deformed_digits
from index_common import RESULTS_DIR, append_rows, environment, write_summary
from PIL import Image
from torch.nn import functional

from fastinf.artifacts import dataset_fingerprint
from fastinf.data import ImageTensorDataset
from fastinf.gradients import example_blocks
from fastinf.shards import TarShardDataset

PER_SHARD = 1000
BLOCK = 256
SIZE = 32
COLUMNS = ["method", "workers", "images", "seconds_median", "seconds_min", "images_per_s"]
COLUMNS += ["peak_rss_mb", "worker_peak_rss_mb", "repeats"]


def make_pixels(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [count, SIZE, SIZE] grey levels, int64 [count] labels)."""
    digits = deformed_digits(count)
    images = functional.interpolate(digits.images, size=(SIZE, SIZE), mode="bilinear")
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return pixels, digits.labels.numpy()


def write_shards(folder: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    for number, start in enumerate(range(0, len(pixels), PER_SHARD)):
        with tarfile.open(folder / f"shard-{number:06d}.tar", "w") as tar:
            for n in range(start, min(start + PER_SHARD, len(pixels))):
                buffer = io.BytesIO()
                Image.fromarray(pixels[n]).save(buffer, format="PNG")
                for name, data in (
                    (f"{n:08d}.png", buffer.getvalue()),
                    (f"{n:08d}.cls", b"%d" % labels[n]),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def open_streamed(work: Path, count: int) -> TarShardDataset:
    shards = sorted((work / "shards").glob("*.tar"))[: -(-count // PER_SHARD)]
    return TarShardDataset(shards, (1, SIZE, SIZE), index_cache=work / "cache")


def open_in_memory(work: Path, count: int) -> ImageTensorDataset:
    pixels = torch.from_numpy(np.load(work / "pixels.npy", mmap_mode="r")[:count].copy())
    labels = torch.from_numpy(np.load(work / "labels.npy")[:count])
    return ImageTensorDataset(pixels.unsqueeze(1).float() / 127.5 - 1, labels)


def child(method: str, count: int, workers: int, work: Path) -> None:
    """One measurement in this fresh process; prints its JSON row."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset = open_streamed(work, count) if method == "stream" else open_in_memory(work, count)
    built = time.perf_counter() - start
    start = time.perf_counter()
    seen = sum(block.ids.numel() for block in example_blocks(dataset, BLOCK, None, workers))
    seconds = time.perf_counter() - start
    assert seen == count == len(dataset), (seen, count, len(dataset))
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row = {"seconds": seconds, "build_s": built, "peak_rss_mb": peak_rss_mb()}
    print(json.dumps({**row, "worker_peak_rss_mb": workers_rss if workers else 0.0}))


def measure(method: str, count: int, workers: int, work: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--child", method, str(count), str(workers), str(work)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = statistics.median(run["seconds"] for run in runs)
    row = {
        "method": method,
        "workers": workers,
        "images": count,
        "seconds_median": round(median, 3),
        "seconds_min": round(min(run["seconds"] for run in runs), 3),
        "images_per_s": round(count / median),
        "build_s_median": round(statistics.median(run["build_s"] for run in runs), 3),
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1),
        "worker_peak_rss_mb": round(max(run["worker_peak_rss_mb"] for run in runs), 1),
        "repeats": repeats,
    }
    print(row, flush=True)
    return row


def check_streamed_blocks(work: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    """The streamed blocks (2 workers) are the in-memory pixels and labels."""
    dataset = open_streamed(work, len(pixels))
    expected = torch.from_numpy(pixels).unsqueeze(1).float() / 127.5 - 1
    for block in example_blocks(dataset, BLOCK, None, 2):
        ids = block.ids
        same_labels = bool((block.cond == torch.from_numpy(labels)[ids]).all())
        if not torch.equal(block.images, expected[ids]) or not same_labels:
            raise SystemExit(f"the streamed block at example {int(ids[0])} differs")


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 images, 1 round")
    parser.add_argument("--images", type=int, default=100_000, help="largest set streamed")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per measurement")
    parser.add_argument("--tmp", default=None, help="folder for the temporary shards")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, count, workers, work = args.child
        child(method, int(count), int(workers), Path(work))
        return
    total = 20_000 if args.quick else args.images
    if total % PER_SHARD or total < PER_SHARD:
        parser.error(f"--images must be a multiple of {PER_SHARD} (whole shards)")
    repeats = 1 if args.quick else args.repeats
    env = environment()
    env["command"] = "bench/data_streaming.py" + (" --quick" if args.quick else "")
    work = Path(tempfile.mkdtemp(prefix="fastinf-data-streaming-", dir=args.tmp))
    try:
        rows = run(work, total, repeats)
    finally:
        shutil.rmtree(work)  # the folder this run made, and only it
    rows = [{**env, **row} for row in rows]
    append_rows(args.out / "data_streaming.csv", rows)
    paragraph = (
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {os.cpu_count()} "
        f"CPUs, load average {env['load_before']} before the run (workers add throughput only "
        "where cores are idle). Command: `.venv/bin/python "
        f"{env['command']}`. {total:,} deformed digits upsampled to {SIZE}×{SIZE} grey PNGs in "
        f"tar shards of {PER_SHARD:,}; blocks of {BLOCK}; each measurement a fresh process, "
        "median of the rounds. `peak_rss_mb`: the streaming process's VmHWM; "
        "`worker_peak_rss_mb`: the largest DataLoader worker's. One-off timings (seconds) "
        "are rows with method `write`, `index scan`, `index cached` and `fingerprint ...`."
    )
    write_summary(
        "data_streaming",
        "Streaming training data from tar shards",
        paragraph,
        rows,
        [*COLUMNS, "build_s_median"],
    )


def run(work: Path, total: int, repeats: int) -> list[dict]:
    print(f"making {total:,} images in {work}", flush=True)
    pixels, labels = make_pixels(total)
    np.save(work / "pixels.npy", pixels)
    np.save(work / "labels.npy", labels)
    (work / "shards").mkdir()
    seconds, _ = timed(lambda: write_shards(work / "shards", pixels, labels))
    once = [{"method": "write", "images": total, "seconds_median": round(seconds, 3)}]
    seconds, dataset = timed(lambda: open_streamed(work, total))
    once.append({"method": "index scan", "images": total, "seconds_median": round(seconds, 3)})
    seconds, dataset = timed(lambda: open_streamed(work, total))
    once.append({"method": "index cached", "images": total, "seconds_median": round(seconds, 3)})
    check_streamed_blocks(work, pixels, labels)
    fingerprints = {
        "fingerprint own full": lambda: dataset.fingerprint("full"),
        "fingerprint own sample": lambda: dataset.fingerprint("sample"),
        "fingerprint generic full (decodes)": lambda: dataset_fingerprint(dataset, "full"),
        "fingerprint generic sample": lambda: dataset_fingerprint(dataset, "sample"),
    }
    for name, function in fingerprints.items():
        seconds, _ = timed(function)
        once.append({"method": name, "images": total, "seconds_median": round(seconds, 3)})
    print(once, flush=True)
    rows = []
    # Whole shards only: the streamed set of N images is the first N / PER_SHARD shards.
    sizes = sorted({max(PER_SHARD, total // part // PER_SHARD * PER_SHARD) for part in (10, 3, 1)})
    for count in sizes:  # the smaller sets (for memory) once, the largest `repeats` times
        rounds = repeats if count == total else 1
        for workers in (0, 1, 2):
            rows.append(measure("stream", count, workers, work, rounds))
        rows.append(measure("memory", count, 0, work, rounds))
    return rows + once


if __name__ == "__main__":
    main()
