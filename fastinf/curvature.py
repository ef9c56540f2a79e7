"""(E)K-FAC curvature: fitting the factors, the eigenbases, the eigenvalues, and
preconditioning with exact damping in the eigenbasis (DESIGN §1 K-FAC, EK-FAC, Damping).

A layer's weight block is approximated as A ⊗ S (A = act_cov, S = grad_cov). With
A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ, the block is Q diag(Λ) Qᵀ with
Q = Q_A ⊗ Q_S and Λ = λ_S λ_Aᵀ (K-FAC) or Λ = mean_d (Q_Sᵀ G_d Q_A)^∘2 (EK-FAC). The bias
block uses the same Q_S, with A = 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .artifacts import check_provenance, load_artifact, save_artifact
from .config import CurvatureConfig, config_from_dict
from .diffusion import NoiseSchedule, Purpose
from .gradients import DrawSpec, backprop_curvature_seed, example_blocks
from .kernels import eigval_accumulate
from .layers import LayerCall, LayerInfo, capture_layers
from .progress import progress_bar

__all__ = [
    "Curvature",
    "CurvatureError",
    "LayerCurvature",
    "LayerGrads",
    "as_kfac",
    "fit_curvature",
]

LayerGrads = dict[str, tuple[Tensor, Tensor | None]]
"""Per-layer gradients: name → (weight [n, d_out, d_in], bias [n, d_out] or None)."""


class CurvatureError(ValueError):
    """The fitted curvature is unusable (NaN/Inf factors, wrong layers)."""


@dataclass
class LayerCurvature:
    """One layer's factors, eigenbases and eigenvalues (float64)."""

    act_cov: Tensor  # A [d_in, d_in]
    grad_cov: Tensor  # S [d_out, d_out]
    eigvals_act: Tensor  # λ_A [d_in]
    eigvecs_act: Tensor  # Q_A [d_in, d_in], eigenvectors in columns
    eigvals_grad: Tensor  # λ_S [d_out]
    eigvecs_grad: Tensor  # Q_S [d_out, d_out]
    eigvals_weight: Tensor  # Λ [d_out, d_in] (corrected for EK-FAC)
    eigvals_bias: Tensor | None  # Λ_bias [d_out]

    def tensors(self) -> dict[str, Tensor]:
        out = {k: v for k, v in vars(self).items() if v is not None}
        return out


def _upcast(tensor: Tensor) -> Tensor:
    """float64 stays float64 (exact tests); half precisions are summed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


class _FactorSums:
    """Consumer accumulating Σ a aᵀ and Σ b bᵀ (expand) or the reduced versions."""

    def __init__(self, layers: dict[str, LayerInfo], approx: str, device):
        self.approx = approx
        self.act = {
            n: torch.zeros(i.d_in, i.d_in, dtype=torch.float64, device=device)
            for n, i in layers.items()
        }
        self.grad = {
            n: torch.zeros(i.d_out, i.d_out, dtype=torch.float64, device=device)
            for n, i in layers.items()
        }
        self.act_count = dict.fromkeys(layers, 0)

    def __call__(self, name: str, call: LayerCall) -> None:
        act, grad = (_upcast(rows) for rows in call.rows())
        if self.approx == "expand":
            rows_act, rows_grad = act.flatten(0, 1), grad.flatten(0, 1)
            self.act_count[name] += rows_act.shape[0]
        else:
            rows_act, rows_grad = act.mean(1), grad.sum(1)
            self.act_count[name] += rows_act.shape[0]
        self.act[name] += (rows_act.T @ rows_act).double()
        self.grad[name] += (rows_grad.T @ rows_grad).double()


class _EigvalSums:
    """Consumer accumulating Σ_d (Q_Sᵀ G_d Q_A)^∘2 (and the bias analogue) per layer."""

    _CHUNK = 64  # draws per kernel call: bounds the reference path's [D, d_out, d_in] memory

    def __init__(self, layers: dict[str, LayerInfo], curvature: dict[str, LayerCurvature]):
        self.layers = layers
        self.eigvecs = {n: (c.eigvecs_act, c.eigvecs_grad) for n, c in curvature.items()}
        self.weight = {n: torch.zeros_like(c.eigvals_weight) for n, c in curvature.items()}
        self.bias = {n: torch.zeros_like(c.eigvals_grad) for n, c in curvature.items()}

    def __call__(self, name: str, call: LayerCall) -> None:
        act, grad = (_upcast(rows) for rows in call.rows())
        eigvecs_act, eigvecs_grad = (q.to(act.dtype) for q in self.eigvecs[name])
        # A pass's sum is formed in the rows' precision (float64 accumulation inside the
        # kernel costs ~3×); the running sum over passes stays float64.
        pass_sum = torch.zeros_like(self.weight[name], dtype=act.dtype)
        for start in range(0, act.shape[0], self._CHUNK):
            chunk = slice(start, start + self._CHUNK)
            eigval_accumulate(act[chunk], grad[chunk], eigvecs_act, eigvecs_grad, pass_sum)
        self.weight[name] += pass_sum.double()
        if self.layers[name].has_bias:
            self.bias[name] += (grad.sum(1) @ eigvecs_grad).double().square().sum(0)


def _check_finite(name: str, what: str, matrix: Tensor) -> None:
    if not torch.isfinite(matrix).all():
        raise CurvatureError(
            f"layer {name!r}: the {what} has NaN/Inf entries. Likely causes: NaN or Inf in the "
            "training images, diverged model weights, or overflow in a low-precision model "
            "(fit in float32)."
        )


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    eigvals, eigvecs = torch.linalg.eigh(matrix.double())
    return eigvals.clamp_min(0.0), eigvecs


class Curvature:
    """A fitted (E)K-FAC approximation of the GGN over the tracked layers.

    Build with `fit_curvature`; reuse with `save`/`load`. `precondition` applies
    (G + λI)⁻¹ block by block; `project`/`inverse_damped` expose the eigenbasis.
    """

    def __init__(
        self, layers: dict[str, LayerCurvature], config: CurvatureConfig, provenance: dict
    ):
        self.layers = layers
        self.config = config
        self.provenance = provenance

    def damping_value(self, name: str, damping: float, mode: str) -> float:
        """λ for one layer: absolute, or `damping` × mean of the layer's eigenvalues."""
        if mode == "absolute":
            return damping
        layer = self.layers[name]
        values = [layer.eigvals_weight.flatten()]
        if layer.eigvals_bias is not None:
            values.append(layer.eigvals_bias)
        return damping * float(torch.cat(values).mean())

    def inverse_damped(self, name: str, damping: float, mode: str) -> tuple[Tensor, Tensor | None]:
        """W = 1/(Λ + λ) for the weight [d_out, d_in] and bias [d_out] blocks (float64)."""
        layer = self.layers[name]
        value = self.damping_value(name, damping, mode)
        if value <= 0 and bool((layer.eigvals_weight <= 0).any()):
            raise CurvatureError(
                f"layer {name!r} has zero eigenvalues and damping is 0; set a positive damping."
            )
        bias = None if layer.eigvals_bias is None else 1.0 / (layer.eigvals_bias + value)
        return 1.0 / (layer.eigvals_weight + value), bias

    def project(self, grads: LayerGrads) -> LayerGrads:
        """Eigenbasis coordinates Q_Sᵀ V Q_A (weight) and Q_Sᵀ v (bias), float64."""
        out = {}
        for name, (weight, bias) in grads.items():
            layer = self.layers[name]
            q_act, q_grad = layer.eigvecs_act, layer.eigvecs_grad
            proj_w = q_grad.T @ weight.double() @ q_act
            proj_b = None if bias is None else bias.double() @ q_grad
            out[name] = (proj_w, proj_b)
        return out

    def precondition(self, grads: LayerGrads, damping: float, mode: str = "absolute") -> LayerGrads:
        """(G + λI)⁻¹ V per layer: Q_S [(Q_Sᵀ V Q_A) ∘ W] Q_Aᵀ (DESIGN §1), float64.

        Args:
            grads: name → (weight [n, d_out, d_in], bias [n, d_out] or None).
        """
        out = {}
        for name, (proj_w, proj_b) in self.project(grads).items():
            layer = self.layers[name]
            inv_w, inv_b = self.inverse_damped(name, damping, mode)
            weight = layer.eigvecs_grad @ (proj_w * inv_w) @ layer.eigvecs_act.T
            bias = None if proj_b is None else (proj_b * inv_b) @ layer.eigvecs_grad.T
            out[name] = (weight, bias)
        return out

    def to(self, device) -> Curvature:
        moved = {
            name: LayerCurvature(
                **{k: None if v is None else v.to(device) for k, v in vars(c).items()}
            )
            for name, c in self.layers.items()
        }
        return Curvature(moved, self.config, self.provenance)

    def save(self, directory) -> None:
        """Write `curvature.safetensors` + `curvature.json` into `directory`."""
        tensors = {
            f"{name}::{key}": value
            for name, layer in self.layers.items()
            for key, value in layer.tensors().items()
        }
        meta = {"config": self.config.fingerprint() | {"batch_size": self.config.batch_size}}
        meta |= {"provenance": self.provenance, "layers": list(self.layers)}
        save_artifact(directory, "curvature", tensors, meta)

    @classmethod
    def load(
        cls,
        directory,
        expected_provenance: dict | None = None,
        layer_info: dict[str, LayerInfo] | None = None,
    ) -> Curvature:
        """Load a saved curvature; check it was fitted for the expected model and dataset.

        A 'trak' curvature also needs the model's `layer_info` (to regenerate its sketches).
        """
        tensors, meta = load_artifact(directory, "curvature")
        if expected_provenance is not None:
            check_provenance("curvature", meta["provenance"], expected_provenance)
        config = config_from_dict(CurvatureConfig, meta["config"])
        if config.strategy == "trak":
            from .projection import ProjectedCurvature

            if layer_info is None:
                raise ValueError("loading a 'trak' curvature needs the model's layer_info.")
            return ProjectedCurvature.from_artifact(tensors, meta, config, layer_info)
        layers = {}
        for name in meta["layers"]:
            fields = {k: tensors.get(f"{name}::{k}") for k in LayerCurvature.__dataclass_fields__}
            layers[name] = LayerCurvature(**fields)
        return cls(layers, config, meta["provenance"])


def _draws_per_item(config: CurvatureConfig, sample_shape) -> int:
    return math.prod(sample_shape) if (config.mc == "exact" and config.ggn == "model") else 1


def _curvature_pass(
    model,
    layers,
    schedule,
    dataset,
    consumer,
    config,
    purpose,
    num_draws,
    *,
    desc,
    indices,
    num_workers,
):
    """Run the curvature seeds over every example × `num_draws` draws; return #draws."""
    sample_shape = (
        tuple(dataset[0][0].shape)
        if isinstance(dataset[0], (tuple, list))
        else tuple(dataset[0].shape)
    )
    per_item = _draws_per_item(config, sample_shape) * num_draws
    examples_per_block = max(1, config.batch_size // per_item)
    device = next(model.parameters()).device
    total = len(dataset) if indices is None else len(indices)
    draws = 0
    with capture_layers(layers, consumer) as capture, progress_bar(total, desc) as bar:
        for block in example_blocks(dataset, examples_per_block, indices, num_workers):
            block = type(block)(block.ids, block.images.to(device), block.cond)
            spec = DrawSpec(purpose, num_draws, config.seed)
            backprop_curvature_seed(
                capture, model, schedule, block, spec, ggn=config.ggn, mc=config.mc
            )
            draws += block.ids.numel() * num_draws
            bar.update(block.ids.numel())
    return draws


def fit_curvature(
    model: nn.Module,
    layers: dict[str, LayerInfo],
    schedule: NoiseSchedule,
    dataset,
    config: CurvatureConfig | None = None,
    *,
    provenance: dict | None = None,
    indices: list[int] | None = None,
    num_workers: int = 0,
) -> Curvature:
    """Fit K-FAC factors over the training set, eigendecompose them in float64 and, for
    EK-FAC, estimate the eigenvalues in the Kronecker eigenbasis with fresh draws.

    The model is run in eval mode. Returns a `Curvature` on the model's device.
    """
    config = config or CurvatureConfig()
    if config.strategy == "identity":
        return _identity_curvature(layers, config, provenance, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        if config.strategy == "trak":
            from .projection import fit_projected

            return fit_projected(
                model,
                layers,
                schedule,
                dataset,
                config,
                provenance=provenance,
                indices=indices,
                num_workers=num_workers,
            )
        sums = _FactorSums(layers, config.kfac_approx, device)
        num_draws = _curvature_pass(
            model,
            layers,
            schedule,
            dataset,
            sums,
            config,
            Purpose.FIT_FACTORS,
            config.factor_draws,
            desc="fit factors",
            indices=indices,
            num_workers=num_workers,
        )
        fitted = {}
        for name in layers:
            act_cov = sums.act[name] / sums.act_count[name]
            grad_cov = sums.grad[name] / num_draws
            _check_finite(name, "activation covariance A", act_cov)
            _check_finite(name, "output-gradient covariance S", grad_cov)
            eigvals_act, eigvecs_act = _eigh(act_cov)
            eigvals_grad, eigvecs_grad = _eigh(grad_cov)
            fitted[name] = LayerCurvature(
                act_cov,
                grad_cov,
                eigvals_act,
                eigvecs_act,
                eigvals_grad,
                eigvecs_grad,
                torch.outer(eigvals_grad, eigvals_act),
                eigvals_grad.clone() if layers[name].has_bias else None,
            )
        if config.strategy == "ekfac":
            eig = _EigvalSums(layers, fitted)
            eig_draws = _curvature_pass(
                model,
                layers,
                schedule,
                dataset,
                eig,
                config,
                Purpose.FIT_EIGVALS,
                config.eigval_draws,
                desc="fit eigenvalues",
                indices=indices,
                num_workers=num_workers,
            )
            for name, layer in fitted.items():
                layer.eigvals_weight = eig.weight[name] / eig_draws
                _check_finite(name, "EK-FAC eigenvalues", layer.eigvals_weight)
                if layer.eigvals_bias is not None:
                    layer.eigvals_bias = eig.bias[name] / eig_draws
    finally:
        model.train(was_training)
    return Curvature(fitted, config, dict(provenance or {}))


def _identity_curvature(layers, config, provenance, device) -> Curvature:
    """G = I (every eigenvalue 1): τ = ∇m_qᵀ ∇ℓ_n / (1 + λ), the gradient dot product."""
    fitted = {}
    for name, info in layers.items():
        eye_act = torch.eye(info.d_in, dtype=torch.float64, device=device)
        eye_grad = torch.eye(info.d_out, dtype=torch.float64, device=device)
        ones_act = torch.ones(info.d_in, dtype=torch.float64, device=device)
        ones_grad = torch.ones(info.d_out, dtype=torch.float64, device=device)
        fitted[name] = LayerCurvature(
            eye_act,
            eye_grad,
            ones_act,
            eye_act.clone(),
            ones_grad,
            eye_grad.clone(),
            torch.outer(ones_grad, ones_act),
            ones_grad.clone() if info.has_bias else None,
        )
    return Curvature(fitted, config, dict(provenance or {}))


def as_kfac(curvature: Curvature) -> Curvature:
    """The K-FAC curvature (Λ = λ_S λ_Aᵀ) sharing an EK-FAC fit's factors and eigenbases."""
    layers = {}
    for name, layer in curvature.layers.items():
        fields = dict(vars(layer))
        fields["eigvals_weight"] = torch.outer(layer.eigvals_grad, layer.eigvals_act)
        if layer.eigvals_bias is not None:
            fields["eigvals_bias"] = layer.eigvals_grad.clone()
        layers[name] = LayerCurvature(**fields)
    config = dataclasses.replace(curvature.config, strategy="kfac")
    return Curvature(layers, config, dict(curvature.provenance))
