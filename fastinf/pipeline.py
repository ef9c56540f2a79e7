"""Text-to-image latent pipelines from a local folder (the Stable-Diffusion layout).

    pipe = load_pipeline("my-pipeline/", lora="my-lora/")     # nothing is fetched
    store = pipe.latent_store(ImageFolderDataset("data/", pipe.image_shape))
    engine = InfluenceEngine(pipe.model, pipe.schedule, store.dataset(), layers="lora")
    queries = pipe.generate(["a photo of a 3"], 4, seed=0)    # latents [4, c, h, w]
    result = engine.score(queries, k=10, cond=pipe.prompts.encode(["a photo of a 3"] * 4))

A pipeline folder is what diffusers' `save_pretrained` writes: `unet/`
(`UNet2DConditionModel`, ε-prediction), `vae/` (`AutoencoderKL`), `text_encoder/` and
`tokenizer/` (transformers), `scheduler/` (its config gives the noise schedule), and usually
`model_index.json` naming each component's class. Attribution runs in the VAE's latent
space: training images are encoded once into a `fastinf.latents.LatentStore` (their captions
through the pipeline's frozen text encoder), query images the same way, and generated
queries are the sampler's final latents. Only the UNet is attributed.

**LoRA.** `lora=` loads a LoRA adapter written by diffusers (`save_lora_adapter` /
`save_lora_weights`: a folder holding `pytorch_lora_weights.safetensors`, or that file) into
the UNet through peft, and freezes every other weight: gradients, curvature and scores then
cover the adapter's `lora_A` / `lora_B` weights only (`layers="lora"` asks for exactly those
and refuses a model without them).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .artifacts import canonical_digest, dataset_fingerprint, model_fingerprint
from .data import split_item
from .diffusion import NoiseSchedule
from .latents import LatentStore, encode_images
from .models import DiffusersCrossAttentionEpsModel
from .text import CaptionCache, PromptEncoder, quiet_loading

__all__ = ["COMPONENTS", "TextToImagePipeline", "load_lora", "load_pipeline"]

# Component folder → (library, class) used when model_index.json does not name one, and
# what the component is, for the error that names a missing one.
COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel", "the denoiser"),
    "vae": ("diffusers", "AutoencoderKL", "the autoencoder of the latent space"),
    "text_encoder": ("transformers", "CLIPTextModel", "the text encoder"),
    "tokenizer": ("transformers", "AutoTokenizer", "the text encoder's tokenizer"),
    "scheduler": ("diffusers", "DDPMScheduler", "the noise schedule"),
}
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class TextToImagePipeline:
    """A loaded pipeline: the wrapped UNet (`model`, what fastinf attributes), the VAE,
    the frozen prompt encoder, the diffusers scheduler and its `schedule`."""

    directory: Path
    model: DiffusersCrossAttentionEpsModel
    vae: nn.Module
    prompts: PromptEncoder
    scheduler: object
    schedule: NoiseSchedule
    lora: Path | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one latent: the UNet's input."""
        return self.model.sample_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one training image: the VAE's input at the UNet's sample size."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, height, width = self.latent_shape
        return (int(self.vae.config.in_channels), height * factor, width * factor)

    def encode_images(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Latents [N, c, h, w] of images [N, C, H, W] in [-1, 1] (`fastinf.latents`)."""
        return encode_images(self.vae, images, batch_size)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images [N, C, H, W] in [-1, 1] of latents [N, c, h, w] (the VAE's decoder, for
        display)."""
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0))
        param = next(self.vae.parameters())
        with torch.no_grad():
            images = self.vae.decode(latents.to(param.device, param.dtype) / scale).sample
        return images.clamp(-1.0, 1.0).float().cpu()

    def caption_cache(self, directory: str | os.PathLike) -> CaptionCache:
        """A caption cache of this pipeline's text encoder in `directory`."""
        return CaptionCache(directory, self.prompts)

    def latent_store(
        self,
        dataset: Dataset,
        directory: str | os.PathLike | None = None,
        *,
        verify: str | None = None,
        shard_size: int = 1024,
    ) -> LatentStore:
        """The training set's latents (and encoded captions), built or resumed.

        Under torchrun rank 0 encodes while the other ranks wait, then they open the
        finished store (one writer per folder).

        Args:
            dataset: images at `image_shape` in [-1, 1], with captions (an image folder with
                metadata.jsonl) or class labels.
            directory: the store's folder; None: a folder named after the VAE, the text
                encoder and the dataset under $FASTINF_CACHE (or ./.fastinf_cache)/latents,
                so the same data and pipeline find their store again.
        """
        from .distributed import barrier, rank_world

        captioned = len(dataset) > 0 and isinstance(split_item(dataset[0])[1], str)
        fingerprint = dataset_fingerprint(dataset, verify)  # one pass, shared with the build
        if directory is None:
            key = canonical_digest(
                {
                    "vae": model_fingerprint(self.vae),
                    "text": self.prompts.fingerprint if captioned else None,
                    "data": fingerprint,
                    "shard_size": shard_size,
                }
            )[:16]
            root = Path(os.environ.get("FASTINF_CACHE", ".fastinf_cache"))
            directory = root / "latents" / key
        rank, _ = rank_world()
        store = None
        if rank == 0:
            captions = self.caption_cache(Path(directory) / "captions") if captioned else None
            store = LatentStore.build(
                directory,
                self.vae,
                dataset,
                shard_size=shard_size,
                captions=captions,
                fingerprint=fingerprint,
            )
        barrier()
        if store is None:
            store = LatentStore.open(directory, self.vae, self.prompts if captioned else None)
        return store

    def generate(
        self,
        prompts: list[str],
        num_per_prompt: int = 1,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Sample `num_per_prompt` latents per prompt with the pipeline itself (diffusers'
        Stable-Diffusion sampler, this UNet and scheduler); returns the final latents
        [len(prompts) · num_per_prompt, c, h, w] float32, the queries of attribution, in
        prompt order."""
        from diffusers import StableDiffusionPipeline

        sampler = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.prompts.text_encoder,
            tokenizer=self.prompts.tokenizer,
            unet=self.model.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        sampler.set_progress_bar_config(disable=True)
        _, height, width = self.image_shape
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            latents = sampler(
                list(prompts),
                height=height,
                width=width,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                num_images_per_prompt=int(num_per_prompt),
                generator=generator,
                output_type="latent",
            ).images
        return latents.float().cpu()


def _model_index(directory: Path) -> dict:
    """The pipeline's model_index.json (component → [library, class]); {} without one."""
    index = directory / "model_index.json"
    if not index.is_file():
        return {}
    try:
        return json.loads(index.read_text())
    except ValueError as error:
        raise ValueError(f"{index} is not JSON ({error}); save the pipeline again.") from None


def _component_class(directory: Path, name: str, index: dict):
    library, cls, _ = COMPONENTS[name]
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and all(entry):
        library, cls = entry
    try:
        return getattr(importlib.import_module(library), cls)
    except (ImportError, AttributeError):
        raise ValueError(
            f"{directory / name} is a {library}.{cls}, which this environment cannot import; "
            f"install a {library} that has it."
        ) from None


def _load_component(directory: Path, name: str, index: dict, device):
    folder = directory / name
    cls = _component_class(directory, name, index)
    try:
        if name == "scheduler":
            return cls.from_pretrained(folder, local_files_only=True)
        if name == "tokenizer":
            return cls.from_pretrained(str(folder), local_files_only=True)
        return cls.from_pretrained(folder, local_files_only=True).to(device).eval()
    except Exception as error:  # each library fails its own way on a broken folder
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"cannot load {folder} as {cls.__name__} ({first}); save that component again "
            "with save_pretrained."
        ) from None


def load_lora(unet: nn.Module, path: str | os.PathLike) -> Path:
    """Load a diffusers LoRA adapter (folder or .safetensors) into `unet` via peft and
    freeze every weight but the adapter's; returns the weights file."""
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no LoRA weights at {file}; pass the folder written by unet.save_lora_adapter "
            f"(it holds {LORA_FILE}) or the .safetensors file itself."
        )
    try:
        unet.load_lora_adapter(
            str(file.parent), weight_name=file.name, prefix=None, adapter_name="default"
        )
    except Exception as error:  # peft and diffusers raise many kinds on a mismatched adapter
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"cannot load the LoRA {file} into this UNet ({first}); it must be a LoRA of this "
            "pipeline's UNet."
        ) from None
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return file


def load_pipeline(
    directory: str | os.PathLike,
    *,
    lora: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> TextToImagePipeline:
    """Load a pipeline folder (module docstring) without touching the network.

    Raises:
        FileNotFoundError: the folder or one of its components is missing (named).
        ValueError: a component cannot be loaded, or the UNet does not predict ε.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"pipeline folder {directory} does not exist; pass the folder a diffusers "
            "pipeline's save_pretrained wrote (unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/)."
        )
    for name, (_, _, what) in COMPONENTS.items():  # a missing folder before any loading
        if not (directory / name).is_dir():
            raise FileNotFoundError(
                f"pipeline {directory} has no {name}/ folder ({what}); save the whole pipeline "
                "with save_pretrained, or copy that folder from the pipeline it came from."
            )
    index = _model_index(directory)
    with quiet_loading():
        parts = {name: _load_component(directory, name, index, device) for name in COMPONENTS}
    scheduler = parts["scheduler"]
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{directory / 'scheduler'} has prediction_type {prediction!r}; fastinf attributes "
            "ε-prediction models (the diffusion loss of the paper) only."
        )
    unet = parts["unet"]
    lora_file = load_lora(unet, lora) if lora is not None else None
    return TextToImagePipeline(
        directory=directory,
        model=DiffusersCrossAttentionEpsModel(unet).eval(),
        vae=parts["vae"].requires_grad_(False),
        prompts=PromptEncoder(parts["text_encoder"], parts["tokenizer"]),
        scheduler=scheduler,
        schedule=NoiseSchedule.from_scheduler(scheduler),
        lora=lora_file,
    )
