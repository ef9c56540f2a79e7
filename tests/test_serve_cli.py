"""`fastinf serve` on the command line: bad arguments refused before any work, and a real
server process on the user's own weights, data and curvature that answers and stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from fastinf.cli import main
from fastinf.models import save_unet

from tiny import random_dataset, run_cli, tiny_unet

SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}


def test_serve_help_imports_nothing_heavy():
    code, _, loaded = run_cli("serve", "--help")
    assert code == 0 and loaded == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/train.safetensors"], "--weights/--data/--layers need --curvature"),
        (["--layers", "*attentions*"], "--weights/--data/--layers need --curvature"),
        (["--index", "{tmp}/nowhere"], "--index {tmp}/nowhere: no index.json there"),
        (["--default-k", "20", "--k-max", "10"], "--default-k 20 exceeds --k-max 10"),
        (["--timeout-s", "0"], "--timeout-s must be > 0"),
        (["--max-batch", "0"], "--max-batch: must be an integer >= 1"),
    ],
)
def test_bad_serve_arguments_are_refused_in_one_line_before_torch(tmp_path, args, message):
    save_file({"images": torch.zeros(2, 1, 4, 4)}, str(tmp_path / "train.safetensors"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, error, loaded = run_cli("serve", *args)
    assert code == 2, error
    assert message.replace("{tmp}", str(tmp_path)) in error
    assert "Traceback" not in error and loaded == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fitted_setup(tmp_path, count: int):
    """A tiny UNet, `count` training images and a curvature fitted in `tmp_path/curv`:
    (the images, the --weights/--data options)."""
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": SCHEDULE})
    data = random_dataset(count, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(tmp_path / "train.safetensors"))
    model = ["--weights", str(tmp_path / "unet.safetensors")]
    model += ["--data", str(tmp_path / "train.safetensors")]
    fit = ["fit", *model, "--out", str(tmp_path / "curv"), "--factor-draws", "1"]
    assert main([*fit, "--eigval-draws", "1"]) == 0
    return data, model


@pytest.mark.parametrize(
    "score_thread, stop", [("main", signal.SIGTERM), ("worker", signal.SIGINT)]
)
def test_serve_answers_on_the_users_setup_and_stops_on_a_signal(tmp_path, score_thread, stop):
    data, model = _fitted_setup(tmp_path, 6)
    port = _free_port()
    command = [sys.executable, "-m", "fastinf", "serve", *model, "--curvature"]
    command += [str(tmp_path / "curv"), "--port", str(port), "--train-draws", "2"]
    command += ["--query-draws", "2", "--default-k", "2", "--score-thread", score_thread]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        answer = httpx.post(
            f"{url}/v1/topk", json={"image": data.images[3].tolist()}, timeout=60
        ).json()
        assert answer["scorer"] == "exact" and len(answer["proponents"]) == 2
        info = httpx.get(f"{url}/v1/info", timeout=10).json()
        assert info["train_examples"] == 6 and info["score_config"]["train_draws"] == 2
        server.send_signal(stop)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, output
    assert "6 training examples, exact scoring" in output
    assert "Traceback" not in output


def test_serve_on_a_port_in_use_fails_with_the_fix(tmp_path):
    _, model = _fitted_setup(tmp_path, 4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "fastinf", "serve", *model, "--curvature"]
        command += [str(tmp_path / "curv"), "--port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"could not listen on http://127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr.strip().splitlines()[-1]
