"""The text-conditional embedded default: captioned digits and a cross-attention DDPM.

Every digit of scikit-learn's set gets a caption from one of `CAPTION_TEMPLATES` (chosen by
its position, so prompts vary within a class: "a handwritten three", "the digit 3", ...). A
small CLIP text encoder, built from a config with seeded random weights and a
character-level tokenizer, turns captions into hidden states [L, D]; it is frozen, shipped
in `fastinf/weights/digits_text_encoder/` (transformers' own format) and never attributed. A
`UNet2DConditionModel` with cross-attention to those states is trained on the 8×8 digits in
pixel space by `train_text_digits` (`python -m fastinf.text_digits`), and its EMA weights are
shipped as `digits_text_unet.safetensors` beside a JSON sidecar.

    model, schedule = load_text_digits_model(), default_schedule()
    prompts = load_text_encoder()                      # a fastinf.text.PromptEncoder
    data = load_text_digits_dataset(prompts)           # TextStatesDataset, with captions
    queries = sample_ddpm(model, schedule, 4, seed=0, cond=prompts.encode(["the digit 7"])[0])
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .data import TextStatesDataset, load_digits_dataset
from .models import load_unet
from .text import PromptEncoder, quiet_loading

__all__ = [
    "CAPTION_TEMPLATES",
    "NUMBER_WORDS",
    "TEXT_DIGITS_WEIGHTS_PATH",
    "TEXT_ENCODER_PATH",
    "build_text_encoder",
    "digit_caption",
    "digits_captions",
    "load_text_digits_dataset",
    "load_text_digits_model",
    "load_text_encoder",
    "text_digits_unet_config",
    "train_text_digits",
]

WEIGHTS = Path(__file__).resolve().parent / "weights"
TEXT_DIGITS_WEIGHTS_PATH = WEIGHTS / "digits_text_unet.safetensors"
TEXT_ENCODER_PATH = WEIGHTS / "digits_text_encoder"

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "{word}, written by hand",
    "a scan of the number {digit}",
    "digit {word}",
)
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,"
TEXT_MAX_LENGTH = 32
TEXT_WIDTH = 32
TEXT_DIGITS_STEPS = 4000


def digit_caption(label: int, template: int = 0) -> str:
    """The caption of digit `label` (0..9) in template `template` of `CAPTION_TEMPLATES`."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label {label} is not a digit 0..9.")
    pattern = CAPTION_TEMPLATES[int(template) % len(CAPTION_TEMPLATES)]
    return pattern.format(word=NUMBER_WORDS[int(label)], digit=int(label))


def digits_captions(labels, seed: int = 0) -> list[str]:
    """One caption per label; item i uses template (i + seed) mod the number of templates,
    so every class is captioned in every template."""
    return [digit_caption(int(label), i + seed) for i, label in enumerate(labels)]


def _char_tokenizer(folder: Path, max_length: int):
    """A character-level CLIPTokenizer written into `folder` (its vocab and merges)."""
    from transformers import CLIPTokenizer

    vocab = {char: i for i, char in enumerate(_CHARACTERS)}
    vocab |= {char + "</w>": len(_CHARACTERS) + i for i, char in enumerate(_CHARACTERS)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )


def build_text_encoder(
    seed: int = 0,
    *,
    width: int = TEXT_WIDTH,
    layers: int = 2,
    heads: int = 4,
    max_length: int = TEXT_MAX_LENGTH,
) -> PromptEncoder:
    """A CLIP text encoder built from its config with weights drawn from `seed`, and a
    character-level tokenizer; the defaults are the shipped default's encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _char_tokenizer(Path(scratch), max_length)
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(config)
    return PromptEncoder(encoder, tokenizer)


def load_text_encoder(path: str | Path = TEXT_ENCODER_PATH) -> PromptEncoder:
    """The shipped text encoder and tokenizer (a transformers folder; no network)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the text encoder {path} is missing; reinstall fastinf or rebuild it with "
            "`python -m fastinf.text_digits`."
        )
    with quiet_loading():
        encoder = CLIPTextModel.from_pretrained(path, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    return PromptEncoder(encoder, tokenizer)


def load_text_digits_dataset(
    encoder: PromptEncoder | None = None, *, seed: int = 0
) -> TextStatesDataset:
    """The 1,797 digits in [-1, 1] with captions (`digits_captions`) encoded by `encoder`
    (default: the shipped one); `.captions` and `.labels` kept for display."""
    digits = load_digits_dataset()
    encoder = encoder or load_text_encoder()
    captions = digits_captions(digits.labels.tolist(), seed)
    states = encoder.encode(captions)
    return TextStatesDataset(digits.images, states, captions=captions, labels=digits.labels)


def text_digits_unet_config() -> dict:
    """`UNet2DConditionModel` arguments of the text-conditional digits DDPM."""
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "mid_block_type": None,
        "cross_attention_dim": TEXT_WIDTH,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def load_text_digits_model(device: str | torch.device = "cpu"):
    """The shipped text-conditional digits DDPM (EMA weights, eval mode); its schedule is
    `fastinf.models.default_schedule()` and its cond the shipped encoder's states."""
    if not TEXT_DIGITS_WEIGHTS_PATH.is_file():
        raise FileNotFoundError(
            f"shipped weights {TEXT_DIGITS_WEIGHTS_PATH} are missing; reinstall fastinf or "
            "retrain them with `python -m fastinf.text_digits`."
        )
    return load_unet(TEXT_DIGITS_WEIGHTS_PATH, device=device)


def train_text_digits(
    out_dir,
    *,
    steps: int = TEXT_DIGITS_STEPS,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    warmup: int = 200,
    progress: bool = True,
) -> Path:
    """Build the text encoder, train the cross-attention UNet on the captioned digits, and
    write both into `out_dir` (`digits_text_encoder/`, `digits_text_unet.safetensors` and
    its sidecar). Returns the weights path."""
    from diffusers import UNet2DConditionModel

    from .train import train_default

    out = Path(out_dir)
    encoder = build_text_encoder(seed)
    encoder_dir = out / TEXT_ENCODER_PATH.name
    encoder.text_encoder.save_pretrained(encoder_dir)
    encoder.tokenizer.save_pretrained(str(encoder_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**text_digits_unet_config())
    return train_default(
        unet,
        load_text_digits_dataset(encoder),
        out / TEXT_DIGITS_WEIGHTS_PATH.name,
        description="Text-conditional DDPM (ε-prediction, cross-attention) on captioned "
        "scikit-learn digits; EMA weights.",
        metadata={
            "captions": {"templates": list(CAPTION_TEMPLATES), "seed": seed},
            "text_encoder": TEXT_ENCODER_PATH.name,
            "text_encoder_fingerprint": encoder.fingerprint,
        },
        command=f"python -m fastinf.text_digits --out-dir {out_dir} --steps {steps} --seed {seed}",
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        warmup=warmup,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m fastinf.text_digits`: rebuild the shipped text-conditional default."""
    parser = argparse.ArgumentParser(description=train_text_digits.__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(WEIGHTS))
    parser.add_argument("--steps", type=int, default=TEXT_DIGITS_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = train_text_digits(args.out_dir, steps=args.steps, seed=args.seed)
    print(f"wrote {path}, its sidecar and {Path(args.out_dir) / TEXT_ENCODER_PATH.name}")


if __name__ == "__main__":
    main()
