"""Fitting across processes: 2 gloo ranks fit the curvature of 1 process, for every strategy.

One `torch.distributed.run` launch (2 ranks, gloo, CPU) serves every test. Run as a
script, this file is the worker it launches:
    python tests/test_fit_distributed.py WORK
Each rank fits every configuration of `CONFIGS` through the Python API (rank 0 saves each
under WORK/api/<name>, every rank writes the fingerprints of what it holds), resumes the
checkpointed fit that one process began in WORK/resume, and runs `fastinf fit` on the tiny
files in WORK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastinf.artifacts import tensor_fingerprint
from fastinf.cli import main
from fastinf.config import CurvatureConfig
from fastinf.curvature import STRATEGIES, EigenbasisCurvature
from fastinf.curvature.passes import PROGRESS_DIR
from fastinf.diffusion import NoiseSchedule
from fastinf.distributed import contiguous, init_distributed
from fastinf.engine import InfluenceEngine
from fastinf.models import save_unet

from tiny import TinyConvEps, random_dataset, tiny_unet

HERE = Path(__file__).resolve().parent
NUM_EXAMPLES = 13  # chunks of 5, 5 and 3 examples; rank shares of 3 and 2, 2 and 1
CONFIGS = {
    "ekfac": CurvatureConfig(factor_draws=2, eigval_draws=2, chunk_examples=5),
    "kfac": CurvatureConfig("kfac", factor_draws=2, chunk_examples=5),
    "identity": CurvatureConfig("identity"),
    "trak": CurvatureConfig("trak", factor_draws=2, projection_dim=24, chunk_examples=5),
    "ekfac_half": CurvatureConfig(factor_draws=1, eigval_draws=1, fraction=0.5, chunk_examples=3),
}
SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}
CLI_FIT = ["--factor-draws", "1", "--eigval-draws", "1", "--chunk-examples", "3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and one thread is immune to a loaded machine
    (two threads on busy cores run these fits ~8× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupting(torch.utils.data.Dataset):
    """The same items; reading item number `stop_at` (counting every read) is a Ctrl-C."""

    def __init__(self, dataset, stop_at: int):
        self.dataset, self.stop_at, self.reads = dataset, stop_at, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        self.reads += 1
        if self.reads == self.stop_at:
            raise KeyboardInterrupt
        return self.dataset[position]


def make_engine(stop_at: int | None = None) -> InfluenceEngine:
    torch.manual_seed(0)
    data = random_dataset(NUM_EXAMPLES, (2, 5, 5), seed=1)
    return InfluenceEngine(
        TinyConvEps().double(),
        NoiseSchedule.linear(100, 1e-3, 0.2),
        data if stop_at is None else Interrupting(data, stop_at),
    )


def cli_files(directory: Path) -> None:
    save_unet(tiny_unet().float(), directory / "unet.safetensors", {"schedule": SCHEDULE})
    images = random_dataset(7, (1, 4, 4), seed=2, dtype=torch.float32).images
    save_file({"images": images}, str(directory / "train.safetensors"))


def cli_model(directory: Path) -> list[str]:
    """`fastinf fit`'s model and data arguments for the files `cli_files` wrote."""
    weights, data = directory / "unet.safetensors", directory / "train.safetensors"
    return ["--weights", str(weights), "--data", str(data)]


def fingerprints(curvature) -> dict[str, str]:
    return {key: tensor_fingerprint(value) for key, value in curvature.tensors().items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The 2-rank launch, after one process began the checkpointed fit it resumes."""
    work = tmp_path_factory.mktemp("fit_distributed")
    cli_files(work)
    # Interrupted during the eigenvalue pass: factors done, one eigenvalue chunk of 5 saved.
    engine = make_engine(stop_at=NUM_EXAMPLES + NUM_EXAMPLES + 7)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(CONFIGS["ekfac"], checkpoint_dir=work / "resume")
    record = json.loads((work / "resume" / PROGRESS_DIR / "progress.json").read_text())
    assert record["passes"]["eigenvalues"]["completed"] == [[0, 5]]
    env = {**os.environ, "FASTINF_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, str(HERE / "test_fit_distributed.py"), str(work)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done


def _probe(curvature, seed: int = 3):
    """(G + λI)⁻¹ V for random V: independent of the eigenvectors' signs and order."""
    generator = torch.Generator().manual_seed(seed)
    grads = {}
    for name, info in make_engine().layers.items():
        weight = torch.randn(2, info.d_out, info.d_in, generator=generator, dtype=torch.float64)
        bias = torch.randn(2, info.d_out, generator=generator, dtype=torch.float64)
        grads[name] = (weight, bias if info.has_bias else None)
    return curvature.precondition(grads, 1e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_gloo_ranks_fit_the_curvature_of_one_process(work, name):
    assert sorted(STRATEGIES) == sorted({c.strategy for c in CONFIGS.values()})
    engine = make_engine()
    alone = engine.fit(CONFIGS[name])
    shared = engine.load_curvature(work[0] / "api" / name)
    if isinstance(alone, EigenbasisCurvature):
        for layer, fitted in alone.layers.items():
            torch.testing.assert_close(
                shared.layers[layer].act_cov, fitted.act_cov, rtol=1e-12, atol=0
            )
            torch.testing.assert_close(
                shared.layers[layer].grad_cov, fitted.grad_cov, rtol=1e-12, atol=1e-300
            )
    probed = _probe(shared)
    for layer, (weight, bias) in _probe(alone).items():
        torch.testing.assert_close(probed[layer][0], weight, rtol=1e-9, atol=1e-12)
        if bias is not None:
            torch.testing.assert_close(probed[layer][1], bias, rtol=1e-9, atol=1e-12)


def test_every_rank_holds_the_same_curvature(work):
    ranks = [json.loads((work[0] / f"fingerprints.{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert sorted(ranks[0]) == sorted(CONFIGS)


def test_two_ranks_resume_the_fit_one_process_began(work):
    directory, launch = work
    assert not (directory / "resume" / PROGRESS_DIR).exists()
    engine = make_engine()
    resumed = engine.load_curvature(directory / "resume")
    probed = _probe(resumed)
    for layer, (weight, _) in _probe(engine.fit(CONFIGS["ekfac"])).items():
        torch.testing.assert_close(probed[layer][0], weight, rtol=1e-9, atol=1e-12)
    # Rank 0 resumed the record: factors done, the first eigenvalue chunk of 5 too.
    assert "examples done: eigenvalues 5/13, factors 13/13" in launch.stderr


def test_fastinf_fit_under_torchrun_matches_one_process(work, tmp_path):
    directory, launch = work
    out = tmp_path / "curv"
    assert main(["fit", *cli_model(directory), "--out", str(out), *CLI_FIT]) == 0
    alone = load_file(str(out / "curvature.safetensors"))
    shared = load_file(str(directory / "cli" / "curvature.safetensors"))
    assert sorted(shared) == sorted(alone)
    # A float32 model: each rank's blocks sum other rows in float32 before the float64 sums.
    for key in (k for k in alone if k.endswith(("act_cov", "grad_cov"))):
        scale = float(alone[key].abs().max())
        torch.testing.assert_close(shared[key], alone[key], rtol=1e-5, atol=1e-5 * scale)
    assert not (directory / "cli" / PROGRESS_DIR).exists()
    assert launch.stdout.count("by 2 processes and saved to") == 1  # rank 0 alone writes


def _worker_main(work: str) -> None:
    work = Path(work)
    rank, world = init_distributed()
    assert world == 2
    engine = make_engine()
    held = {}
    for name, config in CONFIGS.items():
        curvature = engine.fit(config)
        held[name] = fingerprints(curvature)
        if rank == 0:
            curvature.save(work / "api" / name)
    (work / f"fingerprints.{rank}.json").write_text(json.dumps(held))
    engine.fit(CONFIGS["ekfac"], checkpoint_dir=work / "resume")
    assert main(["fit", *cli_model(work), "--out", str(work / "cli"), *CLI_FIT]) == 0


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])


@pytest.mark.parametrize("count, world", [(0, 2), (1, 3), (7, 2), (4096, 3), (10, 10)])
def test_each_rank_fits_one_consecutive_stretch_of_a_chunk(count, world):
    items = list(range(100, 100 + count))
    shares = [contiguous(items, rank, world) for rank in range(world)]
    assert [item for share in shares for item in share] == items  # each once, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in filter(None, shares):
        assert share == list(range(share[0], share[0] + len(share)))
