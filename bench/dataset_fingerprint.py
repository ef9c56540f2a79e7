"""Cost of the dataset fingerprint: every item hashed ("full") vs 64 items ("sample").

Run from the repository root (not collected by pytest):

    .venv/bin/python bench/dataset_fingerprint.py            # digits + two 1M streams, ~4 min
    .venv/bin/python bench/dataset_fingerprint.py --quick    # 100,000-item streams, 1 round, ~10 s

`fastinf.artifacts.dataset_fingerprint` runs once whenever an engine is built. Three ways of
going over the same dataset are timed side by side, alternating, in each round:

- **read**: `dataset[i]` for every item, nothing else: the floor of any check that looks at
  every item (a real dataset's floor is its loading and decoding);
- **full**: `dataset_fingerprint(dataset, verify="full")`: every item read and hashed;
- **sample**: `dataset_fingerprint(dataset, verify="sample")`: 64 evenly spaced items.

Datasets: the embedded digits (1,797 items of [1, 8, 8] float32 and an int64 label), and a
synthetic map-style stream of 1,000,000 items, `(latent, label)` with latent n =
pool[n mod 4096] + ⌊n / 4096⌋ (a pool of 4,096 Gaussian latents, seed 0: every item is
distinct and made on demand) and label n mod 10 as a Python int, for [1, 8, 8] latents (the
digits' size) and [4, 32, 32] (Stable Diffusion VAE latents of a 256 × 256 image). Making an
item costs one tensor addition, so "read" is nearly free and "full" − "read" is the hashing
itself. The median and minimum over the rounds are reported; a run whose full fingerprints
differ between rounds stops without writing rows.

Rows go to `bench/results/dataset_fingerprint_<device>.csv`; `dataset_fingerprint_<device>.md`
shows the latest run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from index_common import RESULTS_DIR, append_rows, environment, markdown_table
from torch.utils.data import Dataset

from fastinf.artifacts import FULL_VERIFY_LIMIT, dataset_fingerprint
from fastinf.data import load_digits_dataset

POOL = 4096
COLUMNS = ["dataset", "items", "item_shape", "method", "items_read", "seconds_median"]
COLUMNS += ["seconds_min", "us_per_item", "ratio_to_read", "repeats", "fingerprint"]


class SyntheticLatents(Dataset):
    """`num_items` deterministic `(latent [C, H, W] float32, label int)` items, made on demand."""

    def __init__(self, num_items: int, shape: tuple[int, int, int]):
        generator = torch.Generator().manual_seed(0)
        self.pool = torch.randn(POOL, *shape, generator=generator)
        self.num_items = num_items

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pool[index % POOL] + float(index // POOL), index % 10


def read_every_item(dataset: Dataset) -> str:
    for index in range(len(dataset)):
        dataset[index]
    return ""


METHODS = {
    "read": read_every_item,
    "full": lambda dataset: dataset_fingerprint(dataset, verify="full"),
    "sample": lambda dataset: dataset_fingerprint(dataset, verify="sample"),
}


def measure(name: str, dataset: Dataset, repeats: int) -> list[dict]:
    """Time every method `repeats` times, rotating their order each round."""
    seconds = {method: [] for method in METHODS}
    fingerprints = {method: set() for method in METHODS}
    names = list(METHODS)
    for round_number in range(repeats):
        shift = round_number % len(names)
        for method in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fingerprints[method].add(METHODS[method](dataset))
            seconds[method].append(time.perf_counter() - start)
            print(f"{name} {method}: {seconds[method][-1]:.2f} s", flush=True)
    for method, found in fingerprints.items():
        if len(found) != 1:
            raise SystemExit(f"{name}: {method} fingerprints differ between rounds: {found}")
    image = dataset[0][0]
    size = len(dataset)
    read = statistics.median(seconds["read"])
    rows = []
    for method in names:
        median = statistics.median(seconds[method])
        items_read = min(size, 64) if method == "sample" else size
        rows.append(
            {
                "dataset": name,
                "items": size,
                "item_shape": "x".join(map(str, image.shape)),
                "item_dtype": str(image.dtype).removeprefix("torch."),
                "method": method,
                "items_read": items_read,
                "repeats": repeats,
                "seconds_median": round(median, 4),
                "seconds_min": round(min(seconds[method]), 4),
                "us_per_item": round(1e6 * median / items_read, 2),
                "ratio_to_read": round(median / read, 3),
                "fingerprint": fingerprints[method].pop(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000-item streams, 1 round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds for the streams")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args()
    items = 100_000 if args.quick else 1_000_000
    repeats = 1 if args.quick else args.repeats
    env = environment()
    env["mode"] = "quick" if args.quick else "default"
    env["command"] = "bench/dataset_fingerprint.py" + (" --quick" if args.quick else "")
    rows = measure("digits", load_digits_dataset(), max(repeats, 7))
    for shape in ((1, 8, 8), (4, 32, 32)):
        rows += measure(f"synthetic stream {shape}", SyntheticLatents(items, shape), repeats)
    rows = [{**env, **row} for row in rows]
    append_rows(args.out / f"dataset_fingerprint_{env['device']}.csv", rows)
    summary = [
        "# Dataset fingerprint: full pass vs 64-item sample",
        "",
        f"Run {env['run']}, commit {env['git_commit']}, {env['device']}, {env['threads']} "
        f"threads, load before {env['load_before']}. Command: `.venv/bin/python "
        f"{env['command']}`. Medians over the rounds (`repeats`); `read` reads every item "
        "without hashing (the floor of a full check), `ratio_to_read` = method / read, "
        "`us_per_item` = median / items read. By default `dataset_fingerprint` hashes every "
        f"item up to FULL_VERIFY_LIMIT = {FULL_VERIFY_LIMIT:,} items and samples above.",
        "",
        markdown_table(rows, COLUMNS),
    ]
    (args.out / f"dataset_fingerprint_{env['device']}.md").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
