"""The command line never loses finished work or a user's files: one writer per artifact,
a save that fails lands somewhere named, an interrupted build resumes, and damaged or
ill-typed input files are refused in one line."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastinf.artifacts
from fastinf.cli import main
from fastinf.data import validate_images
from fastinf.engine import InfluenceEngine
from fastinf.index.config import IndexConfig
from fastinf.index.search import SearchIndex
from fastinf.index.store import IndexStore
from fastinf.locks import LOCK_NAME, writer_lock
from fastinf.models import load_sidecar, load_unet, save_unet, schedule_from_sidecar

from tiny import random_dataset, tiny_unet

SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}
FIT = ["--factor-draws", "1", "--eigval-draws", "1"]


@pytest.fixture
def files(tmp_path):
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": SCHEDULE})
    data = random_dataset(8, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(tmp_path / "train.safetensors"))
    model = ["--weights", str(tmp_path / "unet.safetensors")]
    return tmp_path, [*model, "--data", str(tmp_path / "train.safetensors")]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_second_writer_is_refused_with_the_holders_pid(files, capsys):
    tmp_path, model = files
    with writer_lock(tmp_path / "curv", "test"):
        assert main(["fit", *model, "--out", str(tmp_path / "curv"), *FIT]) == 2
        assert f"process {os.getpid()}" in one_line_error(capsys)
    assert not (tmp_path / "curv" / "curvature.json").exists()


def test_a_stale_lock_is_taken_over(files, capsys):
    tmp_path, model = files
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "curv").mkdir()
    (tmp_path / "curv" / LOCK_NAME).write_text(f"{gone.pid}\n")
    assert main(["fit", *model, "--out", str(tmp_path / "curv"), *FIT]) == 0
    assert (
        f"stale lock {tmp_path / 'curv' / LOCK_NAME} (process {gone.pid}" in capsys.readouterr().err
    )
    assert (tmp_path / "curv" / "curvature.json").exists()
    assert not (tmp_path / "curv" / LOCK_NAME).exists()


def test_a_failed_save_lands_in_a_named_fallback(files, capsys, monkeypatch):
    tmp_path, model = files
    target = tmp_path / "curv"
    real = fastinf.artifacts.atomic_write

    def full_disk(path, write):
        if target in type(path)(path).parents:
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(fastinf.artifacts, "atomic_write", full_disk)
    assert main(["fit", *model, "--out", str(target), *FIT]) == 2
    error = one_line_error(capsys)
    assert "No space left on device" in error and "saved to " in error
    fallback = error.split("saved to ")[1].removesuffix(" instead.")
    monkeypatch.setattr(fastinf.artifacts, "atomic_write", real)
    engine = InfluenceEngine(
        load_unet(tmp_path / "unet.safetensors"),
        schedule_from_sidecar(load_sidecar(tmp_path / "unet.safetensors")),
        random_dataset(8, (1, 4, 4), seed=2, dtype=torch.float32),
    )
    engine.load_curvature(fallback)  # the finished fit, intact


def _write(path, kind):
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_file({"images": torch.rand(4, 1, 4, 4)}, str(path))
        path.write_bytes(path.read_bytes()[:-20])
    elif kind == "empty":
        save_file({"images": torch.zeros(0, 1, 4, 4)}, str(path))
    elif kind == "uint8":
        np.save(path, np.zeros((2, 1, 4, 4), dtype=np.uint8))
    elif kind == "fractional labels":
        save_file({"images": torch.rand(2, 1, 4, 4), "labels": torch.tensor([1.5, 2.0])}, str(path))
    elif kind == "labels, unconditional model":
        save_file({"images": torch.rand(2, 1, 4, 4), "labels": torch.tensor([1, 2])}, str(path))


KINDS = {
    "zero-byte": ("q.safetensors", "cannot be read"),
    "truncated": ("q.safetensors", "cannot be read"),
    "empty": ("q.safetensors", "holds no images"),
    "uint8": ("q.npy", "uint8 pixels"),
    "fractional labels": ("q.safetensors", "whole class numbers"),
    "labels, unconditional model": ("q.safetensors", "unconditional"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_or_ill_typed_query_files_are_refused_in_one_line(files, capsys, kind):
    tmp_path, model = files
    assert main(["fit", *model, "--out", str(tmp_path / "curv"), *FIT]) == 0
    capsys.readouterr()
    name, message = KINDS[kind]
    _write(tmp_path / name, kind)
    query = ["topk", *model, "--curvature", str(tmp_path / "curv"), "--queries"]
    assert main([*query, str(tmp_path / name), "--train-draws", "2", "--query-draws", "2"]) == 2
    error = one_line_error(capsys)
    assert message in error and name in error


@pytest.mark.slow
def test_an_interrupted_index_build_says_what_was_kept_and_resumes_identically(tmp_path):
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": SCHEDULE})
    data = random_dataset(192, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(tmp_path / "train.safetensors"))
    model = ["--weights", str(tmp_path / "unet.safetensors")]
    model += ["--data", str(tmp_path / "train.safetensors")]
    assert main(["fit", *model, "--out", str(tmp_path / "curv"), *FIT]) == 0
    build = ["index", *model, "--curvature", str(tmp_path / "curv"), "--train-draws", "16"]
    build += ["--compression", "countsketch", "--dim", "64", "--shard-size", "4"]
    command = [sys.executable, "-m", "fastinf", *build]
    env = {**os.environ, "FASTINF_PROGRESS": "0"}
    run = subprocess.Popen(
        [*command, "--out", str(tmp_path / "a")], env=env, stderr=subprocess.PIPE, text=True
    )
    shards = tmp_path / "a" / "shards"
    deadline = time.monotonic() + 120
    while not list(shards.glob("shard_*.json")) and run.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if run.poll() is not None:
        pytest.skip("the build finished before it could be interrupted")
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=600)  # a starved process acts on the signal late
    if run.returncode == 0:  # a loaded machine can deliver the signal after the last shard
        pytest.skip("the build finished before the interrupt arrived")
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "fastinf index: interrupted; finished shards were kept; the same command resumes the build."
    )
    kept = {p.name: p.read_bytes() for p in shards.glob("shard_*.json")}
    assert kept and not IndexStore(tmp_path / "a").read_manifest()["complete"]
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    env_run = {"env": env, "capture_output": True, "text": True}
    assert subprocess.run([*command, "--out", str(tmp_path / "a")], **env_run).returncode == 0
    assert subprocess.run([*command, "--out", str(tmp_path / "b")], **env_run).returncode == 0
    for name, record in kept.items():  # finished shards were not recomputed
        assert (shards / name).read_bytes() == record
    resumed = IndexStore(tmp_path / "a").read_manifest()
    clean = IndexStore(tmp_path / "b").read_manifest()
    assert resumed["complete"] and [r["sha256"] for r in resumed["shards"]] == [
        r["sha256"] for r in clean["shards"]
    ]


def test_lds_refuses_a_bad_size_before_writing_its_setup(tmp_path, capsys):
    assert main(["lds", "--run-dir", str(tmp_path / "run"), "--num-train", "5000"]) == 2
    assert "num_train must be in 2..1797" in one_line_error(capsys)
    assert not (tmp_path / "run" / "setup.json").exists()


def test_faiss_errors_name_the_option_that_caused_them():
    config = IndexConfig(compression="countsketch", dim=16, storage="fp32", search="ivfpq")
    rows = np.random.default_rng(0).random((50, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=r"search='ivfpq' cannot be trained on 50 rows \(Number"):
        SearchIndex.build(dataclasses.replace(config, pq_bytes=4), 16, 50, iter([rows]), None)


def test_unscaled_pixels_warn_in_the_api_and_the_cli(files, capsys):
    with pytest.warns(UserWarning, match=r"look like unscaled pixels"):
        validate_images(torch.full((1, 1, 4, 4), 255.0), (1, 4, 4))
    tmp_path, model = files
    assert main(["fit", *model, "--out", str(tmp_path / "curv"), *FIT]) == 0
    save_file({"images": torch.full((1, 1, 4, 4), 200.0)}, str(tmp_path / "q.safetensors"))
    query = ["topk", *model, "--curvature", str(tmp_path / "curv"), "--k", "2"]
    query += ["--queries", str(tmp_path / "q.safetensors"), "--train-draws", "2"]
    with pytest.warns(UserWarning, match=r"queries range over \[0, 200\]"):
        assert main([*query, "--query-draws", "2"]) == 0


def test_leftovers_of_a_killed_save_are_cleaned_and_nothing_else(files):
    tmp_path, model = files
    out = tmp_path / "curv"
    out.mkdir()
    (out / "curvature.safetensors.tmp").write_bytes(b"half a file")
    (out / "notes.tmp").write_text("mine")
    assert main(["fit", *model, "--out", str(out), *FIT]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "curvature.json",
        "curvature.safetensors",
        "notes.tmp",
    ]
    index = tmp_path / "index"
    (index / "shards").mkdir(parents=True)
    (index / "shards" / "shard_00000.npy.tmp").write_bytes(b"half")
    (index / "notes.tmp").write_text("mine")
    IndexStore(index).remove_temporary()
    assert sorted(p.name for p in index.rglob("*")) == ["notes.tmp", "shards"]


def _folder_digest(folder) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_bad_inputs_found_while_working_are_refused_in_one_line_without_damage(files, capsys):
    """The issue's list, the part that needs a model loaded: each is exit 2, one line naming
    the option or file, and no file changed."""
    tmp_path, model = files
    assert main(["fit", *model, "--out", str(tmp_path / "curv"), *FIT]) == 0
    index = ["index", *model, "--curvature", str(tmp_path / "curv"), "--train-draws", "2"]
    assert main([*index, "--out", str(tmp_path / "idx"), "--compression", "exact"]) == 0
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("curvature.json", "curvature.safetensors"):
        (edited / name).write_bytes((tmp_path / "curv" / name).read_bytes())
    text = (
        (edited / "curvature.json").read_text().replace('"factor_draws": 1', '"factor_draws": 64')
    )
    (edited / "curvature.json").write_text(text)
    images = random_dataset(8, (1, 4, 4), seed=2, dtype=torch.float32).images.clone()
    images[5, 0, 1, 1] += 0.25
    save_file({"images": images}, str(tmp_path / "changed.safetensors"))
    np.save(tmp_path / "pixels.npy", np.zeros((8, 1, 4, 4), dtype=np.uint8))
    save_file({"images": torch.rand(2, 1, 4, 4)}, str(tmp_path / "q.safetensors"))
    capsys.readouterr()
    weights = model[:2]
    query = ["topk", *model, "--queries", str(tmp_path / "q.safetensors"), "--query-draws", "2"]
    curvature = ["--curvature", str(tmp_path / "curv")]
    changed = ["--data", str(tmp_path / "changed.safetensors")]
    draws = ["--train-draws", "2"]
    cases = [
        (["topk", *model, "--curvature", str(edited), "--generate", "1"], "altered"),
        (["topk", *weights, *changed, *curvature, "--generate", "1"], "dataset"),
        (["fit", *weights, "--data", str(tmp_path / "pixels.npy"), "--out", "x"], "uint8"),
        ([*query, *curvature, "--damping", "1e300", "--damping-mode", "absolute"], "damping"),
        ([*index, "--out", str(tmp_path / "i2"), "--dim", "100000000"], "dim"),
        (
            [*index, "--out", str(tmp_path / "i3"), "--dim", "512", "--search", "ivfpq"],
            "search='ivfpq'",
        ),
        (
            [*query, *curvature, "--index", str(tmp_path / "idx"), *draws, "--damping", "1e-2"],
            "damping",
        ),
    ]
    before = _folder_digest(tmp_path)
    for args, named in cases:
        assert main(args) == 2, args
        assert named in one_line_error(capsys), args
    after = _folder_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("i2/", "i3/"))} == before


def test_an_output_without_write_permission_is_refused_before_work(tmp_path, capsys, monkeypatch):
    # Root may write anywhere, so the permission itself is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    assert main(["fit", "--out", str(tmp_path / "a" / "b")]) == 2
    assert f"no permission to write in {tmp_path}" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()
