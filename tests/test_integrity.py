"""Integrity: an artifact's checksum covers its metadata, and the dataset fingerprint covers
every item (or says that it sampled)."""

import hashlib
import json

import pytest
import torch

from fastinf import artifacts
from fastinf.artifacts import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    check_provenance,
    dataset_fingerprint,
    load_artifact,
    save_artifact,
)
from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.data import ImageTensorDataset
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine

from tiny import TinyConvEps, random_dataset

CONFIG = ScoreConfig(train_draws=2, query_draws=2, damping=1e-3)
SHAPE = (2, 5, 5)
# A sampled fingerprint reads 64 evenly spaced items; of 200 those are 0, 3, 6, 9, 13, ...,
# so a change to item 1 is one that only a full pass sees.
NUM_ITEMS, UNSAMPLED = 200, 1


def _engine(train_set) -> InfluenceEngine:
    torch.manual_seed(0)
    return InfluenceEngine(
        TinyConvEps().double(), NoiseSchedule.linear(50), train_set, config=CONFIG
    )


def _one_pixel_changed(dataset: ImageTensorDataset, item: int) -> ImageTensorDataset:
    """A copy of `dataset` whose item `item` differs in one pixel by one ulp."""
    images = dataset.images.clone()
    pixel = images[item, 0, -1, -1]
    images[item, 0, -1, -1] = torch.nextafter(pixel, pixel + 1)
    return ImageTensorDataset(images, dataset.labels.clone() if dataset.conditional else None)


@pytest.fixture
def saved(tmp_path):
    """A curvature fitted on NUM_ITEMS random items and saved: (engine, its directory)."""
    engine = _engine(random_dataset(NUM_ITEMS, SHAPE))
    engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
    engine.save_curvature(tmp_path)
    return engine, tmp_path


def _edit_record(directory, edit) -> None:
    path = directory / "curvature.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


@pytest.mark.parametrize(
    "edit",
    [
        lambda record: record["config"].update(factor_draws=64),
        lambda record: record["config"].update(strategy="kfac"),
        lambda record: record["provenance"].update(dataset="full:0000000000000000"),
        lambda record: record["layers"].reverse(),
        lambda record: record.update(note="hand-written"),
        lambda record: record.pop("manifest_sha256"),
    ],
    ids=["factor_draws", "strategy", "provenance", "layers", "added_field", "no_manifest"],
)
def test_edited_metadata_is_refused(saved, edit):
    engine, directory = saved
    _edit_record(directory, edit)
    with pytest.raises(ArtifactCorruptError, match=r"metadata .* was altered.*recreate"):
        engine.load_curvature(directory)


def test_rewritten_json_with_the_same_content_still_loads(saved):
    engine, directory = saved
    path = directory / "curvature.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None))
    engine.load_curvature(directory)


def test_record_carries_a_manifest_digest_over_metadata_and_tensor_checksum(tmp_path):
    save_artifact(tmp_path, "thing", {"values": torch.arange(3.0)}, {"config": {"k": (1, 2)}})
    record = json.loads((tmp_path / "thing.json").read_text())
    assert record["format_version"] == artifacts.FORMAT_VERSION == 2
    assert record["sha256"] == artifacts.file_sha256(tmp_path / "thing.safetensors")
    fields = {key: value for key, value in record.items() if key != "manifest_sha256"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert record["manifest_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    tensors, meta = load_artifact(tmp_path, "thing")
    assert torch.equal(tensors["values"], torch.arange(3.0))
    assert meta["config"] == {"k": [1, 2]}
    with pytest.raises(ValueError, match="reserved keys"):
        save_artifact(tmp_path, "other", {}, {"sha256": "mine"})


def test_artifact_of_the_previous_format_names_the_version_and_the_fix(saved):
    engine, directory = saved
    _edit_record(directory, lambda record: record.update(format_version=1))
    with pytest.raises(ArtifactMismatchError, match=r"format version 1, this fastinf reads 2.*"):
        engine.load_curvature(directory)
    with pytest.raises(ArtifactMismatchError, match="recreate the artifact"):
        engine.load_curvature(directory)


def test_one_changed_item_changes_the_full_fingerprint():
    labels = torch.arange(NUM_ITEMS) % 3
    original = random_dataset(NUM_ITEMS, SHAPE, labels=labels)
    changed = _one_pixel_changed(original, item=UNSAMPLED)
    assert dataset_fingerprint(original) != dataset_fingerprint(changed)
    labels = labels.clone()
    labels[UNSAMPLED] += 1
    relabelled = ImageTensorDataset(original.images, labels)
    assert dataset_fingerprint(original) != dataset_fingerprint(relabelled)


def test_sample_mode_misses_an_unsampled_item_and_says_so():
    original = random_dataset(NUM_ITEMS, (1, 2, 2))
    changed = _one_pixel_changed(original, item=UNSAMPLED)
    assert dataset_fingerprint(original, verify="sample") == dataset_fingerprint(
        changed, verify="sample"
    )
    assert dataset_fingerprint(original, verify="sample").startswith("sample:")
    assert dataset_fingerprint(original, verify="full").startswith("full:")
    assert dataset_fingerprint(original) == dataset_fingerprint(original, verify="full")
    assert dataset_fingerprint(original) != dataset_fingerprint(changed)


def test_curvature_of_a_dataset_with_one_changed_item_is_refused(saved):
    engine, directory = saved
    other = _engine(_one_pixel_changed(engine.train_set, item=UNSAMPLED))
    with pytest.raises(ArtifactMismatchError, match="dataset="):
        other.load_curvature(directory)
    _engine(ImageTensorDataset(engine.train_set.images.clone())).load_curvature(directory)


class _ListOfItems(torch.utils.data.Dataset):
    """The same items as an ImageTensorDataset, served from a list, labels as Python ints."""

    def __init__(self, images, labels):
        self.items = [
            (image.clone(), int(label)) for image, label in zip(images, labels, strict=True)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_fingerprint_depends_on_the_items_only():
    labels = torch.arange(10) % 4
    original = random_dataset(10, SHAPE, labels=labels)
    expected = dataset_fingerprint(original)
    assert dataset_fingerprint(original) == expected
    same_items = [
        random_dataset(10, SHAPE, labels=labels.clone()),
        _ListOfItems(original.images, labels),
        [
            (image, label)
            for image, label in zip(original.images.clone(), labels.tolist(), strict=True)
        ],
    ]
    for dataset in same_items:
        assert dataset_fingerprint(dataset) == expected
    reordered = ImageTensorDataset(original.images.flip(0), labels.flip(0))
    as_float32 = ImageTensorDataset(original.images.float(), labels)
    shorter = ImageTensorDataset(original.images[:9], labels[:9])
    for dataset in (reordered, as_float32, shorter):
        assert dataset_fingerprint(dataset) != expected


def test_default_mode_follows_the_documented_size(monkeypatch):
    dataset = random_dataset(10, (1, 2, 2))
    assert dataset_fingerprint(dataset).startswith("full:")
    monkeypatch.setattr(artifacts, "FULL_VERIFY_LIMIT", 9)
    assert dataset_fingerprint(dataset) == dataset_fingerprint(dataset, verify="sample")
    with pytest.raises(ValueError, match=r"verify='all' is not one of \('full', 'sample'\)"):
        dataset_fingerprint(dataset, verify="all")


def test_full_and_sample_fingerprints_are_never_compared(saved, monkeypatch):
    engine, directory = saved
    monkeypatch.setattr(artifacts, "FULL_VERIFY_LIMIT", NUM_ITEMS - 1)  # same items, sampled
    sampled = _engine(engine.train_set)
    assert sampled.provenance["dataset"].startswith("sample:")
    with pytest.raises(
        ArtifactMismatchError, match=r"dataset=.*verify='full'.*verify='sample'.*cannot be compared"
    ):
        sampled.load_curvature(directory)
    with pytest.raises(ArtifactMismatchError, match=r"verify='sample'.*verify='full'"):
        check_provenance(
            "index", {"provenance.dataset": "sample:0123"}, {"provenance.dataset": "full:0123"}
        )
