"""Which layers carry curvature, and capture of their inputs and output-gradients (DESIGN §1).

Tracked: every `nn.Linear` and `nn.Conv2d` with a trainable weight (matched with
`isinstance`, so subclasses, attention projections and LoRA's `lora_A` / `lora_B` count),
weight and bias as separate blocks. Frozen layers (a peft model's base layers) are not part
of θ. Everything else — normalisation layers (GroupNorm, LayerNorm, BatchNorm), embeddings,
other parameters — is excluded from both the curvature and the gradients, so scores are
over the tracked parameters only. `find_layers(model, select)` narrows them further: name
globs (`"*attn2*"`, `"unet.up_blocks.*"`) or a predicate `(name, module) -> bool`.

For one forward/backward pass over n items, a tracked layer delivers a `LayerCall`: its
rows `act` [n, R, d_in] (layer inputs, unfolded for convolutions) and `grad` [n, R, d_out]
(gradients of the backward seed w.r.t. the layer outputs), R positions per item, or
per-example gradients formed without unfolding. A module called several times in one
forward contributes each call as more positions, delivered together, so consumers always
see the whole gradient.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerCall",
    "LayerInfo",
    "LayerSelect",
    "capture_layers",
    "find_layers",
    "layer_rows",
]

EXCLUDED_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer: its module, kind and the shapes of its K-FAC blocks."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv2d"
    d_in: int
    d_out: int
    has_bias: bool

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ValueError(
            f"layer {name!r}: grouped convolutions (groups={conv.groups}) are not supported by "
            "K-FAC here; freeze that layer (requires_grad=False) to exclude it."
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"layer {name!r}: padding_mode={conv.padding_mode!r} is not supported; use 'zeros' "
            "or freeze that layer (requires_grad=False) to exclude it."
        )


LayerSelect = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
"""Which layers to track: None (all), name globs, "lora", or a predicate (name, module) -> bool."""

LORA = "lora"  # the selection of a peft LoRA adapter's lora_A / lora_B layers


def _is_lora(name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def find_layers(model: nn.Module, select: LayerSelect = None) -> dict[str, LayerInfo]:
    """The tracked layers of `model` with trainable weights, keyed by module name, in order.

    Frozen layers (weight.requires_grad False) are skipped: they are not part of θ.

    Args:
        select: None keeps every one. Glob patterns (`fnmatch`, case-sensitive; a string
            may hold several, comma-separated) keep the layers whose name matches any of
            them; a pattern also matches the name without the prefix of fastinf's own
            wrapper (`model.layer_prefix`, "unet." for a diffusers UNet), so
            "up_blocks.*" and "unet.up_blocks.*" both work. A pattern that matches no
            trainable layer is an error that lists the names. "lora" keeps a peft LoRA
            adapter's `lora_A` / `lora_B` layers and is an error without any. A callable
            `select(name, module) -> bool` keeps the layers it returns True for.
    """
    layers: dict[str, LayerInfo] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind, d_in = "linear", module.in_features
        elif isinstance(module, nn.Conv2d):
            kind = "conv2d"
            d_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            continue
        if not module.weight.requires_grad:
            continue
        has_bias = module.bias is not None and module.bias.requires_grad
        layers[name] = LayerInfo(name, module, kind, d_in, module.weight.shape[0], has_bias)
    if not layers:
        raise ValueError(
            "the model has no trainable nn.Linear or nn.Conv2d layers; fastinf attributes "
            "through those layers only."
        )
    if select is not None:
        layers = _select(layers, select, getattr(model, "layer_prefix", ""))
    for name, info in layers.items():
        if info.kind == "conv2d":
            _check_conv(name, info.module)
    return layers


def _select(layers: dict[str, LayerInfo], select, prefix: str) -> dict[str, LayerInfo]:
    if isinstance(select, str) and select.strip() == LORA:
        chosen = {name: info for name, info in layers.items() if _is_lora(name)}
        if not chosen:
            raise ValueError(
                "layers='lora' asks for LoRA adapter weights, but the model has no trainable "
                "lora_A / lora_B layers; load an adapter (--lora PATH, or "
                "fastinf.pipeline.load_lora) or choose layers by name."
            )
        return chosen
    if callable(select):
        chosen = {name: info for name, info in layers.items() if select(name, info.module)}
        if not chosen:
            raise ValueError(
                "the layer predicate kept none of the model's trainable layers "
                f"({_listed(layers)}); make it return True for at least one."
            )
        return chosen
    patterns = _patterns(select)
    if not patterns:
        raise ValueError("the layer selection names no pattern; pass globs such as '*attn2*'.")

    def names(name: str) -> tuple[str, ...]:
        return (name, name[len(prefix) :]) if prefix and name.startswith(prefix) else (name,)

    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(alias, pattern) for n in layers for alias in names(n)):
            raise ValueError(
                f"layer pattern {pattern!r} matches none of the model's trainable layers "
                f"({_listed(layers)}); fix the pattern (globs: * ? [..]) or leave it out."
            )
    return {
        name: info
        for name, info in layers.items()
        if any(fnmatch.fnmatchcase(alias, p) for p in patterns for alias in names(name))
    }


def _patterns(select: str | Sequence[str]) -> list[str]:
    items = [select] if isinstance(select, str) else list(select)
    if not all(isinstance(item, str) for item in items):
        raise TypeError(
            f"layers must be glob strings or a callable (name, module) -> bool, got {select!r}."
        )
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _listed(layers: dict[str, LayerInfo], shown: int = 6) -> str:
    names = list(layers)
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} of them: " + ", ".join(names[:shown]) + more


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        # 'same' with stride 1: symmetric padding exists only for odd effective kernels.
        pads = []
        for size, dil in zip(conv.kernel_size, conv.dilation, strict=True):
            total = dil * (size - 1)
            if total % 2:
                raise ValueError(
                    f"padding='same' with kernel {conv.kernel_size} and dilation "
                    f"{conv.dilation} pads asymmetrically; use explicit integer padding."
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return tuple(conv.padding)


def layer_rows(info: LayerInfo, inputs: Tensor, output_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Rows a_r [n, R, d_in] and b_r [n, R, d_out] of one call of a tracked layer."""
    n = inputs.shape[0]
    if info.kind == "conv2d":
        conv = info.module
        act = F.unfold(
            inputs,
            conv.kernel_size,
            dilation=conv.dilation,
            padding=_conv_padding(conv),
            stride=conv.stride,
        ).transpose(1, 2)
        grad = output_grad.flatten(2).transpose(1, 2)
    else:
        act = inputs.reshape(n, -1, info.d_in)
        grad = output_grad.reshape(n, -1, info.d_out)
    return act, grad


class LayerCall:
    """What one backward pass delivers for one tracked layer: every call's inputs and
    output-gradients (n items each), with the two ways consumers read them."""

    def __init__(self, info: LayerInfo, inputs: list[Tensor], output_grads: list[Tensor]):
        self.info, self.inputs, self.output_grads = info, inputs, output_grads

    def rows(self) -> tuple[Tensor, Tensor]:
        """a_r [n, R, d_in] and b_r [n, R, d_out], every call's positions concatenated."""
        rows = [
            layer_rows(self.info, x, g) for x, g in zip(self.inputs, self.output_grads, strict=True)
        ]
        if len(rows) == 1:
            return rows[0]
        return torch.cat([r[0] for r in rows], dim=1), torch.cat([r[1] for r in rows], dim=1)

    def example_gradients(self, num_examples: int) -> tuple[Tensor, Tensor | None]:
        """Per-example gradients (weight [B, d_out, d_in], bias [B, d_out] or None), summed
        over the n / B consecutive items (draws) of each example and over every call.

        Convolutions use the weight-gradient convolution with examples as groups, which
        never unfolds the input (unfolding costs more than the whole backward pass).
        """
        if self.info.kind != "conv2d":
            act, grad = self.rows()
            act = act.reshape(num_examples, -1, act.shape[-1])
            grad = grad.reshape(num_examples, -1, grad.shape[-1])
            bias = grad.sum(1) if self.info.has_bias else None
            return torch.einsum("bmo,bmi->boi", grad, act), bias
        conv, weight, bias = self.info.module, 0, 0
        for inputs, grads in zip(self.inputs, self.output_grads, strict=True):
            draws = inputs.shape[0] // num_examples
            grouped_in = inputs.reshape(num_examples, draws, *inputs.shape[1:]).transpose(0, 1)
            grouped_grad = grads.reshape(num_examples, draws, *grads.shape[1:]).transpose(0, 1)
            shape = (num_examples * self.info.d_out, *conv.weight.shape[1:])
            weight = weight + torch.nn.grad.conv2d_weight(
                grouped_in.reshape(draws, -1, *inputs.shape[2:]),
                shape,
                grouped_grad.reshape(draws, -1, *grads.shape[2:]),
                stride=conv.stride,
                padding=_conv_padding(conv),
                dilation=conv.dilation,
                groups=num_examples,
            )
            if self.info.has_bias:
                per_example = grads.reshape(num_examples, -1, grads.shape[1], grads[0, 0].numel())
                bias = bias + per_example.sum((1, 3))
        weight = weight.reshape(num_examples, self.info.d_out, self.info.d_in)
        return weight, (bias if self.info.has_bias else None)


class _Capture:
    """Forward hooks that record each tracked call; gradient hooks that deliver complete
    (act, grad) rows once per layer per backward pass.

    The forward hooks sit on modules that other threads may be running at the same time
    (a service sharing one engine between request threads): each capture records only the
    forwards of the thread that opened it, so concurrent captures never see each other's
    calls. Gradient hooks are registered on this thread's own output tensors.
    """

    def __init__(self, layers: dict[str, LayerInfo], consumer: Callable[[str, LayerCall], None]):
        self.layers = layers
        self.consumer = consumer
        self.handles: list = []
        self.thread = threading.get_ident()
        self.reset()

    def reset(self) -> None:
        self.outputs: list[Tensor] = []
        self.inputs: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        self.grads: dict[str, dict[int, Tensor]] = {name: {} for name in self.layers}

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if (
                threading.get_ident() != self.thread
                or not torch.is_grad_enabled()
                or not output.requires_grad
            ):
                return
            inputs = args[0]
            if inputs.shape[0] != output.shape[0]:
                raise RuntimeError(f"layer {name!r}: input and output batch sizes differ.")
            call = len(self.inputs[name])
            self.inputs[name].append(inputs.detach())
            self.outputs.append(output)
            output.register_hook(self._grad_hook(name, call))

        return hook

    def _grad_hook(self, name: str, call: int):
        def hook(grad_output):
            self.grads[name][call] = grad_output.detach()
            if len(self.grads[name]) == len(self.inputs[name]):
                self._deliver(name)

        return hook

    def _deliver(self, name: str) -> None:
        calls, grads = self.inputs[name], self.grads[name]
        order = sorted(grads)
        self.inputs[name], self.grads[name] = [], {}
        self.consumer(
            name, LayerCall(self.layers[name], [calls[c] for c in order], [grads[c] for c in order])
        )

    def backward(self, model_output: Tensor, seed: Tensor) -> None:
        """Back-propagate `seed` from `model_output` to the tracked layer outputs only.

        Parameter gradients are never formed (they are not needed: consumers build what
        they need from the rows), which saves a weight-gradient pass per layer.
        """
        torch.autograd.grad(model_output, self.outputs, seed, allow_unused=True)
        # Calls whose output did not reach the seed have no gradient: deliver the rest.
        for name in self.layers:
            if self.grads[name]:
                self._deliver(name)
        self.reset()


@contextmanager
def capture_layers(
    layers: dict[str, LayerInfo], consumer: Callable[[str, LayerCall], None]
) -> Iterator[_Capture]:
    """Hook `layers`; `.backward(output, seed)` on the yielded object calls
    `consumer(name, call)` once per layer with a `LayerCall` holding every call."""
    capture = _Capture(layers, consumer)
    try:
        for name, info in layers.items():
            capture.handles.append(info.module.register_forward_hook(capture._forward_hook(name)))
        yield capture
    finally:
        for handle in capture.handles:
            handle.remove()
