"""Tiny models and datasets shared by the tests (float64 where exactness is checked)."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys

import torch
from diffusers import UNet2DModel
from torch import nn

from fastinf.config import ScoreConfig
from fastinf.data import ImageTensorDataset

# Few draws, small blocks, absolute damping: what the dense float64 references assume.
SMALL_SCORE = ScoreConfig(
    train_draws=3,
    query_draws=4,
    damping=1e-3,
    damping_mode="absolute",
    block_size=4,
    batch_size=64,
)


class LinearEps(nn.Module):
    """ε̂ = W x_t: one linear layer on the flattened input (one position per draw)."""

    def __init__(self, sample_shape=(1, 2, 2), bias=False):
        super().__init__()
        self.sample_shape = sample_shape
        size = sample_shape[0] * sample_shape[1] * sample_shape[2]
        self.linear = nn.Linear(size, size, bias=bias)

    def forward(self, x_t, timesteps, cond=None):
        return self.linear(x_t.flatten(1)).reshape(x_t.shape)


class TinyConvEps(nn.Module):
    """Two convolutions, a time-embedding Linear, a conv called twice (shared weights)."""

    def __init__(self, channels=3, sample_shape=(2, 5, 5)):
        super().__init__()
        self.sample_shape = sample_shape
        in_ch = sample_shape[0]
        self.conv_in = nn.Conv2d(in_ch, channels, 3, padding=1)
        self.time = nn.Linear(2, channels)
        self.shared = nn.Conv2d(channels, channels, 3, padding=2, dilation=2)
        self.down = nn.Conv2d(channels, channels, 2, stride=2, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        self.conv_out = nn.Conv2d(channels, in_ch, 3, padding=1)

    def forward(self, x_t, timesteps, cond=None):
        t = timesteps.to(x_t.dtype).unsqueeze(1) / 1000.0
        temb = self.time(torch.cat([torch.sin(t), torch.cos(t)], dim=1))
        h = torch.tanh(self.conv_in(x_t) + temb[:, :, None, None])
        h = torch.tanh(self.shared(h))
        h = self.norm(self.shared(h))
        coarse = self.down(h)
        h = h + nn.functional.interpolate(coarse, size=h.shape[-2:], mode="nearest")
        return self.conv_out(h)


def random_dataset(count, sample_shape, seed=0, dtype=torch.float64, labels=None):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, *sample_shape, generator=generator, dtype=dtype) * 2 - 1
    return ImageTensorDataset(images, labels)


def tiny_unet(num_classes=None):
    """A 4×4 UNet2DModel with attention, float64."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        attention_head_dim=4,
        num_class_embeds=num_classes,
    ).double()


def small_unet(num_class_embeds=None, seed=0, sample_size=8, channels=1):
    """A float32 UNet2DModel without attention (for training and sampling tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            num_class_embeds=num_class_embeds,
        )


def undocumented(module) -> list[str]:
    """Public names of `module` that lack a docstring of their own.

    A dataclass's generated `Name(field, ...)` docstring does not count, nor does a
    constant's type docstring (a dict's, say): a constant must be named in the module's
    docstring instead.
    """
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not callable(obj):
            documented = name in (module.__doc__ or "")
        else:
            doc = inspect.getdoc(obj) or ""
            documented = bool(doc) and not doc.startswith(f"{obj.__name__}(")
        if not documented:
            missing.append(name)
    return missing


# The command line run in a fresh interpreter that reports which heavy modules it imported.
HEAVY = ("torch", "diffusers", "faiss", "sklearn")
PROBE = f"""
import sys
from fastinf.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
loaded = [name for name in {HEAVY!r} if name in sys.modules]
print("LOADED", loaded, "CODE", code, file=sys.stderr)
"""


def run_cli(*args: str) -> tuple[int, str, list[str]]:
    """(exit code, stderr without the probe's line, heavy modules imported)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    *lines, probe = done.stderr.strip().splitlines()
    loaded = re.search(r"LOADED (\[.*\]) CODE", probe).group(1)
    return int(probe.rsplit(" ", 1)[1]), "\n".join(lines), ast.literal_eval(loaded)


def tiny_sd_pipeline(folder, seed=0, image_size=8, max_length=8, width=16):
    """A Stable-Diffusion-layout pipeline folder built from configs: a 1-channel 8×8 VAE
    (2-channel 4×4 latents), a 1-layer CLIP text encoder, a cross-attention UNet, DDPM."""
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as ConditionUNet

    from fastinf.text_digits import build_text_encoder

    prompts = build_text_encoder(seed, width=width, layers=1, heads=2, max_length=max_length)
    text_encoder, tokenizer = prompts.text_encoder, prompts.tokenizer
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=image_size,
    )
    unet = ConditionUNet(
        sample_size=image_size // 2,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return Path(folder)


def captioned_folder(folder, count=6, size=8, seed=0):
    """A grey image folder with metadata.jsonl: image i captioned 'digit <i mod 3>'."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        pixels = generator.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"digit {i % 3}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
