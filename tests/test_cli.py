"""The command line on a tiny UNet and dataset: fit, then topk, against the Python API."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastinf.cli import main
from fastinf.config import ScoreConfig
from fastinf.engine import InfluenceEngine
from fastinf.models import load_unet, save_unet

from tiny import random_dataset, tiny_unet

SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture
def files(tmp_path):
    weights = tmp_path / "unet.safetensors"
    save_unet(tiny_unet().float(), weights, {"schedule": SCHEDULE})
    data = random_dataset(6, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(tmp_path / "train.safetensors"))
    queries = random_dataset(2, (1, 4, 4), seed=3, dtype=torch.float32).images
    save_file({"images": queries}, str(tmp_path / "queries.safetensors"))
    return tmp_path, data, queries


def fit_with_cli(tmp_path):
    """Run `fastinf fit` on the tiny files; return the model/data arguments it used."""
    common = ["--weights", str(tmp_path / "unet.safetensors")]
    common += ["--data", str(tmp_path / "train.safetensors")]
    fit = ["fit", *common, "--out", str(tmp_path / "curv")]
    assert main([*fit, "--factor-draws", "1", "--eigval-draws", "1"]) == 0
    return common


def test_fit_then_topk_matches_the_api(files):
    tmp_path, data, queries = files
    common = fit_with_cli(tmp_path)
    args = [
        "topk",
        *common,
        "--curvature",
        str(tmp_path / "curv"),
        "--queries",
        str(tmp_path / "queries.safetensors"),
        "--k",
        "3",
        "--train-draws",
        "2",
        "--query-draws",
        "2",
        "--damping",
        "1e-3",
        "--out",
        str(tmp_path / "out.json"),
    ]
    assert main(args) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    from fastinf.models import load_sidecar, schedule_from_sidecar

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
    assert written["sign_convention"].startswith("positive score = proponent")


def test_cli_reports_mismatched_curvature_clearly(files, capsys):
    tmp_path, _, _ = files
    fit_with_cli(tmp_path)
    other = random_dataset(6, (1, 4, 4), seed=9, dtype=torch.float32).images
    save_file({"images": other}, str(tmp_path / "other.safetensors"))
    code = main(
        [
            "topk",
            "--weights",
            str(tmp_path / "unet.safetensors"),
            "--data",
            str(tmp_path / "other.safetensors"),
            "--curvature",
            str(tmp_path / "curv"),
            "--queries",
            str(tmp_path / "queries.safetensors"),
        ]
    )
    assert code == 2
    assert "another model, dataset or configuration" in capsys.readouterr().err


def test_lds_methods_are_engine_settings_and_unknown_ones_are_named(tmp_path, capsys):
    from fastinf.cli import _lds_methods

    methods = _lds_methods("ekfac,kfac,grad-dot,trak,dtrak", 1e-3, "relative", 8, 16)
    assert [m.curvature.strategy for m in methods] == ["ekfac", "kfac", "identity", "trak", "trak"]
    assert methods[0].damping == 1e-3 and methods[0].damping_mode == "relative"
    assert all(m.train_draws == 8 and m.query_draws == 16 for m in methods)
    assert methods[4].train_objective == "square_norm" == methods[4].measurement
    assert methods[4].curvature.objective == "square_norm"
    code = main(["lds", "--run-dir", str(tmp_path), "--methods", "ekfac,magic"])
    assert code == 2
    assert "--methods: unknown ['magic']" in capsys.readouterr().err
