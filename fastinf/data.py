"""Training data: the embedded digits set, tensor-backed datasets and input validation.

Item convention: every dataset item fastinf reads is a tuple `(image, cond)` where
`image` is a float tensor [C, H, W] (pixel models: values in [-1, 1]) and `cond` is the
conditioning, either an int64 scalar tensor holding a class label or the int
`UNCONDITIONAL` (-1) for an unconditional item. PyTorch's default collation turns a batch
of such items into `(images [B, C, H, W], conds [B] int64)`; `batch_cond` turns `conds`
into what a model is called with (None when every item is unconditional).
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "UNCONDITIONAL",
    "DigitsDataset",
    "ImageTensorDataset",
    "TextStatesDataset",
    "batch_cond",
    "load_digits_dataset",
    "split_item",
    "validate_images",
]

UNCONDITIONAL = -1
# Non-negative images above this look like 0..255 pixels that were never scaled (a warning).
PIXEL_RANGE_LIMIT = 2.0

# sklearn's digits are 4-bit grey levels: integers 0..16.
_DIGITS_MAX_VALUE = 16.0


def batch_cond(conds: Tensor | None) -> Tensor | None:
    """The model-facing conditioning of a collated batch.

    Args:
        conds: [B] int64 labels with `UNCONDITIONAL` (-1) for unconditional items, or None.
    Returns:
        None when `conds` is None or every item is unconditional, else `conds` unchanged.
    """
    if conds is None or bool(torch.all(conds == UNCONDITIONAL)):
        return None
    return conds


def validate_images(images, sample_shape: tuple[int, int, int], what: str = "images") -> Tensor:
    """Check that `images` is a finite float batch of shape [N, *sample_shape].

    Args:
        images: a tensor [N, C, H, W], or one image [C, H, W].
        sample_shape: the model's expected (C, H, W).
        what: how the error messages name `images` (e.g. "query images").
    Returns:
        `images` as [N, C, H, W] (a single image gains a leading batch dimension).
    Raises:
        ValueError: naming the problem and the fix, for a non-tensor, a non-floating dtype,
            a wrong number of dimensions, a channel/height/width mismatch, or NaN/Inf values.
    """
    if not isinstance(images, Tensor):
        raise ValueError(
            f"{what} must be a torch.Tensor of shape [N, C, H, W], got {type(images).__name__}; "
            "convert with torch.as_tensor(...).float()."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{what} must have a floating dtype, got {images.dtype}; convert with .float() and "
            "scale pixels to the range the model was trained on (e.g. [-1, 1])."
        )
    channels, height, width = sample_shape
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(
            f"{what} must have 4 dims [N, C, H, W] (or 3 for one image), got {images.dim()} "
            f"dims with shape {tuple(images.shape)}; reshape to [N, {channels}, {height}, {width}]."
        )
    for axis, name, expected in (
        (1, "channels", channels),
        (2, "height", height),
        (3, "width", width),
    ):
        if images.shape[axis] != expected:
            raise ValueError(
                f"{what} have {images.shape[axis]} {name} but the model expects {expected} "
                f"(sample_shape {tuple(sample_shape)}, got shape {tuple(images.shape)}); "
                f"resize or convert {what} to [N, {channels}, {height}, {width}]."
            )
    bad_values = ~torch.isfinite(images)
    if bool(bad_values.any()):
        num_nan = int(torch.isnan(images).sum())
        num_inf = int(bad_values.sum()) - num_nan
        bad_items = torch.nonzero(bad_values.flatten(1).any(1)).flatten().tolist()
        shown = ", ".join(str(i) for i in bad_items[:10]) + (", ..." if len(bad_items) > 10 else "")
        raise ValueError(
            f"{what} contain {num_nan} NaN and {num_inf} Inf values in {len(bad_items)} item(s) "
            f"(indices {shown}); remove or repair those items before use."
        )
    if images.numel() and float(images.min()) >= 0 and float(images.max()) > PIXEL_RANGE_LIMIT:
        warnings.warn(
            f"{what} range over [0, {float(images.max()):g}]: they look like unscaled pixels "
            "(0..255); scale them to the range the model was trained on (e.g. [-1, 1]).",
            stacklevel=2,
        )
    return images


def validate_indices(indices, size: int, what: str = "indices") -> list[int]:
    """`indices` as a list of ints, each a valid position in a dataset of `size` items.

    Negative positions are refused rather than counted from the end: a result row that
    says "-1" would not name a training example.
    """
    try:
        order = [operator.index(i) for i in indices]
    except TypeError as error:
        raise ValueError(
            f"{what} must be integers (positions in the training set), got {indices!r:.80}; "
            "pass a list or int64 tensor of example numbers."
        ) from error
    bad = [i for i in order if not 0 <= i < size]
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"{what} {shown} are outside the training set of {size} examples; pass positions "
            f"0..{size - 1}."
        )
    return order


def split_item(item) -> tuple[Tensor, object]:
    """(image, cond) of a dataset item — `(image, cond)`, `(image,)` or a bare image; a
    missing or None cond is `UNCONDITIONAL`."""
    if isinstance(item, (tuple, list)):
        image, cond = item[0], item[1] if len(item) > 1 else UNCONDITIONAL
    else:
        image, cond = item, UNCONDITIONAL
    return image, UNCONDITIONAL if cond is None else cond


def _image_tensor(images) -> Tensor:
    """`images` checked as one [N, C, H, W] floating, finite tensor (its own sample shape)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            "images must be a tensor of shape [N, C, H, W], got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}; "
            "stack the images into one 4-dim tensor."
        )
    return validate_images(images, tuple(images.shape[1:]))


class ImageTensorDataset(Dataset):
    """Images held in memory as one tensor, with optional class labels.

    Args:
        images: [N, C, H, W] floating tensor.
        labels: [N] integer class labels, or None for an unconditional dataset.
    Items are `(image [C, H, W], cond)` per the module's convention; `.images` [N, C, H, W]
    and `.labels` [N] int64 (all `UNCONDITIONAL` when no labels were given) expose the
    storage so training can index it directly instead of collating item by item.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None):
        images = _image_tensor(images)
        if labels is None:
            self.conditional = False
            labels = torch.full((images.shape[0],), UNCONDITIONAL, dtype=torch.int64)
        else:
            self.conditional = True
            labels = torch.as_tensor(labels)
            if labels.shape != (images.shape[0],) or labels.is_floating_point():
                raise ValueError(
                    f"labels must be an integer tensor of shape [{images.shape[0]}] (one per "
                    f"image), got dtype {labels.dtype} and shape {tuple(labels.shape)}."
                )
            labels = labels.to(torch.int64)
        self.images = images
        self.labels = labels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | int]:
        cond = self.labels[index] if self.conditional else UNCONDITIONAL
        return self.images[index], cond


class TextStatesDataset(Dataset):
    """Images (or latents) with per-item conditioning tensors, e.g. the text encoder's
    hidden states of each caption, for a cross-attention model.

    Args:
        images: [N, C, H, W] floating tensor.
        states: [N, L, D] floating tensor: item i's conditioning (its caption encoded).
        captions: the N captions the states encode, kept for display (optional).
        labels: [N] class labels, kept for display and evaluation, never a model input.
    Items are `(image [C, H, W], states [L, D])`.
    """

    def __init__(
        self,
        images: Tensor,
        states: Tensor,
        captions: list[str] | None = None,
        labels: Tensor | None = None,
    ):
        self.images = _image_tensor(images)
        for name, value in (("captions", captions), ("labels", labels)):
            if value is not None and len(value) != images.shape[0]:
                raise ValueError(
                    f"{name} has {len(value)} entries for {images.shape[0]} images; give one "
                    "per image."
                )
        self.captions = None if captions is None else list(captions)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if (
            not isinstance(states, Tensor)
            or states.dim() != 3
            or states.shape[0] != images.shape[0]
            or not states.is_floating_point()
        ):
            got = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
            raise ValueError(
                f"states must be a float tensor [N={images.shape[0]}, L, D] (one encoded "
                f"caption per image), got {got}."
            )
        if not bool(torch.isfinite(states).all()):
            raise ValueError("states holds NaN or inf; re-encode the captions.")
        self.states = states

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.states[index]


class DigitsDataset(ImageTensorDataset):
    """scikit-learn's 1,797 handwritten 8×8 digits: images [N, 1, 8, 8], labels 0..9.

    Items are `(image [1, 8, 8] float32, label int64 scalar tensor)`; the default model is
    unconditional and ignores the label.
    """


def load_digits_dataset(normalize: bool = True) -> DigitsDataset:
    """Load the embedded digits (shipped inside scikit-learn; no download).

    Args:
        normalize: scale the 0..16 grey levels linearly to [-1, 1] (the range the DDPM is
            trained on); False keeps the raw 0..16 values (as float32).
    Returns:
        A `DigitsDataset` with `.images` [1797, 1, 8, 8] float32 and `.labels` [1797] int64.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).reshape(-1, 1, 8, 8)
    if normalize:
        images = images * (2.0 / _DIGITS_MAX_VALUE) - 1.0
    labels = torch.from_numpy(digits.target).to(torch.int64)
    return DigitsDataset(images, labels)
