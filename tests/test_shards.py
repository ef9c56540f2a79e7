"""Training images streamed from image folders and webdataset tar shards (map-style)."""

from __future__ import annotations

import builtins
import gzip
import io
import json
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import fastinf.shard_files as shard_files
import fastinf.shards as shards
from fastinf.artifacts import dataset_fingerprint
from fastinf.cli import main
from fastinf.config import ScoreConfig
from fastinf.data import UNCONDITIONAL, ImageTensorDataset
from fastinf.distributed import owned
from fastinf.gradients import example_blocks
from fastinf.index.store import BuildPlan
from fastinf.models import save_unet
from fastinf.shard_files import expand_braces
from fastinf.shards import ImageFolderDataset, TarShardDataset, open_image_data
from fastinf.source import GradientSource

from tiny import TinyConvEps, run_cli, tiny_unet, undocumented

SIZE = 6  # images are SIZE × SIZE pixels


def pixels(count: int, channels: int = 1, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """[count, H, W] (grey) or [count, H, W, 3] uint8 pixels covering 0..255."""
    shape = (count, size, size) if channels == 1 else (count, size, size, 3)
    values = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    values.reshape(count, -1)[:, :2] = (0, 255)
    return values


def encode(image: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=kind)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(folder, images: np.ndarray, labels=None, per_shard: int = 4) -> list:
    """`folder/shard-00000k.tar`, `per_shard` examples each: KEY.png and KEY.cls."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(images), per_shard)):
        paths.append(folder / f"shard-{number:06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for n in range(start, min(start + per_shard, len(images))):
                add_member(tar, f"{n:06d}.png", encode(images[n]))
                if labels is not None:
                    add_member(tar, f"{n:06d}.cls", f"{labels[n]}\n".encode())
                add_member(tar, f"{n:06d}.json", b'{"note": "not read"}')
    return paths


def write_folder(root, images: np.ndarray, labels=None) -> None:
    """`root/<class>/*.png` (class folder names sort as the labels), or flat."""
    for n, image in enumerate(images):
        folder = root if labels is None else root / f"class_{labels[n]:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:06d}.png").write_bytes(encode(image))


def as_model_range(images: np.ndarray) -> torch.Tensor:
    """The oracle: [N, C, H, W] float32 p / 127.5 − 1."""
    tensor = torch.from_numpy(images).to(torch.float32)
    tensor = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
    return tensor / 127.5 - 1


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_public_names_are_pinned_and_documented():
    assert sorted(shards.__all__) == sorted(
        [
            "ImageFolderDataset",
            "StoredImageDataset",
            "TarShardDataset",
            "decode_image",
            "open_image_data",
        ]
    )
    assert undocumented(shards) == [] and undocumented(shard_files) == []


def test_brace_patterns_expand_like_webdataset_and_bad_ones_are_named():
    assert expand_braces("d/shard-{000008..000010}.tar") == [
        "d/shard-000008.tar",
        "d/shard-000009.tar",
        "d/shard-000010.tar",
    ]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("s-{0..2.tar", "s-{x}.tar", "s-{{0..1}}.tar"):
        with pytest.raises(ValueError, match=r"brace|group|nested"):
            expand_braces(bad)


@pytest.mark.parametrize("layout", ["tars", "classes", "flat"])
@pytest.mark.parametrize("channels", [1, 3])
def test_items_are_the_stored_pixels_in_the_model_range(tmp_path, cache, layout, channels):
    images = pixels(7, channels)
    labels = [3, 0, 0, 2, 2, 2, 0] if layout != "flat" else None
    if layout == "tars":
        write_tars(tmp_path / "data", images, labels, per_shard=3)
    else:
        write_folder(tmp_path / "data", images, labels)
    shape = (channels, SIZE, SIZE)
    dataset = open_image_data(tmp_path / "data", shape, index_cache=cache)
    assert isinstance(dataset, TarShardDataset if layout == "tars" else ImageFolderDataset)
    if layout == "classes":  # examples are numbered class folder by class folder
        order = sorted(range(7), key=lambda n: (labels[n], n))
        assert dataset.shard_bounds == [(0, 3), (3, 6), (6, 7)]
    else:
        order = list(range(7))
    assert len(dataset) == 7 and dataset.sample_shape == shape
    expected = as_model_range(images[order])
    for position, n in enumerate(order):
        image, cond = dataset[position]
        assert image.dtype == torch.float32 and image.shape == shape
        torch.testing.assert_close(image, expected[position], rtol=0, atol=1e-6)
        if labels is None:
            assert cond == UNCONDITIONAL
        else:
            # Class folders are numbered by sorted name: class_00, class_02, class_03 → 0, 1, 2.
            label = sorted(set(labels)).index(labels[n]) if layout == "classes" else labels[n]
            assert cond.dtype == torch.int64 and int(cond) == label
    if layout == "tars":
        assert dataset.shard_bounds == [(0, 3), (3, 6), (6, 7)] and dataset.shard_size == 3
        assert [dataset.shard_of(i) for i in (0, 2, 3, 6)] == [0, 0, 1, 2]
    # Nothing was written beside the data; the tar index cache is in fastinf's folder.
    assert {p.suffix for p in (tmp_path / "data").rglob("*") if p.is_file()} <= {".tar", ".png"}


def test_a_jpeg_member_reads_as_its_decoded_pixels(tmp_path, cache):
    image = pixels(1, 3)[0]
    data = encode(image, "JPEG")
    tmp_path.joinpath("data").mkdir()
    with tarfile.open(tmp_path / "data" / "one.tar", "w") as tar:
        add_member(tar, "photos/cat.0001.jpg", data)
    dataset = TarShardDataset(tmp_path / "data", (3, SIZE, SIZE), index_cache=cache)
    decoded = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    torch.testing.assert_close(dataset[0][0], as_model_range(decoded[None])[0], rtol=0, atol=1e-6)


def test_shard_indexes_are_cached_in_fastinf_folder_and_rescanned_when_a_shard_changes(
    tmp_path, cache, monkeypatch
):
    paths = write_tars(tmp_path / "data", pixels(8), per_shard=4)
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    first = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    assert len(list((cache / "tar_index").glob("*.json"))) == 2
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before
    scanned = []
    real_scan = shard_files.scan_shard
    monkeypatch.setattr(
        shard_files, "scan_shard", lambda path: scanned.append(path) or real_scan(path)
    )
    again = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    assert scanned == [] and torch.equal(again[5][0], first[5][0])
    write_tars(tmp_path / "new", pixels(5, seed=7), per_shard=5)
    shutil.copy(tmp_path / "new" / "shard-000000.tar", paths[1])  # another shard, same name
    changed = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    assert scanned == [paths[1]] and len(changed) == 9
    expected = as_model_range(pixels(5, seed=7))[4]
    torch.testing.assert_close(changed[8][0], expected, rtol=0, atol=1e-6)


def test_mismatched_images_are_refused_by_name_unless_asked_to_adapt(tmp_path, cache):
    images = pixels(4)
    paths = write_tars(tmp_path / "data", images, per_shard=2)
    with tarfile.open(paths[1], "a") as tar:
        add_member(tar, "big.png", encode(pixels(1, size=SIZE + 2)[0]))
    strict = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    with pytest.raises(ValueError, match=r"member big\.png of shard .*shard-000001\.tar is 8×8"):
        strict[4]
    with pytest.raises(ValueError, match="resize=True"):
        strict.check()
    resized = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), resize=True, index_cache=cache)
    assert resized.check() == 5 and resized[4][0].shape == (1, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"is a L image but .* 3 channel.*convert=True"):
        TarShardDataset(tmp_path / "data", (3, SIZE, SIZE), index_cache=cache)[0]
    rgb = TarShardDataset(tmp_path / "data", (3, SIZE, SIZE), convert=True, index_cache=cache)
    image = rgb[1][0]
    assert image.shape == (3, SIZE, SIZE) and torch.equal(image[0], image[2])
    torch.testing.assert_close(image[1], as_model_range(images)[1, 0], rtol=0, atol=1e-6)


def test_an_unreadable_image_is_named_with_its_shard_by_the_quick_check(tmp_path, cache):
    write_tars(tmp_path / "data", pixels(6), per_shard=3)
    with tarfile.open(tmp_path / "data" / "shard-000002.tar", "w") as tar:
        add_member(tar, "broken.png", encode(pixels(1)[0])[:40])
    dataset = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    assert dataset.check(count=1) == 1  # example 0 is fine
    with pytest.raises(ValueError, match=r"member broken\.png of shard .*shard-000002\.tar is not"):
        dataset.check()
    folder = tmp_path / "folder"
    write_folder(folder, pixels(2))
    (folder / "000001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"image .*000001\.png is not a readable image"):
        ImageFolderDataset(folder, (1, SIZE, SIZE))[1]


def test_bad_layouts_are_refused_with_the_fix(tmp_path, cache):
    shape = (1, SIZE, SIZE)
    write_tars(tmp_path / "data", pixels(8), per_shard=4)
    pattern = str(tmp_path / "data" / "shard-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match=r"2 of 4 tar shards do not exist .*shard-000002"):
        TarShardDataset(pattern, shape, index_cache=cache)
    gz = tmp_path / "gz" / "shard.tar"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress((tmp_path / "data" / "shard-000000.tar").read_bytes()))
    with pytest.raises(ValueError, match=r"uncompressed tar.*gunzip"):
        TarShardDataset(gz, shape, index_cache=cache)
    mixed = tmp_path / "mixed"
    write_tars(mixed, pixels(4), labels=[1, 2, 3, 4], per_shard=2)
    with tarfile.open(mixed / "shard-000001.tar", "a") as tar:
        add_member(tar, "extra.png", encode(pixels(1)[0]))
    with pytest.raises(ValueError, match=r"extra\.png of shard .* no extra\.cls label"):
        TarShardDataset(mixed, shape, index_cache=cache)
    with tarfile.open(tmp_path / "data" / "shard-000001.tar", "a") as tar:
        add_member(tar, "000099.cls", b"three")
    with pytest.raises(ValueError, match=r"000099\.cls of shard .* not a class label"):
        TarShardDataset(tmp_path / "data", shape, index_cache=cache)
    both = tmp_path / "both"
    write_folder(both, pixels(2))
    write_folder(both, pixels(2), labels=[0, 1])
    with pytest.raises(ValueError, match="both directly and in subfolders"):
        ImageFolderDataset(both, shape)
    (both / "class_00").rename(tmp_path / "moved")
    for name in ("000000.png", "000001.png"):
        (both / name).unlink()
    (both / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty holds no images"):
        ImageFolderDataset(both, shape)
    (both / "shard.tar").write_bytes((tmp_path / "data" / "shard-000000.tar").read_bytes())
    (both / "stray.png").write_bytes(encode(pixels(1)[0]))
    with pytest.raises(ValueError, match=r"both \.tar shards and image files"):
        open_image_data(both, shape)


def test_two_workers_stream_the_same_blocks_as_none_and_the_dataset_pickles(tmp_path, cache):
    labels = [n % 3 for n in range(10)]
    write_tars(tmp_path / "data", pixels(10), labels, per_shard=4)
    dataset = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    dataset[9]  # leaves a shard open in this process: a copy must not carry it
    alone = list(example_blocks(dataset, 3, [9, 0, 4, 5, 1, 8, 2]))
    workers = list(example_blocks(dataset, 3, [9, 0, 4, 5, 1, 8, 2], num_workers=2))
    assert [b.ids.tolist() for b in alone] == [[9, 0, 4], [5, 1, 8], [2]]
    for one, other in zip(alone, workers, strict=True):
        assert torch.equal(one.ids, other.ids) and torch.equal(one.images, other.images)
        assert torch.equal(one.cond, other.cond)
    assert alone[0].cond.tolist() == [0, 0, 1]
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[7][0], dataset[7][0]) and copy.fingerprint() == dataset.fingerprint()


def opened_shards(dataset, ranges, monkeypatch) -> set[str]:
    """Names of the .tar files a fresh copy of `dataset` opens to read the example ranges."""
    fresh = pickle.loads(pickle.dumps(dataset))  # as a new rank or worker: nothing open
    opened = set()
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        if str(file).endswith(".tar"):
            opened.add(str(file).rsplit("/", 1)[-1])
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", recording_open)
        for start, stop in ranges:
            for _ in example_blocks(fresh, 3, range(start, stop)):
                pass
    return opened


def test_each_simulated_rank_opens_only_its_own_shards_when_ranges_are_aligned(
    tmp_path, cache, monkeypatch
):
    write_tars(tmp_path / "data", pixels(22), per_shard=4)  # 6 shards: 5 of 4, 1 of 2
    dataset = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    assert dataset.shard_size == 4
    name = "shard-{:06d}.tar".format
    # Index shards of 8 rows (a multiple of 4) dealt to 2 ranks as the index build deals them.
    plan = BuildPlan(len(dataset), shard_size=8)
    per_rank = [
        opened_shards(
            dataset, [(s.start, s.stop) for s in owned(plan.shards(), rank, 2)], monkeypatch
        )
        for rank in range(2)
    ]
    assert per_rank == [{name(0), name(1), name(4), name(5)}, {name(2), name(3)}]
    # Misaligned (6 rows): a data shard cut by an index shard boundary is read by both ranks.
    plan = BuildPlan(len(dataset), shard_size=6)
    per_rank = [
        opened_shards(
            dataset, [(s.start, s.stop) for s in owned(plan.shards(), rank, 2)], monkeypatch
        )
        for rank in range(2)
    ]
    assert per_rank[0] & per_rank[1] == {name(1), name(4)}


def test_the_fingerprint_reads_without_decoding_and_changes_with_any_image(
    tmp_path, cache, monkeypatch
):
    images = pixels(70)
    write_folder(tmp_path / "a", images)
    folder = ImageFolderDataset(tmp_path / "a", (1, SIZE, SIZE))
    full, sample = folder.fingerprint(), folder.fingerprint("sample")
    assert full.startswith("full:") and sample.startswith("sample:")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the same data elsewhere
    assert ImageFolderDataset(tmp_path / "moved", (1, SIZE, SIZE)).fingerprint() == full
    monkeypatch.setattr(shards, "decode_image", lambda *args, **kwargs: 1 / 0)
    assert folder.fingerprint() == full  # stored bytes are hashed; nothing is decoded
    monkeypatch.undo()
    # Example 6 is not among the 64 sampled: its size (in the index) still changes "sample".
    (tmp_path / "a" / "000006.png").write_bytes(encode(np.zeros((SIZE, SIZE), np.uint8)))
    edited = ImageFolderDataset(tmp_path / "a", (1, SIZE, SIZE))
    assert edited.fingerprint() != full and edited.fingerprint("sample") != sample
    assert ImageFolderDataset(tmp_path / "a", (1, SIZE, SIZE), resize=True).fingerprint() != (
        edited.fingerprint()
    )
    write_tars(tmp_path / "tars", images[:9], per_shard=4)
    tars = TarShardDataset(tmp_path / "tars", (1, SIZE, SIZE), index_cache=cache)
    assert (
        tars.fingerprint()
        != TarShardDataset(
            tmp_path / "tars" / "shard-{000000..000001}.tar", (1, SIZE, SIZE), index_cache=cache
        ).fingerprint()
    )
    # The engine's fingerprint uses the dataset's own (stored bytes, no decoding), which
    # differs from the generic one of the same decoded items.
    same_items = ImageTensorDataset(as_model_range(images[:9]))
    assert dataset_fingerprint(tars) == tars.fingerprint()
    assert dataset_fingerprint(tars, "sample") == tars.fingerprint("sample")
    assert dataset_fingerprint(tars) != dataset_fingerprint(same_items)


def test_gradients_of_streamed_images_are_those_of_the_same_tensors(tmp_path, cache, schedule):
    images, labels = pixels(7), [2, 0, 1, 1, 0, 2, 1]
    write_tars(tmp_path / "data", images, labels, per_shard=3)
    streamed = TarShardDataset(tmp_path / "data", (1, SIZE, SIZE), index_cache=cache)
    in_memory = ImageTensorDataset(as_model_range(images), torch.tensor(labels))
    config = ScoreConfig(train_draws=2, block_size=3)
    model = TinyConvEps(sample_shape=(1, SIZE, SIZE)).double()
    sources = [GradientSource(model, schedule, data, config) for data in (streamed, in_memory)]
    got, expected = (source.train_gradients([6, 0, 3]) for source in sources)
    for name, (weight, bias) in expected.items():
        torch.testing.assert_close(got[name][0], weight, rtol=1e-12, atol=1e-14)
        if bias is not None:
            torch.testing.assert_close(got[name][1], bias, rtol=1e-12, atol=1e-14)
    blocks = [source.train_blocks(block_size=7) for source in sources]
    assert torch.equal(next(blocks[0]).cond, next(blocks[1]).cond)


def test_the_cli_fits_on_a_shard_pattern_read_at_the_model_shape(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("FASTINF_CACHE", str(cache))
    weights = tmp_path / "unet.safetensors"
    schedule = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4}
    save_unet(tiny_unet().float(), weights, {"schedule": {**schedule, "beta_end": 0.02}})
    write_tars(tmp_path / "data", pixels(6, size=4), per_shard=3)
    pattern = str(tmp_path / "data" / "shard-{000000..000001}.tar")
    fit = ["fit", "--weights", str(weights), "--factor-draws", "1", "--eigval-draws", "1"]
    assert main([*fit, "--data", pattern, "--out", str(tmp_path / "curvature")]) == 0
    # The curvature was fitted on these shards, read at the UNet's (1, 4, 4) (the gradients
    # of streamed images are those of the same tensors: tested above).
    record = json.loads((tmp_path / "curvature" / "curvature.json").read_text())
    streamed = TarShardDataset(pattern, (1, 4, 4), index_cache=cache)
    assert record["provenance"]["dataset"] == dataset_fingerprint(streamed)
    assert len(list((cache / "tar_index").glob("*.json"))) == 2  # in $FASTINF_CACHE
    assert sorted(p.suffix for p in (tmp_path / "data").iterdir()) == [".tar", ".tar"]


def test_the_cli_refuses_missing_shards_before_importing_torch(tmp_path):
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    code, error, loaded = run_cli("fit", "--data", pattern, "--out", str(tmp_path / "out"))
    assert code == 2 and loaded == []
    assert "--data 3 of 3 tar shards do not exist" in error
    code, error, _ = run_cli("fit", "--data", str(tmp_path / "none"), "--out", str(tmp_path))
    assert code == 2 and "--data" in error and "no such folder" in error
