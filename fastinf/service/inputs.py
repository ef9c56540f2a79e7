"""What a request carries, checked and turned into a query tensor before it is queued.

An image arrives as PNG/JPEG bytes (pixels 0..255, mapped to the model's [-1, 1]) or as a
nested list of floats already in the model's range ([C, H, W], or [H, W] for one channel).
Every problem is a `BadRequest` with the HTTP status and a message that names the fix;
nothing here reaches the engine unchecked.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data import validate_images

__all__ = [
    "BadRequest",
    "Query",
    "decode_array",
    "decode_base64",
    "decode_image_bytes",
    "parse_cond",
    "parse_k",
]

_MODES = {1: "L", 3: "RGB"}
# A decompression bomb (a tiny file that decodes to gigapixels) is refused before decoding.
MAX_PIXELS = 4096 * 4096


class BadRequest(ValueError):
    """A request the service refuses: `status` (400, 413, 422) and the reason."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    """One checked query: the image [C, H, W] in the model's range, its label, k, the
    warnings its checks raised (e.g. pixels that look unscaled) and its re-rank budget."""

    image: Tensor
    cond: int | None
    k: int
    warnings: list[str] = field(default_factory=list)
    rerank: int | None = None  # with an index: candidates that may be re-scored exactly


def _checked(image: Tensor, sample_shape: tuple[int, int, int], what: str) -> Tensor:
    """`image` [C, H, W] validated against the model (shape, finite); a warning of the
    checks is raised again as a `UserWarning` for the caller to collect."""
    try:
        return validate_images(image.unsqueeze(0), sample_shape, what=what)[0]
    except ValueError as error:
        raise BadRequest(str(error)) from None


def decode_image_bytes(
    data: bytes, sample_shape: tuple[int, int, int], *, resize: bool = False
) -> Tensor:
    """PNG/JPEG bytes → [C, H, W] float32 in [-1, 1] (converted to the model's channels).

    A picture of another size is refused unless `resize` (then it is resized with
    Lanczos filtering to the model's height and width).
    """
    channels, height, width = sample_shape
    if channels not in _MODES:
        raise BadRequest(
            f"this model takes {channels}-channel inputs, which are not images; send the "
            "query as a nested list of floats (JSON field 'image').",
        )
    if not data:
        raise BadRequest("the image is empty; send the bytes of a PNG or JPEG file.", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            if picture.format not in ("PNG", "JPEG"):
                raise BadRequest(
                    f"the image is {picture.format}, not PNG or JPEG; convert it to PNG.", 400
                )
            if picture.width * picture.height > MAX_PIXELS:
                raise BadRequest(
                    f"the image is {picture.width}×{picture.height} pixels, more than the "
                    f"{MAX_PIXELS:,} allowed; resize it to {width}×{height}.",
                    413,
                )
            picture.load()
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Warning) as error:
        raise BadRequest(
            f"the upload is not a readable PNG or JPEG ({type(error).__name__}: "
            f"{str(error)[:120]}); send a complete PNG or JPEG file.",
            400,
        ) from None
    if picture.size != (width, height):
        if not resize:
            raise BadRequest(
                f"the image is {picture.width}×{picture.height} but the model takes "
                f"{width}×{height}; resize it, or ask the service to (resize=true)."
            )
        picture = picture.convert(_MODES[channels]).resize((width, height), Image.LANCZOS)
    array = torch.frombuffer(
        bytearray(picture.convert(_MODES[channels]).tobytes()), dtype=torch.uint8
    )
    image = array.reshape(height, width, channels).permute(2, 0, 1).float() / 127.5 - 1.0
    return _checked(image, sample_shape, "queries")


def decode_base64(text: str, sample_shape: tuple[int, int, int], *, resize: bool = False) -> Tensor:
    """A base64 PNG/JPEG (optionally a `data:image/...;base64,` URI) → [C, H, W]."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            "'image' is a string but not valid base64; send base64 PNG bytes or a nested list "
            "of floats.",
            400,
        ) from None
    return decode_image_bytes(data, sample_shape, resize=resize)


def decode_array(values, sample_shape: tuple[int, int, int]) -> Tensor:
    """A nested list of numbers in the model's range ([C, H, W], or [H, W] for one
    channel) → [C, H, W] float32."""
    channels, height, width = sample_shape
    expected = f"[{channels}, {height}, {width}]" + (
        f" or [{height}, {width}]" if channels == 1 else ""
    )
    try:
        image = torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise BadRequest(
            f"'image' must be a nested list of numbers shaped {expected}, or base64 PNG; it is "
            "ragged or holds non-numbers."
        ) from None
    if image.dim() == 2 and channels == 1:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise BadRequest(
            f"'image' has shape {list(image.shape)}; send {expected} values in the model's range."
        )
    return _checked(image.float(), sample_shape, "queries")


def _as_int(value) -> int | None:
    """An integer given as an int, an integral float or a string of digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    return None


def parse_k(value, k_max: int, *, name: str = "k", low: int = 1) -> int:
    """k (or another count `name`) from a request: an integer in low..k_max."""
    k = _as_int(value)
    if k is None or not low <= k <= k_max:
        raise BadRequest(f"{name}={value!r} must be an integer from {low} to {k_max}.")
    return k


def parse_cond(value, num_classes: int | None) -> int | None:
    """A class label from a request, checked against the model's classes."""
    if value is None:
        return None
    if num_classes is None:
        raise BadRequest(
            "'cond' was given but the model is unconditional; drop 'cond' (it would be ignored)."
        )
    label = _as_int(value)
    if label is None or not 0 <= label < num_classes:
        raise BadRequest(f"cond={value!r} must be a class label from 0 to {num_classes - 1}.")
    return label
