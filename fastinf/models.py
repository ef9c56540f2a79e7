"""ε-prediction models: the diffusers adapter, the default digits UNet and its weights.

fastinf calls every model as `model(x_t, timesteps, cond) -> eps_pred` with
x_t [B, C, H, W] float, timesteps [B] int64 in {0..T-1} and cond either None or [B] int64
class labels (`fastinf.data` conventions); eps_pred has the shape of x_t. A diffusers
`UNet2DModel` is adapted by `DiffusersEpsModel`; any other `nn.Module` following that
call convention is used as it is, and should expose `sample_shape` (C, H, W) — otherwise
the sample shape must be passed explicitly wherever fastinf asks for it.

Weights are stored as a safetensors file of the UNet's state dict (fp32) next to a JSON
sidecar with the same stem holding the UNet config, the noise schedule and provenance.
"""

from __future__ import annotations

import json
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .artifacts import atomic_write, atomic_write_text
from .diffusion import NoiseSchedule

__all__ = [
    "DIGITS_WEIGHTS_PATH",
    "LORA_TARGETS",
    "UNET_CLASSES",
    "DiffusersCrossAttentionEpsModel",
    "DiffusersEpsModel",
    "DiffusersTransformerEpsModel",
    "add_lora",
    "as_eps_model",
    "default_schedule",
    "digits_unet_config",
    "load_digits_model",
    "load_sidecar",
    "load_unet",
    "resolve_sample_shape",
    "save_unet",
    "schedule_from_sidecar",
]

DIGITS_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "digits_unet.safetensors"
_DIT_MODULE = "diffusers.models.transformers.dit_transformer_2d"


class _DiffusersAdapter(nn.Module):
    """What fastinf's adapters of diffusers UNets share: the wrapped `unet`, whose layer
    names (after the `unet.` that globs may leave out) and sample shape they expose."""

    # Layer globs may leave this out (`fastinf.layers.find_layers`).
    layer_prefix = "unet."

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)


class DiffusersEpsModel(_DiffusersAdapter):
    """Adapter giving a diffusers `UNet2DModel` fastinf's call convention.

    Args:
        unet: an ε-predicting `UNet2DModel`, unconditional or class-conditional.
    """

    @property
    def is_conditional(self) -> bool:
        """Whether the UNet has a class embedding and so needs `cond`."""
        return self.unet.class_embedding is not None

    @property
    def num_classes(self) -> int | None:
        """Number of class labels of a class-conditional UNet; None if unconditional."""
        return self.unet.config.num_class_embeds if self.is_conditional else None

    def forward(self, x_t: Tensor, timesteps: Tensor, cond: Tensor | None = None) -> Tensor:
        """Predicted noise ε_θ(x_t, t[, c]).

        Args:
            x_t: [B, C, H, W] noisy inputs.
            timesteps: [B] int64 timesteps in {0..T-1} (or a scalar shared by the batch).
            cond: [B] int64 class labels for a class-conditional UNet. An unconditional UNet
                ignores it, so datasets that carry labels work with either kind of model.
        Returns:
            eps_pred [B, C, H, W].
        """
        if not self.is_conditional:
            return self.unet(x_t, timesteps).sample
        if cond is None or bool(torch.any(cond < 0)):
            raise ValueError(
                "this UNet is class-conditional (it has a class embedding) and needs cond: "
                f"[B] int64 class labels in 0..{(self.num_classes or 0) - 1}, not None or -1; "
                "use a labelled dataset or pass cond=... to the sampler."
            )
        return self.unet(x_t, timesteps, class_labels=cond).sample


class DiffusersCrossAttentionEpsModel(_DiffusersAdapter):
    """Adapter giving a diffusers `UNet2DConditionModel` (text-to-image, cross-attention)
    fastinf's call convention: `cond` is the text encoder's hidden states [B, L, D], passed
    as `encoder_hidden_states`.

    Args:
        unet: an ε-predicting `UNet2DConditionModel` (pixels or VAE latents).
    """

    is_conditional = True
    num_classes = None
    cond_kind = "states"

    @property
    def cond_width(self) -> int:
        """D: the width of the hidden states the cross-attention reads."""
        width = self.unet.config.cross_attention_dim
        return width if isinstance(width, int) else width[0]

    def forward(self, x_t: Tensor, timesteps: Tensor, cond: Tensor | None = None) -> Tensor:
        """Predicted noise ε_θ(x_t, t, c) for text states `cond` [B, L, D]."""
        if cond is None or cond.dim() != 3 or cond.shape[-1] != self.cond_width:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(
                f"this UNet cross-attends to text states [B, L, {self.cond_width}] and needs "
                f"them as cond, got {got}; encode the captions with the pipeline's text "
                "encoder (one [L, D] tensor per item)."
            )
        return self.unet(x_t, timesteps, encoder_hidden_states=cond.to(x_t.dtype)).sample


class DiffusersTransformerEpsModel(_DiffusersAdapter):
    """Adapter giving a diffusers `DiTTransformer2DModel` (a class-conditional transformer
    denoiser on patches) fastinf's call convention: `cond` is [B] int64 class labels. A DiT
    that also learns the variance predicts 2·C channels; ε is the first C.

    Args:
        unet: the transformer (kept under the adapters' shared attribute name).
    """

    is_conditional = True

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_embeds_ada_norm)

    def forward(self, x_t: Tensor, timesteps: Tensor, cond: Tensor | None = None) -> Tensor:
        """Predicted noise ε_θ(x_t, t, c) for class labels `cond` [B]."""
        if cond is None or bool(torch.any(cond < 0)):
            raise ValueError(
                "this DiT is class-conditional and needs cond: [B] int64 class labels in "
                f"0..{self.num_classes - 1}; use a labelled dataset or pass cond=..."
            )
        out = self.unet(x_t, timestep=timesteps, class_labels=cond).sample
        return out[:, : x_t.shape[1]]


_EVAL_LOCK = threading.Lock()
# model -> (blocks inside eval_mode now, the mode to restore when the last one leaves)
_EVAL_DEPTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block, back in its previous mode after, even on error.

    Safe across threads sharing one model: the mode is saved by the first block to enter
    and restored by the last to leave, so no thread's exit puts the model back in training
    mode while another thread is still inside.
    """
    with _EVAL_LOCK:
        count, was_training = _EVAL_DEPTH.get(model, (0, model.training))
        _EVAL_DEPTH[model] = (count + 1, was_training)
        model.eval()
    try:
        yield model
    finally:
        with _EVAL_LOCK:
            count, was_training = _EVAL_DEPTH.pop(model)
            if count > 1:
                _EVAL_DEPTH[model] = (count - 1, was_training)
            else:
                model.train(was_training)


def as_eps_model(model: nn.Module) -> nn.Module:
    """Wrap a `UNet2DModel` in `DiffusersEpsModel` and a `UNet2DConditionModel` in
    `DiffusersCrossAttentionEpsModel`, a `DiTTransformer2DModel` in
    `DiffusersTransformerEpsModel` (a peft `PeftModel` around any of them is unwrapped to its
    adapter-injected model first); return any other module unchanged.

    A module that is not a UNet2DModel must already be callable as
    `model(x_t, timesteps, cond) -> eps_pred` (module docstring) and should define
    `sample_shape`, or callers must pass the sample shape explicitly.
    """
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        model = model.get_base_model()  # peft.get_peft_model's wrapper: its LoRA-injected UNet
    if isinstance(model, UNet2DModel):
        return DiffusersEpsModel(model)
    if isinstance(model, UNet2DConditionModel):
        return DiffusersCrossAttentionEpsModel(model)
    # Looked up only once loaded: importing diffusers' transformer models costs seconds.
    dit = getattr(sys.modules.get(_DIT_MODULE), "DiTTransformer2DModel", None)
    if dit is not None and isinstance(model, dit):
        return DiffusersTransformerEpsModel(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch nn.Module (UNet2DModel or an ε-model), got {type(model).__name__}."
        )
    return model


def resolve_sample_shape(
    model: nn.Module, sample_shape: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The (C, H, W) of one model input: `sample_shape` if given, else `model.sample_shape`.

    Raises:
        ValueError: when neither is available, saying how to fix it.
    """
    if sample_shape is not None:
        return tuple(int(size) for size in sample_shape)
    model_shape = getattr(model, "sample_shape", None)
    if model_shape is None:
        raise ValueError(
            f"cannot tell the input shape of {type(model).__name__}: give the model a "
            "`sample_shape` attribute (C, H, W) or pass sample_shape=(C, H, W) explicitly."
        )
    return tuple(int(size) for size in model_shape)


def digits_unet_config() -> dict:
    """`UNet2DModel` keyword arguments of the default, unconditional digits DDPM (≈0.7M params)."""
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "num_class_embeds": None,
    }


def default_schedule() -> NoiseSchedule:
    """The schedule of the default model: T = 1000, linear β from 1e-4 to 2e-2 (DDPM)."""
    return NoiseSchedule.linear(1000, 1e-4, 2e-2)


def _sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_unet(unet: nn.Module, weights_path, metadata: dict) -> Path:
    """Write the UNet's state dict (fp32 safetensors) and a JSON sidecar with the same stem.

    Args:
        unet: the model to save: a UNet2DModel or UNet2DConditionModel, or fastinf's
            adapter of one (its weights are copied to CPU fp32).
        weights_path: target `.safetensors` path; parent folders are created.
        metadata: JSON-serialisable provenance; `unet_config` (the UNet's constructor
            arguments) is added from the model itself.
    Returns:
        The sidecar path.
    """
    unet = unet.unet if isinstance(unet, _DiffusersAdapter) else unet
    weights_path = Path(weights_path)
    state = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in unet.state_dict().items()
    }
    atomic_write(weights_path, lambda tmp: save_file(state, str(tmp)))
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    sidecar = {"unet_class": type(unet).__name__, "unet_config": config, **metadata}
    lora = _lora_record(unet)
    if lora is not None:
        sidecar["lora"] = lora
    return atomic_write_text(_sidecar_path(weights_path), json.dumps(sidecar, indent=2) + "\n")


def load_sidecar(weights_path) -> dict:
    """The JSON sidecar of a weights file written by `save_unet`."""
    sidecar_path = _sidecar_path(Path(weights_path))
    if not sidecar_path.is_file():
        raise FileNotFoundError(
            f"no sidecar {sidecar_path} next to {weights_path}; weights must be saved with "
            "fastinf.models.save_unet (or fastinf.train.train_digits)."
        )
    return json.loads(sidecar_path.read_text())


def schedule_from_sidecar(sidecar: dict) -> NoiseSchedule:
    """Rebuild the linear-β `NoiseSchedule` recorded in a sidecar's `schedule` entry."""
    schedule = sidecar["schedule"]
    if schedule.get("beta_schedule") != "linear":
        raise ValueError(
            f"unsupported schedule {schedule!r} in sidecar; only linear β schedules are stored."
        )
    return NoiseSchedule.linear(
        schedule["num_timesteps"], schedule["beta_start"], schedule["beta_end"]
    )


UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections


def add_lora(unet: nn.Module, rank: int, targets=LORA_TARGETS, alpha: float | None = None):
    """Freeze `unet` and add a rank-`rank` LoRA adapter (peft, through diffusers'
    `add_adapter`) to its `targets`: its lora_A / lora_B weights become the only trainable
    ones (lora_B starts at 0, so the adapted model starts as the base)."""
    from peft import LoraConfig

    if not hasattr(unet, "add_adapter"):
        raise TypeError(f"{type(unet).__name__} cannot take a LoRA adapter (no add_adapter).")
    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=alpha or int(rank), target_modules=list(targets))
    unet.add_adapter(config)
    return unet


def _lora_record(unet: nn.Module) -> dict | None:
    """The LoRA adapter's settings for a sidecar (None without one)."""
    config = (getattr(unet, "peft_config", None) or {}).get("default")
    if config is None:
        return None
    return {
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "targets": sorted(config.target_modules),
    }


def load_unet(
    weights_path, *, device: str | torch.device = "cpu"
) -> DiffusersEpsModel | DiffusersCrossAttentionEpsModel:
    """Build a UNet from a sidecar's config and load its safetensors weights (no network);
    the sidecar's `unet_class` (default UNet2DModel) names a `UNET_CLASSES` entry, and its
    `lora` (written by `save_unet` for a LoRA-adapted UNet) adds that adapter first.

    Returns:
        The adapted model (`as_eps_model`) in eval mode on `device`.
    """
    sidecar = load_sidecar(weights_path)
    name = sidecar.get("unet_class", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise ValueError(
            f"{weights_path}'s sidecar names unet_class {name!r}; fastinf builds "
            f"{sorted(UNET_CLASSES)}."
        )
    unet = UNET_CLASSES[name](**sidecar["unet_config"])
    lora = sidecar.get("lora")
    if lora is not None:  # a LoRA fine-tune: only its adapter weights are trainable
        add_lora(unet, lora["rank"], lora["targets"], lora["alpha"])
    unet.load_state_dict(load_file(str(weights_path)), strict=True)
    return as_eps_model(unet).to(device).eval()


def load_digits_model(device: str | torch.device = "cpu") -> DiffusersEpsModel:
    """The shipped default: the EMA weights of the digits DDPM, in eval mode.

    Its schedule is `default_schedule()`; its inputs are [B, 1, 8, 8] in [-1, 1].
    """
    if not DIGITS_WEIGHTS_PATH.is_file():
        raise FileNotFoundError(
            f"shipped weights {DIGITS_WEIGHTS_PATH} are missing; reinstall fastinf or "
            "regenerate them with `python -m fastinf.train --out-dir fastinf/weights`."
        )
    return load_unet(DIGITS_WEIGHTS_PATH, device=device)
