"""Model-range image tensors as pictures: PIL images, PNG bytes and `data:` URIs.

The one place that maps a [C, H, W] tensor in the model's range [-1, 1] to 8-bit pixels
(p = round((x + 1) · 127.5), values outside [-1, 1] clamped), for the demo grid, the HTML
report and thumbnails served over HTTP alike.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image
from torch import Tensor

__all__ = ["data_uri", "png_bytes", "to_pil"]


def to_pil(image: Tensor, scale: int = 1) -> Image.Image:
    """A [C, H, W] image in [-1, 1] as a PIL image of (W·scale, H·scale) pixels.

    One channel gives a greyscale ("L") picture, three an RGB one; the upscale is
    nearest-neighbour, so every model pixel stays a sharp `scale`×`scale` square.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"to_pil draws a [1 or 3, H, W] image, got shape {tuple(image.shape)}; decode "
            "latents to pixels first, or pass one image, not a batch."
        )
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r} must be an integer >= 1 (pixels per model pixel).")
    array = ((image.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    mode = "L" if array.shape[0] == 1 else "RGB"
    array = array[0] if mode == "L" else array.permute(1, 2, 0)
    picture = Image.fromarray(array.numpy(), mode=mode)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def png_bytes(image: Tensor, scale: int = 1) -> bytes:
    """`to_pil(image, scale)` encoded as a PNG file's bytes."""
    buffer = io.BytesIO()
    to_pil(image, scale).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a `data:image/png;base64,...` URI, to inline in HTML without a file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
