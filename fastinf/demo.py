"""The end-to-end demo on the embedded default, and the attribution grid a person looks at.

Generates samples from the shipped digits DDPM, fits EK-FAC on the 1,797 training digits,
scores every training image against every sample, and writes
`grid.png` (each row: query | top proponents | top opponents) and `results.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .artifacts import atomic_write_text
from .config import CurvatureConfig, ScoreConfig
from .data import load_digits_dataset
from .engine import InfluenceEngine
from .imaging import to_pil
from .models import default_schedule, load_digits_model
from .sampling import sample_ddpm
from .scoring import InfluenceResult

__all__ = ["DEMO_CURVATURE", "DEMO_SCORE", "attribution_grid", "run_demo"]

DEMO_CURVATURE = CurvatureConfig(factor_draws=4, eigval_draws=4)
DEMO_SCORE = ScoreConfig(train_draws=16, query_draws=64)


def attribution_grid(
    queries: Tensor, train_images: Tensor, result: InfluenceResult, columns: int = 6, scale: int = 8
) -> Image.Image:
    """Rows: query | its `columns` top proponents | its `columns` top opponents.

    Proponents (τ > 0) made the query more likely; opponents (τ < 0) less likely.
    """
    height, width = queries.shape[-2] * scale, queries.shape[-1] * scale
    gap, header = 4, 18
    cell = width + gap
    total_width = cell * (1 + 2 * columns) + 3 * gap
    grid = Image.new("RGB", (total_width, header + (height + gap) * queries.shape[0]), "white")
    draw = ImageDraw.Draw(grid)
    prop_x, opp_x = cell + 2 * gap, cell * (1 + columns) + 3 * gap
    draw.text((2, 2), "query", fill="black")
    draw.text((prop_x, 2), "top proponents (made it likelier) ->", fill="darkgreen")
    draw.text((opp_x, 2), "top opponents (made it less likely) ->", fill="darkred")
    for row in range(queries.shape[0]):
        top = header + row * (height + gap)
        grid.paste(to_pil(queries[row], scale), (0, top))
        for col in range(columns):
            for base, topk in ((prop_x, result.proponents), (opp_x, result.opponents)):
                index = int(topk.indices[row, col])
                if index >= 0:
                    grid.paste(to_pil(train_images[index], scale), (base + col * cell, top))
    return grid


def run_demo(out_dir: str | Path, *, num_queries: int = 8, k: int = 6, seed: int = 0) -> dict:
    """Run the demo; returns (and writes to results.json) the results and stage timings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    model, schedule, data = load_digits_model(), default_schedule(), load_digits_dataset()
    engine = InfluenceEngine(model, schedule, data, config=DEMO_SCORE)
    timings["load_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    queries = sample_ddpm(model, schedule, num_queries, seed=seed)
    timings["sample_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    engine.fit(DEMO_CURVATURE)
    engine.save_curvature(out / "curvature")
    timings["fit_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    result = engine.score(queries, k=k, return_scores=True)
    timings["score_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start

    attribution_grid(queries, data.images, result, columns=k).save(out / "grid.png")
    torch.save(queries, out / "queries.pt")
    labels = data.labels
    summary = {
        "model": "embedded digits DDPM (UNet2DModel, 8x8, unconditional)",
        "num_train": len(data),
        "num_queries": num_queries,
        "curvature_config": DEMO_CURVATURE.fingerprint(),
        "score_config": DEMO_SCORE.query_fingerprint() | {"train_draws": DEMO_SCORE.train_draws},
        "timings": {key: round(value, 2) for key, value in timings.items()},
        "proponent_labels": labels[result.proponents.indices].tolist(),
        "opponent_labels": labels[result.opponents.indices].tolist(),
        **result.to_dict(),
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    return summary
