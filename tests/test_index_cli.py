"""`fastinf index` and `fastinf topk --index` on a tiny UNet, against the Python API."""

import json

import torch
from safetensors.torch import save_file

from fastinf.cli import main
from fastinf.config import ScoreConfig
from fastinf.engine import InfluenceEngine
from fastinf.models import load_sidecar, load_unet, save_unet, schedule_from_sidecar

from tiny import random_dataset, tiny_unet

SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}
SMALL = ["--train-draws", "2", "--damping", "1e-3"]


def _files(tmp_path):
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": SCHEDULE})
    data = random_dataset(6, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(tmp_path / "train.safetensors"))
    queries = random_dataset(2, (1, 4, 4), seed=3, dtype=torch.float32).images
    save_file({"images": queries}, str(tmp_path / "queries.safetensors"))
    return data, queries


def test_cli_index_then_topk_matches_exact_scores(tmp_path, capsys):
    data, queries = _files(tmp_path)
    common = ["--weights", str(tmp_path / "unet.safetensors")]
    common += ["--data", str(tmp_path / "train.safetensors")]
    fit = ["fit", *common, "--out", str(tmp_path / "curv"), "--factor-draws", "1"]
    assert main([*fit, "--eigval-draws", "1"]) == 0
    curvature = ["--curvature", str(tmp_path / "curv")]
    build = ["index", *common, *curvature, "--out", str(tmp_path / "idx"), *SMALL]
    build += ["--compression", "exact", "--storage", "fp32", "--shard-size", "4"]
    assert main(build) == 0
    assert "index of 6 examples" in capsys.readouterr().out
    query = ["topk", *common, *curvature, "--queries", str(tmp_path / "queries.safetensors")]
    query += ["--k", "3", *SMALL, "--query-draws", "2", "--index", str(tmp_path / "idx")]
    assert main([*query, "--exact-rerank", "0", "--out", str(tmp_path / "out.json")]) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    engine = InfluenceEngine(
        load_unet(tmp_path / "unet.safetensors"),
        schedule_from_sidecar(load_sidecar(tmp_path / "unet.safetensors")),
        data,
        config=ScoreConfig(train_draws=2, query_draws=2, damping=1e-3),
    )
    engine.load_curvature(tmp_path / "curv")
    expected = engine.score(queries, k=3)
    assert written["proponents"]["indices"] == expected.proponents.indices.tolist()
    assert written["opponents"]["indices"] == expected.opponents.indices.tolist()
    rerank = ["--exact-rerank", "6", "--rerank-sigmas", "0"]
    assert main([*query, *rerank, "--out", str(tmp_path / "rerank.json")]) == 0
    reranked = json.loads((tmp_path / "rerank.json").read_text())
    torch.testing.assert_close(
        torch.tensor(reranked["proponents"]["scores"], dtype=torch.float64),
        expected.proponents.scores,
    )
    # Querying with another damping than the index was built with names the field.
    mismatched = [arg if arg != "1e-3" else "1e-2" for arg in query]
    assert main(mismatched) == 2
    assert "gradients.damping" in capsys.readouterr().err
