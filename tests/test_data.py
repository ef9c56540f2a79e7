import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

import fastinf.data as data_module
from fastinf.data import (
    UNCONDITIONAL,
    DigitsDataset,
    ImageTensorDataset,
    batch_cond,
    load_digits_dataset,
    validate_images,
)


def test_public_api_is_pinned():
    assert sorted(data_module.__all__) == sorted(
        [
            "UNCONDITIONAL",
            "DigitsDataset",
            "ImageTensorDataset",
            "TextStatesDataset",
            "batch_cond",
            "load_digits_dataset",
            "split_item",
            "validate_images",
        ]
    )


def test_digits_are_scaled_linearly_to_minus_one_one():
    dataset = load_digits_dataset()
    raw = load_digits()
    assert isinstance(dataset, DigitsDataset)
    assert len(dataset) == 1797
    assert dataset.images.shape == (1797, 1, 8, 8)
    assert dataset.images.dtype == torch.float32
    assert dataset.sample_shape == (1, 8, 8)
    expected = torch.from_numpy(raw.images).float().reshape(-1, 1, 8, 8) / 8.0 - 1.0
    torch.testing.assert_close(dataset.images, expected, rtol=0, atol=1e-7)
    # Grey level 0 maps to -1 and 16 to +1; both occur in the data.
    assert dataset.images.min() == -1.0
    assert dataset.images.max() == 1.0
    assert torch.equal(dataset.labels, torch.from_numpy(raw.target).long())


def test_digits_without_normalisation_keep_grey_levels():
    dataset = load_digits_dataset(normalize=False)
    raw = load_digits()
    assert torch.equal(dataset.images.flatten(1), torch.from_numpy(raw.data).float())


def test_digits_items_follow_the_image_cond_convention():
    dataset = load_digits_dataset()
    image, cond = dataset[5]
    assert image.shape == (1, 8, 8)
    assert isinstance(cond, torch.Tensor) and cond.dtype == torch.int64 and cond.dim() == 0
    assert int(cond) == 5  # the digits are ordered 0, 1, ..., 9, 0, 1, ... at the start
    images, conds = next(iter(DataLoader(dataset, batch_size=12)))
    assert images.shape == (12, 1, 8, 8)
    assert conds.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert batch_cond(conds) is conds


def test_unlabelled_dataset_is_unconditional_after_collation():
    images = torch.randn(5, 3, 4, 6)
    dataset = ImageTensorDataset(images)
    image, cond = dataset[2]
    assert torch.equal(image, images[2])
    assert cond == UNCONDITIONAL == -1
    assert dataset.labels.tolist() == [-1] * 5
    _, conds = next(iter(DataLoader(dataset, batch_size=5)))
    assert conds.dtype == torch.int64
    assert batch_cond(conds) is None
    assert batch_cond(None) is None


def test_labelled_dataset_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \[3\]"):
        ImageTensorDataset(torch.zeros(3, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ImageTensorDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[N, C, H, W\]"):
        ImageTensorDataset(torch.zeros(3, 2, 2))


def test_validate_images_accepts_a_batch_and_a_single_image():
    batch = torch.zeros(4, 1, 8, 8)
    assert validate_images(batch, (1, 8, 8)) is batch
    single = validate_images(torch.ones(1, 8, 8), (1, 8, 8))
    assert single.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([[0.0]], r"query images must be a torch.Tensor .* got list; convert with torch.as_tensor"),
        (
            torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
            r"floating dtype, got torch.uint8; .*\.float\(\)",
        ),
        (
            torch.zeros(8, 8),
            r"must have 4 dims \[N, C, H, W\] .* got 2 dims .* reshape to \[N, 1, 8, 8\]",
        ),
        (torch.zeros(2, 1, 1, 8, 8), r"got 5 dims"),
        (torch.zeros(2, 3, 8, 8), r"have 3 channels but the model expects 1 .* resize or convert"),
        (torch.zeros(2, 1, 7, 8), r"have 7 height but the model expects 8"),
        (torch.zeros(2, 1, 8, 9), r"have 9 width but the model expects 8"),
    ],
)
def test_validate_images_names_the_problem_and_the_fix(images, message):
    with pytest.raises(ValueError, match=message):
        validate_images(images, (1, 8, 8), what="query images")


def test_validate_images_counts_and_locates_non_finite_values():
    images = torch.zeros(6, 1, 8, 8)
    images[1, 0, 0, 0] = float("nan")
    images[1, 0, 0, 1] = float("nan")
    images[4, 0, 3, 3] = float("inf")
    images[5, 0, 2, 2] = -float("inf")
    with pytest.raises(
        ValueError, match=r"2 NaN and 2 Inf values in 3 item\(s\) \(indices 1, 4, 5\)"
    ):
        validate_images(images, (1, 8, 8))


def test_validate_images_truncates_long_lists_of_bad_items():
    images = torch.full((12, 1, 2, 2), float("nan"))
    with pytest.raises(ValueError, match=r"in 12 item\(s\) \(indices 0, 1, .*, 9, \.\.\.\)"):
        validate_images(images, (1, 2, 2))
