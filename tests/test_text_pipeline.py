"""Text-to-image latent pipelines: a tiny Stable-Diffusion-layout pipeline, built from configs
in a temporary folder, with an image folder and metadata.jsonl, attributed from Python and
from the command line; captions cached, LoRA-only attribution, and the bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_gradients import assert_example_gradients, autograd_example_gradient

from fastinf.artifacts import ArtifactMismatchError
from fastinf.cli import main
from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.engine import InfluenceEngine
from fastinf.latents import LatentStore, encode_images
from fastinf.layers import find_layers
from fastinf.models import DiffusersCrossAttentionEpsModel, as_eps_model
from fastinf.pipeline import load_lora, load_pipeline
from fastinf.shards import ImageFolderDataset
from fastinf.text import CaptionCache

from tiny import captioned_folder, tiny_sd_pipeline

SCORE = ScoreConfig(train_draws=2, query_draws=3, damping=1e-3, damping_mode="absolute")
LORA_TARGETS = ["to_q", "to_k", "to_v"]


def _add_lora(unet, seed=1):
    """A rank-2 LoRA on the attention projections with random (non-zero) A and B, as after
    fine-tuning; every base weight frozen."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return unet


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_pipeline")
    pipe = tiny_sd_pipeline(root / "pipe")
    data = captioned_folder(root / "data", count=8)
    queries = captioned_folder(root / "queries", count=2, seed=5)
    pipeline = load_pipeline(pipe)
    _add_lora(pipeline.model.unet).save_lora_adapter(str(root / "lora"))
    return {"root": root, "pipe": pipe, "data": data, "queries": queries, "lora": root / "lora"}


@pytest.fixture(scope="module")
def pipeline(folders):
    return load_pipeline(folders["pipe"])


@pytest.fixture(scope="module")
def store(folders, pipeline, tmp_path_factory):
    data = ImageFolderDataset(folders["data"], pipeline.image_shape)
    return pipeline.latent_store(data, tmp_path_factory.mktemp("store"), shard_size=3)


def test_the_pipeline_folder_loads_as_its_parts(pipeline):
    assert isinstance(pipeline.model, DiffusersCrossAttentionEpsModel)
    assert pipeline.image_shape == (1, 8, 8) and pipeline.latent_shape == (2, 4, 4)
    assert pipeline.schedule.num_timesteps == 100
    assert not any(p.requires_grad for p in pipeline.prompts.text_encoder.parameters())
    layers = find_layers(pipeline.model)
    assert not any("text_encoder" in name or "vae" in name for name in layers)


def test_store_latents_equal_a_direct_vae_encode_and_captions_their_states(
    folders, pipeline, store
):
    data = ImageFolderDataset(folders["data"], pipeline.image_shape)
    images = torch.stack([data[i][0] for i in range(len(data))])
    direct = encode_images(pipeline.vae, images)
    states = pipeline.prompts.encode(data.captions)
    dataset = store.dataset()
    for index in range(len(data)):
        latent, cond = dataset[index]
        torch.testing.assert_close(latent, direct[index], rtol=0, atol=1e-6)
        torch.testing.assert_close(cond, states[index], rtol=0, atol=1e-6)
    assert LatentStore.open(store.directory, pipeline.vae, pipeline.prompts).manifest["text"]


def test_the_same_caption_always_reads_the_same_states(pipeline, tmp_path):
    cache = CaptionCache(tmp_path / "captions", pipeline.prompts, shard_size=2)
    first = cache.states(["digit 1", "digit 2", "digit 1", "a b c"])
    assert len(cache) == 3 and torch.equal(first[0], first[2])
    shards = sorted(path.name for path in (tmp_path / "captions").glob("*.safetensors"))
    reopened = CaptionCache(tmp_path / "captions", pipeline.prompts)
    again = reopened.states(["a b c", "digit 1"])  # read back, nothing encoded again
    assert sorted(path.name for path in (tmp_path / "captions").glob("*.safetensors")) == shards
    assert torch.equal(again[0], first[3]) and torch.equal(again[1], first[0])
    torch.testing.assert_close(again[1], pipeline.prompts.encode(["digit 1"])[0])
    assert not torch.equal(first[0], first[1])


def test_a_caption_cache_of_another_text_encoder_is_refused(folders, pipeline, tmp_path):
    CaptionCache(tmp_path / "captions", pipeline.prompts).states(["digit 1"])
    other = load_pipeline(folders["pipe"])
    with torch.no_grad():
        next(other.prompts.text_encoder.parameters()).add_(1.0)
    other.prompts._fingerprint = None
    with pytest.raises(ArtifactMismatchError, match="another text encoder"):
        CaptionCache(tmp_path / "captions", other.prompts)


def test_a_latent_store_of_another_vae_is_refused(folders, pipeline, store):
    other = load_pipeline(folders["pipe"])
    with torch.no_grad():
        next(other.vae.parameters()).add_(1.0)
    with pytest.raises(ArtifactMismatchError, match="another VAE"):
        LatentStore.open(store.directory, other.vae)
    data = ImageFolderDataset(folders["data"], pipeline.image_shape)
    before = sorted(path.stat().st_mtime_ns for path in store.directory.iterdir())
    with pytest.raises(ArtifactMismatchError, match="another VAE"):
        other.latent_store(data, store.directory, shard_size=3)
    assert sorted(path.stat().st_mtime_ns for path in store.directory.iterdir()) == before


def test_a_prompt_steers_the_scores(pipeline, store):
    engine = InfluenceEngine(pipeline.model, pipeline.schedule, store.dataset(), config=SCORE)
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    queries = pipeline.generate(["digit 1"], 2, seed=0, steps=3)
    assert queries.shape == (2, *pipeline.latent_shape)
    one = engine.score(
        queries, 3, cond=pipeline.prompts.encode(["digit 1"] * 2), return_scores=True
    )
    same = engine.score(
        queries, 3, cond=pipeline.prompts.encode(["digit 1"])[0], return_scores=True
    )
    other = engine.score(queries, 3, cond=pipeline.prompts.encode(["zz"] * 2), return_scores=True)
    assert torch.equal(one.scores, same.scores)
    assert not torch.allclose(one.scores, other.scores)


def test_lora_only_gradients_match_autograd_and_leave_the_base_out(folders, store):
    pipeline = load_pipeline(folders["pipe"], lora=folders["lora"])
    model = pipeline.model.double()
    engine = InfluenceEngine(model, pipeline.schedule, store.dataset(), config=SCORE, layers="lora")
    assert engine.layers and all(".lora_" in name for name in engine.layers)
    assert {name.split(".lora_")[1][0] for name in engine.layers} == {"A", "B"}
    indices = [5, 0]
    grads = engine.train_gradients(indices)
    for row, index in enumerate(indices):
        latent, states = engine.train_set[index]
        expected = autograd_example_gradient(
            model, pipeline.schedule, latent.double(), states.double(), index, 2, 0
        )
        # θ is the adapter: every trainable weight is a LoRA weight (bias-free), each tracked.
        assert all(".lora_" in name for name in expected) and len(expected) == len(grads)
        assert_example_gradients(grads, row, expected)


def test_a_peft_wrapped_unet_is_unwrapped_to_its_lora_layers(folders):
    unet = load_pipeline(folders["pipe"]).model.unet
    unet.requires_grad_(False)
    wrapped = get_peft_model(unet, LoraConfig(r=2, target_modules=["to_k"]))
    model = as_eps_model(wrapped)
    assert isinstance(model, DiffusersCrossAttentionEpsModel)
    layers = find_layers(model, "lora")
    assert layers and all("to_k.lora_" in name for name in layers)
    assert set(find_layers(model)) == set(layers)  # the frozen base is not part of θ


def test_a_model_without_lora_asked_for_lora_is_refused(pipeline):
    with pytest.raises(ValueError, match="no trainable lora_A / lora_B"):
        find_layers(pipeline.model, "lora")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        load_lora(pipeline.model.unet, pipeline.directory)


def _cli(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fit_index_topk_on_a_pipeline_folder(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTINF_CACHE", str(tmp_path / "cache"))
    model = ["--pipeline", folders["pipe"], "--data", folders["data"]]
    curvature, index = tmp_path / "curvature", tmp_path / "index"
    draws = ["--factor-draws", "2", "--eigval-draws", "2"]
    assert _cli(capsys, "fit", *model, "--out", curvature, *draws)[0] == 0
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 1  # the store, cached
    assert _cli(capsys, "index", *model, "--curvature", curvature, "--out", index)[0] == 0
    code, out, err = _cli(
        capsys, "topk", *model, "--curvature", curvature, "--prompt", "digit 1",
        "--generate", "2", "--sample-steps", "3", "--k", "3",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert len(result["proponents"]["indices"]) == 2
    assert all(0 <= i < 8 for row in result["proponents"]["indices"] for i in row)
    code, out, err = _cli(
        capsys, "topk", *model, "--curvature", curvature, "--queries", folders["queries"],
        "--index", index, "--k", "2", "--html", tmp_path / "report.html",
    )  # fmt: skip
    assert code == 0, err
    assert len(json.loads(out)["opponents"]["indices"]) == 2
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 * (1 + 2 + 2)  # decoded queries + top-k


def test_lora_fit_on_the_command_line(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTINF_CACHE", str(tmp_path / "cache"))
    model = ["--pipeline", folders["pipe"], "--data", folders["data"]]
    out = tmp_path / "curvature"
    code, stdout, err = _cli(
        capsys, "fit", *model, "--lora", folders["lora"], "--layers", "lora", "--out", out,
        "--factor-draws", "1", "--eigval-draws", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "lora_A" in stdout and "attn1.to_q.weight" not in stdout
    code, _, err = _cli(capsys, "fit", *model, "--layers", "lora", "--out", tmp_path / "x")
    assert code == 2 and "no trainable lora_A / lora_B" in err
    assert "encoding" not in err  # refused before any encoding


def test_a_pipeline_missing_a_component_is_named(folders, tmp_path, capsys):
    broken = tmp_path / "pipe"
    shutil.copytree(folders["pipe"], broken)
    shutil.rmtree(broken / "vae")
    code, _, err = _cli(
        capsys, "fit", "--pipeline", broken, "--data", folders["data"], "--out", tmp_path / "c"
    )
    assert code == 2 and "has no vae/ folder" in err and "save_pretrained" in err
    assert len(err.strip().splitlines()) == 1


def test_a_caption_missing_from_metadata_is_named(folders, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folders["data"], data)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"003\.png has no caption in .*metadata\.jsonl"):
        ImageFolderDataset(data, (1, 8, 8))
    (data / "metadata.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ImageFolderDataset(data, (1, 8, 8))


def test_an_unreadable_image_is_named_and_finished_shards_are_kept(
    folders, pipeline, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FASTINF_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(folders["data"], data)
    (data / "006.png").write_bytes(b"not a png")
    folder = ImageFolderDataset(data, pipeline.image_shape)
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"006\.png"):
        pipeline.latent_store(folder, store, shard_size=3)
    kept = sorted(path.name for path in store.glob("latents_*.safetensors"))
    assert kept == ["latents_00000.safetensors", "latents_00001.safetensors"]
    code, _, err = _cli(
        capsys, "fit", "--pipeline", folders["pipe"], "--data", data, "--out", tmp_path / "c"
    )
    assert code == 2 and "006.png" in err


def test_fit_on_a_pipeline_under_torchrun_matches_one_process(
    folders, tmp_path, capsys, monkeypatch
):
    """Rank 0 encodes the latent store while the other rank waits, then both fit."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    model = ["--pipeline", str(folders["pipe"]), "--data", str(folders["data"])]
    draws = ["--factor-draws", "1", "--eigval-draws", "1"]
    env = {
        **os.environ,
        "FASTINF_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "FASTINF_CACHE": str(tmp_path / "cache"),
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, "-m", "fastinf", "fit", *model, "--out", str(tmp_path / "shared")]
    done = subprocess.run([*command, *draws], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("by 2 processes and saved to") == 1
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 1
    monkeypatch.setenv("FASTINF_CACHE", str(tmp_path / "cache"))  # the store rank 0 made
    code, _, err = _cli(capsys, "fit", *model, "--out", tmp_path / "alone", *draws)
    assert code == 0, err
    alone = load_file(str(tmp_path / "alone" / "curvature.safetensors"))
    shared = load_file(str(tmp_path / "shared" / "curvature.safetensors"))
    assert sorted(shared) == sorted(alone)
    for key in (k for k in alone if k.endswith(("act_cov", "grad_cov"))):
        scale = float(alone[key].abs().max())
        torch.testing.assert_close(shared[key], alone[key], rtol=1e-5, atol=1e-5 * scale)
