"""A fit keeps its progress chunk by chunk: killed or interrupted, the same call resumes it
and gives the curvature of an uninterrupted fit bit for bit; progress of another fit is
refused; a sampled fit budget draws a fixed, seeded, nested subset.

Run as a script, this file is the `fastinf fit` that the kill test launches, with every
training image read 30 ms slowly (so that the fit can be killed between chunks):
    python tests/test_fit_resume.py FIT_ARGS...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastinf.artifacts import ArtifactCorruptError, ArtifactMismatchError
from fastinf.cli import INTERRUPTED, main
from fastinf.config import CurvatureConfig, stored_curvature_config
from fastinf.curvature import checkpoint, passes
from fastinf.curvature.passes import PROGRESS_DIR, fit_examples
from fastinf.data import ImageTensorDataset
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.models import save_unet

from tiny import TinyConvEps, random_dataset, tiny_unet, undocumented

HERE = Path(__file__).resolve().parent
NUM_EXAMPLES = 11  # chunks of 3: 3, 3, 3, 2
SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}
CONFIGS = {
    "ekfac": CurvatureConfig(factor_draws=2, eigval_draws=2, chunk_examples=3),
    "kfac": CurvatureConfig("kfac", factor_draws=2, chunk_examples=3),
    "trak": CurvatureConfig("trak", factor_draws=2, projection_dim=24, chunk_examples=3),
}


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

    def __init__(self, dataset, stop_at: int | None = None):
        self.dataset, self.stop_at, self.reads = dataset, stop_at, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        self.reads += 1
        if self.reads == self.stop_at:
            raise KeyboardInterrupt
        return self.dataset[position]


def make_engine(stop_at: int | None = None, seed: int = 1) -> InfluenceEngine:
    torch.manual_seed(0)
    data = random_dataset(NUM_EXAMPLES, (2, 5, 5), seed=seed)
    return InfluenceEngine(
        TinyConvEps().double(), NoiseSchedule.linear(100, 1e-3, 0.2), Interrupting(data, stop_at)
    )


# The engine reads item 0 once, then every item for the dataset's fingerprint.
BEFORE_PASSES = 1 + NUM_EXAMPLES


def assert_identical(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def interrupted_fit(directory: Path, config: CurvatureConfig, stop_at: int) -> dict:
    """Fit until read `stop_at` raises Ctrl-C; return the progress record left behind."""
    with pytest.raises(KeyboardInterrupt):
        make_engine(stop_at).fit(config, checkpoint_dir=directory)
    return json.loads((directory / PROGRESS_DIR / "progress.json").read_text())


@pytest.mark.parametrize(
    ("name", "stop_at", "completed"),
    [
        ("ekfac", BEFORE_PASSES + 7, {"factors": [[0, 6]]}),
        (
            "ekfac",
            BEFORE_PASSES + NUM_EXAMPLES + 4,
            {"factors": [[0, 11]], "eigenvalues": [[0, 3]]},
        ),
        ("kfac", BEFORE_PASSES + 10, {"factors": [[0, 9]]}),
        ("trak", BEFORE_PASSES + 4, {"sketched_fisher": [[0, 3]]}),
    ],
)
def test_an_interrupted_fit_resumes_to_the_uninterrupted_curvature_bit_for_bit(
    tmp_path, name, stop_at, completed
):
    config = CONFIGS[name]
    record = interrupted_fit(tmp_path / "resumed", config, stop_at)
    assert {k: v["completed"] for k, v in record["passes"].items()} == completed
    resumed = make_engine().fit(config, checkpoint_dir=tmp_path / "resumed")
    expected = make_engine().fit(config)
    assert_identical(resumed.tensors(), expected.tensors())
    assert_identical(
        load_file(str(tmp_path / "resumed" / "curvature.safetensors")), expected.tensors()
    )
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "curvature.json",
        "curvature.safetensors",
    ]


def test_the_chunk_size_changes_only_the_summation_order(tmp_path):
    small = make_engine().fit(CONFIGS["ekfac"])
    whole = make_engine().fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    for name, layer in whole.layers.items():
        torch.testing.assert_close(small.layers[name].act_cov, layer.act_cov, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            small.layers[name].eigvals_weight, layer.eigvals_weight, rtol=1e-9, atol=1e-300
        )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"config": CurvatureConfig(factor_draws=2, eigval_draws=2, seed=5, chunk_examples=3)},
            "config.seed: 0 then, 5 now",
        ),
        (
            {
                "config": CurvatureConfig(
                    factor_draws=2, eigval_draws=2, fraction=0.5, chunk_examples=3
                )
            },
            "examples.count: 11 then, 6 now",
        ),
        ({"seed": 2}, "provenance.dataset"),
    ],
)
def test_progress_of_another_fit_is_refused_and_kept(tmp_path, change, named):
    interrupted_fit(tmp_path, CONFIGS["ekfac"], BEFORE_PASSES + 4)
    files = sorted((tmp_path / PROGRESS_DIR).iterdir())
    engine = make_engine(seed=change.get("seed", 1))
    with pytest.raises(ArtifactMismatchError, match="another fit") as error:
        engine.fit(change.get("config", CONFIGS["ekfac"]), checkpoint_dir=tmp_path)
    assert named in str(error.value)
    assert f"delete {tmp_path / PROGRESS_DIR}" in str(error.value)
    assert sorted((tmp_path / PROGRESS_DIR).iterdir()) == files


def test_a_damaged_record_is_named_not_used(tmp_path):
    interrupted_fit(tmp_path, CONFIGS["ekfac"], BEFORE_PASSES + 4)
    manifest = tmp_path / PROGRESS_DIR / "progress.json"
    record = json.loads(manifest.read_text())
    record["passes"]["factors"]["completed"] = [[0, 6]]
    manifest.write_text(json.dumps(record))
    with pytest.raises(ArtifactCorruptError, match="altered"):
        make_engine().fit(CONFIGS["ekfac"], checkpoint_dir=tmp_path)


def test_completion_deletes_only_the_fits_own_files(tmp_path):
    interrupted_fit(tmp_path, CONFIGS["ekfac"], BEFORE_PASSES + 4)
    (tmp_path / PROGRESS_DIR / "notes.txt").write_text("mine")
    (tmp_path / PROGRESS_DIR / "factors.999.safetensors.tmp").write_text("a killed save")
    make_engine().fit(CONFIGS["ekfac"], checkpoint_dir=tmp_path)
    assert [p.name for p in (tmp_path / PROGRESS_DIR).iterdir()] == ["notes.txt"]
    assert (tmp_path / "curvature.json").exists()


def test_the_fit_modules_are_documented():
    assert undocumented(passes) == [] and undocumented(checkpoint) == []


def test_the_fit_budget_draws_a_fixed_seeded_nested_subset():
    config = CurvatureConfig(fraction=0.25)
    subset = fit_examples(1000, config)
    assert len(subset) == 250 and subset == sorted(set(subset))
    assert subset == fit_examples(1000, config)
    assert set(fit_examples(1000, CurvatureConfig(fraction=0.1))) < set(subset)
    assert set(fit_examples(1000, CurvatureConfig(max_examples=40))) < set(subset)
    assert fit_examples(1000, CurvatureConfig(fraction=0.25, seed=1)) != subset
    assert fit_examples(1000, CurvatureConfig(fraction=0.5, max_examples=10)) == fit_examples(
        1000, CurvatureConfig(max_examples=10)
    )
    assert fit_examples(1000, CurvatureConfig(fraction=1.0)) == list(range(1000))
    chosen = fit_examples(1000, config, indices=range(500, 1000))
    assert len(chosen) == 125 and min(chosen) >= 500


def test_a_sampled_fit_is_the_fit_of_its_subset():
    config = CurvatureConfig(factor_draws=2, eigval_draws=2, max_examples=5, chunk_examples=3)
    subset = fit_examples(NUM_EXAMPLES, config)
    sampled = make_engine().fit(config)
    explicit = make_engine().fit(
        CurvatureConfig(factor_draws=2, eigval_draws=2, chunk_examples=3), indices=subset
    )
    assert_identical(sampled.tensors(), explicit.tensors())
    assert sampled.config.fingerprint()["max_examples"] == 5
    assert CurvatureConfig().fingerprint()["max_examples"] == 10_000  # the default cap
    # A fit of every example records no cap, and a record without one reads back as None
    # (curvatures saved before the cap existed keep meaning "every example").
    every = CurvatureConfig(max_examples=None)
    assert "max_examples" not in every.fingerprint()
    assert stored_curvature_config(every.fingerprint()) == every
    assert stored_curvature_config(sampled.config.fingerprint()).max_examples == 5
    # Below the cap, the default fits every example, in order.
    assert fit_examples(NUM_EXAMPLES, CurvatureConfig()) == list(range(NUM_EXAMPLES))


# -- the command line ----------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": SCHEDULE})
    images = random_dataset(24, (1, 4, 4), seed=2, dtype=torch.float32).images
    save_file({"images": images}, str(tmp_path / "train.safetensors"))
    model = ["--weights", str(tmp_path / "unet.safetensors")]
    fit = ["--factor-draws", "1", "--eigval-draws", "1", "--chunk-examples", "4"]
    return [*model, "--data", str(tmp_path / "train.safetensors"), *fit]


def _fit_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "FASTINF_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE / "test_fit_resume.py"), "fit", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_fastinf_fit_killed_with_sigkill_resumes_to_the_uninterrupted_curvature(files, tmp_path):
    fresh = _fit_process(*files, "--out", str(tmp_path / "fresh"))
    killed = _fit_process(*files, "--out", str(tmp_path / "resumed"))
    manifest = tmp_path / "resumed" / PROGRESS_DIR / "progress.json"
    deadline = time.monotonic() + 120
    while not manifest.exists():
        assert killed.poll() is None, killed.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "no chunk was finished in time"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    record = json.loads(manifest.read_text())
    done = [stop for entry in record["passes"].values() for _, stop in entry["completed"]]
    assert 4 <= sum(done) < 2 * 24 and all(stop % 4 == 0 for stop in done)
    assert not (tmp_path / "resumed" / "curvature.json").exists()

    resumed = _fit_process(*files, "--out", str(tmp_path / "resumed"))
    errors = {}
    for name, process in (("resumed", resumed), ("fresh", fresh)):
        errors[name] = process.communicate(timeout=300)[1].decode()
        assert process.returncode == 0, errors[name][-3000:]
    assert "resuming the fit" in errors["resumed"]
    got = load_file(str(tmp_path / "resumed" / "curvature.safetensors"))
    assert_identical(got, load_file(str(tmp_path / "fresh" / "curvature.safetensors")))
    assert not (tmp_path / "resumed" / PROGRESS_DIR).exists()


def test_fastinf_fit_interrupted_says_the_same_command_resumes(
    files, tmp_path, monkeypatch, capsys
):
    out = ["--out", str(tmp_path / "curv")]
    real = ImageTensorDataset.__getitem__
    reads = []

    def interrupting(self, position):
        reads.append(position)
        if len(reads) == 1 + 24 + 9:  # item 0, the fingerprint, 2 chunks and one more read
            raise KeyboardInterrupt
        return real(self, position)

    monkeypatch.setattr(ImageTensorDataset, "__getitem__", interrupting)
    assert main(["fit", *files, *out]) == 130
    assert f"interrupted; {INTERRUPTED['fit']}." in capsys.readouterr().err
    assert "the same command resumes" in INTERRUPTED["fit"]
    monkeypatch.setattr(ImageTensorDataset, "__getitem__", real)
    assert main(["fit", *files, *out]) == 0
    assert "examples done: factors 8/24" in capsys.readouterr().err


def _slow_fit(args: list[str]) -> int:
    real = ImageTensorDataset.__getitem__

    def slow(self, position):
        time.sleep(0.03)
        return real(self, position)

    ImageTensorDataset.__getitem__ = slow
    return main(args)


if __name__ == "__main__":
    sys.exit(_slow_fit(sys.argv[1:]))
