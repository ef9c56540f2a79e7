"""The end-to-end demo on the embedded default, and the attribution grid a person looks at.

Generates samples from the shipped digits DDPM, fits EK-FAC on the 1,797 training digits,
scores every training image against every sample, and writes
`grid.png` (each row: query | top proponents | top opponents) and `results.json`.
`run_text_demo` does the same on the text-conditional default: prompt → sample →
proponents and opponents among the captioned digits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
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

__all__ = [
    "DEMO_CURVATURE",
    "DEMO_SCORE",
    "TEXT_DEMO_PROMPTS",
    "attribution_grid",
    "run_demo",
    "run_text_demo",
]

DEMO_CURVATURE = CurvatureConfig(factor_draws=4, eigval_draws=4)
DEMO_SCORE = ScoreConfig(train_draws=16, query_draws=64)


def attribution_grid(
    queries: Tensor,
    train_images: Tensor,
    result: InfluenceResult,
    columns: int = 6,
    scale: int = 8,
    row_titles: list[str] | None = None,
) -> Image.Image:
    """Rows: [its title (e.g. the prompt) |] query | its `columns` top proponents | its
    `columns` top opponents.

    Proponents (τ > 0) made the query more likely; opponents (τ < 0) less likely.
    """
    height, width = queries.shape[-2] * scale, queries.shape[-1] * scale
    gap, header = 4, 18
    cell = width + gap
    left = 0 if row_titles is None else 6 * max(len(title) for title in row_titles) + 3 * gap
    total_width = left + cell * (1 + 2 * columns) + 3 * gap
    grid = Image.new("RGB", (total_width, header + (height + gap) * queries.shape[0]), "white")
    draw = ImageDraw.Draw(grid)
    prop_x, opp_x = left + cell + 2 * gap, left + cell * (1 + columns) + 3 * gap
    if row_titles is not None:
        draw.text((2, 2), "prompt", fill="black")
    draw.text((left + 2, 2), "query", fill="black")
    draw.text((prop_x, 2), "top proponents (made it likelier) ->", fill="darkgreen")
    draw.text((opp_x, 2), "top opponents (made it less likely) ->", fill="darkred")
    for row in range(queries.shape[0]):
        top = header + row * (height + gap)
        if row_titles is not None:
            draw.text((2, top + height // 2 - 5), row_titles[row], fill="black")
        grid.paste(to_pil(queries[row], scale), (left, top))
        for col in range(columns):
            for base, topk in ((prop_x, result.proponents), (opp_x, result.opponents)):
                index = int(topk.indices[row, col])
                if index >= 0:
                    grid.paste(to_pil(train_images[index], scale), (base + col * cell, top))
    return grid


def _fit_and_score(engine, queries, cond, out: Path, k: int, timings: dict) -> InfluenceResult:
    """Fit the demo's EK-FAC (saved in out/curvature) and score the queries, timing both."""
    mark = time.perf_counter()
    engine.fit(DEMO_CURVATURE)
    engine.save_curvature(out / "curvature")
    timings["fit_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    result = engine.score(queries, k=k, cond=cond, return_scores=True)
    timings["score_s"] = time.perf_counter() - mark
    return result


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

    result = _fit_and_score(engine, queries, None, out, k, timings)
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


TEXT_DEMO_PROMPTS = ("a handwritten three", "the digit 7", "digit zero", "a scan of the number 5")


def run_text_demo(
    out_dir: str | Path,
    *,
    prompts: Sequence[str] = TEXT_DEMO_PROMPTS,
    per_prompt: int = 2,
    k: int = 6,
    seed: int = 0,
) -> dict:
    """The demo on the text-conditional default: each prompt → `per_prompt` samples →
    their proponents and opponents among the captioned digits (`grid.png`, `results.json`).

    `results.json` also reports, per prompt, the share of top proponents whose digit is the
    prompt's (a check a person can read: a "three" should be made by threes).
    """
    from .text_digits import load_text_digits_dataset, load_text_digits_model, load_text_encoder

    prompts = list(prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    encoder = load_text_encoder()
    model, schedule = load_text_digits_model(), default_schedule()
    data = load_text_digits_dataset(encoder)
    engine = InfluenceEngine(model, schedule, data, config=DEMO_SCORE)
    timings["load_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    titles = [prompt for prompt in prompts for _ in range(per_prompt)]
    states = encoder.encode(titles)
    queries = sample_ddpm(model, schedule, len(titles), seed=seed, cond=states)
    timings["sample_s"] = time.perf_counter() - mark

    result = _fit_and_score(engine, queries, states, out, k, timings)
    timings["total_s"] = time.perf_counter() - start

    attribution_grid(queries, data.images, result, columns=k, row_titles=titles).save(
        out / "grid.png"
    )
    torch.save(queries, out / "queries.pt")
    labels = data.labels
    proponents = labels[result.proponents.indices]
    matches = {}
    for prompt in prompts:
        digit = _prompt_digit(prompt)
        rows = [row for row, title in enumerate(titles) if title == prompt]
        if digit is not None:
            matches[prompt] = round(float((proponents[rows] == digit).double().mean()), 3)
    summary = {
        "model": "embedded text-conditional digits DDPM (UNet2DConditionModel, 8x8, "
        "cross-attention to a small CLIP text encoder)",
        "num_train": len(data),
        "prompts": titles,
        "curvature_config": DEMO_CURVATURE.fingerprint(),
        "score_config": DEMO_SCORE.query_fingerprint() | {"train_draws": DEMO_SCORE.train_draws},
        "timings": {key: round(value, 2) for key, value in timings.items()},
        "proponents_of_the_prompted_digit": matches,
        "proponent_labels": proponents.tolist(),
        "opponent_labels": labels[result.opponents.indices].tolist(),
        "proponent_captions": [
            [data.captions[i] for i in row] for row in result.proponents.indices.tolist()
        ],
        **result.to_dict(),
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    return summary


def _prompt_digit(prompt: str) -> int | None:
    """The digit a prompt names (as a numeral or a word), or None."""
    from .text_digits import NUMBER_WORDS

    for word in prompt.replace(",", " ").split():
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word in NUMBER_WORDS:
            return NUMBER_WORDS.index(word)
    return None
