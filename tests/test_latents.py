"""The latent store: VAE latents equal a direct encode, a killed build resumes without
re-encoding finished shards, another VAE's store is refused, and an engine attributes in
latent space from it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from fastinf.artifacts import ArtifactCorruptError, ArtifactMismatchError
from fastinf.config import ScoreConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.latents import LatentStore, encode_images

from tiny import random_dataset


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """8×8 RGB images → 4×4×2 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=2,
        norm_num_groups=2,
        sample_size=8,
        scaling_factor=0.5,
    )


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def data():
    return random_dataset(7, (3, 8, 8), seed=4, dtype=torch.float32, labels=torch.arange(7) % 3)


def test_stored_latents_equal_a_direct_encode_and_keep_the_labels(tmp_path, vae, data):
    store = LatentStore.build(tmp_path / "lat", vae, data, shard_size=3, batch_size=2)
    latents = store.dataset()
    assert len(latents) == 7 and latents.sample_shape == (2, 4, 4)
    expected = encode_images(vae, data.images)
    direct = vae.encode(data.images).latent_dist.mean * 0.5
    torch.testing.assert_close(expected, direct.detach(), rtol=1e-6, atol=1e-6)
    for index in range(7):
        latent, label = latents[index]
        torch.testing.assert_close(latent, expected[index], rtol=1e-6, atol=1e-6)
        assert label == index % 3
    assert sorted(p.name for p in (tmp_path / "lat").glob("latents_*.safetensors")) == [
        "latents_00000.safetensors",
        "latents_00001.safetensors",
        "latents_00002.safetensors",
    ]
    LatentStore.open(tmp_path / "lat", vae).verify()


def test_a_killed_build_resumes_without_re_encoding_finished_shards(tmp_path, vae, data):
    class Failing(torch.utils.data.Dataset):  # dies when the encoding reaches item 5
        fail = True
        reads = 0

        def __len__(self):
            return len(data)

        def __getitem__(self, index):
            self.reads += index == 5
            if index == 5 and self.fail and self.reads == 2:  # read 1: the fingerprint
                raise KeyboardInterrupt
            return data[index]

    failing = Failing()
    with pytest.raises(KeyboardInterrupt):
        LatentStore.build(tmp_path / "lat", vae, failing, shard_size=3)
    first = tmp_path / "lat" / "latents_00000.safetensors"
    stamp = first.stat().st_mtime_ns
    with pytest.raises(ArtifactCorruptError, match="unfinished"):
        LatentStore.open(tmp_path / "lat")
    failing.fail = False
    store = LatentStore.build(tmp_path / "lat", vae, failing, shard_size=3)
    assert first.stat().st_mtime_ns == stamp  # kept, not re-encoded
    reference = LatentStore.build(tmp_path / "ref", vae, data, shard_size=3)
    assert store.manifest["shards"] == reference.manifest["shards"]  # byte-identical shards


def test_another_vae_or_dataset_is_refused_and_nothing_is_overwritten(tmp_path, vae, data):
    LatentStore.build(tmp_path / "lat", vae, data, shard_size=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "lat").iterdir()}
    other = tiny_vae(seed=1)
    with pytest.raises(ArtifactMismatchError, match=r"another VAE.*new folder"):
        LatentStore.open(tmp_path / "lat", other)
    with pytest.raises(ArtifactMismatchError, match="another VAE"):
        LatentStore.build(tmp_path / "lat", other, data, shard_size=4)
    changed = random_dataset(7, (3, 8, 8), seed=5, dtype=torch.float32)
    with pytest.raises(ArtifactMismatchError, match="another dataset"):
        LatentStore.build(tmp_path / "lat", vae, changed, shard_size=4)
    after = {p.name: p.read_bytes() for p in (tmp_path / "lat").iterdir() if p.name in before}
    assert after == before


def test_an_altered_shard_is_named(tmp_path, vae, data):
    store = LatentStore.build(tmp_path / "lat", vae, data, shard_size=4)
    shard = tmp_path / "lat" / "latents_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactCorruptError, match=r"latents_00001\.safetensors"):
        store.verify()
    manifest = json.loads((tmp_path / "lat" / "latents.json").read_text())
    assert manifest["complete"] is True


def test_an_engine_attributes_in_latent_space_from_the_store(tmp_path, vae, data):
    store = LatentStore.build(tmp_path / "lat", vae, data, shard_size=3)
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=4,
        in_channels=2,
        out_channels=2,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
    )
    config = ScoreConfig(train_draws=2, query_draws=2)
    engine = InfluenceEngine(unet, NoiseSchedule.linear(100), store.dataset(), config=config)
    assert engine.sample_shape == (2, 4, 4)
    assert engine.provenance["dataset"] == store.dataset().fingerprint()
    grads = engine.train_gradients([0, 6])
    assert all(weight.shape[0] == 2 for weight, _ in grads.values())
    query = encode_images(vae, data.images[:1])
    assert engine.query_gradients(query)  # a query encoded the same way is scored
