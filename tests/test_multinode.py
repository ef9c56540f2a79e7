"""Two nodes on one machine (docs/multinode.md): `torchrun --nnodes=2` launched twice on
loopback, one process per node, builds the same index and writes the same `fastinf topk`
JSON as one process."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastinf.cli import load_tensors, main
from fastinf.data import ImageTensorDataset
from fastinf.engine import InfluenceEngine
from fastinf.models import load_sidecar, load_unet, save_unet, schedule_from_sidecar

from tiny import random_dataset, tiny_unet

SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}
SCORE = ["--train-draws", "2", "--damping", "1e-3", "--block-size", "2"]
# A compressed, quantised index in 5 shards: rank 0 calibrates, both ranks write shards.
INDEX = ["--compression", "hybrid", "--dim", "24", "--storage", "int8"]
INDEX += ["--shard-size", "2", "--calibration-examples", "4"]
TIMEOUT_S = 240  # per launch of both nodes; a hung rendezvous or collective fails the test


def write_shared_files(folder: Path) -> list[str]:
    """Weights, data, queries and a curvature in `folder`: what every node must share.
    Returns the options that name them (`--weights --data --curvature`)."""
    save_unet(tiny_unet().float(), folder / "unet.safetensors", {"schedule": SCHEDULE})
    data = random_dataset(10, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(folder / "train.safetensors"))
    queries = random_dataset(2, (1, 4, 4), seed=3, dtype=torch.float32).images
    save_file({"images": queries}, str(folder / "queries.safetensors"))
    model = ["--weights", str(folder / "unet.safetensors")]
    model += ["--data", str(folder / "train.safetensors")]
    fit = ["fit", *model, "--out", str(folder / "curv"), "--factor-draws", "1"]
    assert main([*fit, "--eigval-draws", "1"]) == 0
    return [*model, "--curvature", str(folder / "curv")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    return folder, write_shared_files(folder)


@contextlib.contextmanager
def one_thread():
    """Run like the nodes (OMP_NUM_THREADS=1), so float32 sums add up in the same order
    and the results can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), deepest first."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found = [*_descendants(child), child, *found]
    return found


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the launches this test started: SIGTERM (a torchrun agent then stops its
    workers), and SIGKILL by PID for whatever is left of them after 20 s."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def run_two_nodes(
    launches: list[list[str]], command: list[str], logs: Path, *, progress: bool = False
) -> list[str]:
    """Start one `torchrun` per node (`launches`: each node's torchrun options) running
    `python -m fastinf COMMAND`; wait for both; return their logs (with progress bars if
    `progress`). Fails, after stopping both, if either fails or both are not done in
    TIMEOUT_S."""
    env = {**os.environ, "FASTINF_PROGRESS": str(int(progress)), "OMP_NUM_THREADS": "1"}
    processes, paths = [], []
    try:
        for node, options in enumerate(launches):
            paths.append(logs / f"node{node}.log")
            with open(paths[-1], "w") as log:
                torchrun = [sys.executable, "-m", "torch.distributed.run", *options]
                processes.append(
                    subprocess.Popen(
                        [*torchrun, "-m", "fastinf", *command],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _stop(processes)
        texts = "\n".join(path.read_text()[-2000:] for path in paths)
        pytest.fail(f"the two nodes did not finish in {TIMEOUT_S}s:\n{texts}")
    finally:
        _stop(processes)  # nothing left running if the test fails on the way
    texts = [path.read_text() for path in paths]
    for process, text in zip(processes, texts, strict=True):
        assert process.returncode == 0, text[-3000:]
    return texts


def _engine(folder: Path) -> InfluenceEngine:
    """The engine `fastinf topk` builds from the shared files."""
    from fastinf.config import ScoreConfig

    images, _ = load_tensors(folder / "train.safetensors")
    engine = InfluenceEngine(
        load_unet(folder / "unet.safetensors"),
        schedule_from_sidecar(load_sidecar(folder / "unet.safetensors")),
        ImageTensorDataset(images),
        config=ScoreConfig(train_draws=2, query_draws=2, damping=1e-3, block_size=2),
    )
    engine.load_curvature(folder / "curv")
    return engine


def test_two_nodes_with_a_static_rendezvous_build_the_one_process_index(setup, tmp_path):
    folder, common = setup
    command = ["index", *common, *SCORE, *INDEX, "--out"]
    with one_thread():
        assert main([*command, str(tmp_path / "alone")]) == 0
    static = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
    static += [f"--master_port={_free_port()}", "--rdzv_conf=timeout=120"]
    nodes = [[*static, "--node_rank=0"], [*static, "--node_rank=1"]]
    logs = run_two_nodes(nodes, [*command, str(tmp_path / "two")], tmp_path)
    assert "by 2 process(es)" in logs[0]

    shards = (tmp_path / "two/shards").glob("*.json")
    assert {json.loads(path.read_text())["shard"] % 2 for path in shards} == {0, 1}
    alone_manifest = json.loads((tmp_path / "alone/index.json").read_text())
    two_manifest = json.loads((tmp_path / "two/index.json").read_text())
    for key in ("build_id", "dim", "compressor", "first_stage_recall", "completed"):
        assert two_manifest[key] == alone_manifest[key], key
    engine = _engine(folder)
    queries, _ = load_tensors(folder / "queries.safetensors")
    found = []
    for name in ("alone", "two"):
        index = engine.load_index(tmp_path / name)
        result = engine.score(queries, k=3, exact_rerank=0)
        found.append((index.vectors(), result))
    np.testing.assert_array_equal(found[1][0], found[0][0])
    for part in ("proponents", "opponents"):
        alone, two = (getattr(result, part) for _, result in found)
        assert torch.equal(two.indices, alone.indices)
        assert torch.equal(two.scores, alone.scores)


def test_two_nodes_with_a_c10d_rendezvous_write_the_one_process_topk(setup, tmp_path):
    _, common = setup
    # Generated queries: node 0 samples them for both (`fastinf topk` shares its samples).
    command = ["topk", *common, *SCORE, "--query-draws", "2", "--k", "4", "--generate", "2"]
    with one_thread():
        assert main([*command, "--out", str(tmp_path / "alone.json")]) == 0
    c10d = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d"]
    c10d += [f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_id=fastinf-test"]
    c10d += ["--rdzv_conf=join_timeout=120"]
    command += ["--out", str(tmp_path / "two.json")]
    logs = run_two_nodes([c10d, c10d], command, tmp_path, progress=True)
    assert (tmp_path / "two.json").read_text() == (tmp_path / "alone.json").read_text()
    # The nodes shared the pass: blocks of 2, rank 0 {0,1,4,5,8,9}, rank 1 {2,3,6,7}.
    shares = sorted(re.findall(r"score train \[rank (\d)/2\]: 100%.*? (\d+)/\2", "".join(logs)))
    assert sorted(set(shares)) == [("0", "6"), ("1", "4")], logs
