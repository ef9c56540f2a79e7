"""Attributing a subset of the layers: globs and predicates, gradients and curvature of a
subset equal the full model's sub-blocks, frozen (LoRA-style) layers, and the per-layer
memory budget checked before a fit starts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastinf.artifacts import ArtifactMismatchError
from fastinf.cli import main
from fastinf.config import CurvatureConfig
from fastinf.curvature.memory import check_layer_memory, layer_state_bytes, memory_report
from fastinf.engine import InfluenceEngine
from fastinf.layers import find_layers
from fastinf.models import as_eps_model, save_unet

from tiny import SMALL_SCORE, random_dataset, tiny_unet

FIT = CurvatureConfig(factor_draws=2, eigval_draws=2)
ATTENTION = "*attentions*"
_SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def data():
    return random_dataset(5, (1, 4, 4), seed=3)


def _engine(unet, data, schedule, layers=None):
    return InfluenceEngine(unet, schedule, data, config=SMALL_SCORE, layers=layers)


def test_globs_predicates_and_the_wrapper_prefix_pick_the_same_layers(unet):
    wrapped = as_eps_model(unet)
    every = find_layers(wrapped)
    attention = [name for name in every if ".attentions." in name]
    assert attention and len(attention) < len(every)
    assert list(find_layers(wrapped, ATTENTION)) == attention
    # Without the wrapper's "unet." prefix, as a list or comma-separated, or a predicate.
    up = [name for name in every if name.startswith("unet.up_blocks.")]
    assert list(find_layers(wrapped, "up_blocks.*")) == up
    assert list(find_layers(wrapped, ["unet.up_blocks.*"])) == up
    both = [name for name in every if name in up or name == "unet.conv_in"]
    assert list(find_layers(wrapped, "conv_in, up_blocks.*")) == both
    assert list(find_layers(wrapped, lambda name, module: name in up)) == up


@pytest.mark.parametrize(
    "select, message",
    [
        ("*attn9*", r"layer pattern '\*attn9\*' matches none .* unet\.conv_in"),
        (["up_blocks.*", "nope"], "layer pattern 'nope' matches none"),
        (" , ", "names no pattern"),
        (lambda name, module: False, "predicate kept none"),
    ],
)
def test_a_selection_that_matches_nothing_names_the_pattern_and_the_layers(unet, select, message):
    with pytest.raises(ValueError, match=message):
        find_layers(as_eps_model(unet), select)


def test_frozen_layers_are_never_attributed_only_the_trainable_adapters_are():
    class Adapted(nn.Module):  # a frozen base layer with a trainable low-rank pair beside it
        def __init__(self):
            super().__init__()
            self.sample_shape = (1, 2, 2)
            self.base = nn.Linear(4, 4).requires_grad_(False)
            self.lora_A = nn.Linear(4, 2, bias=False)
            self.lora_B = nn.Linear(2, 4, bias=False)

        def forward(self, x_t, timesteps, cond=None):
            flat = x_t.flatten(1)
            return (self.base(flat) + self.lora_B(self.lora_A(flat))).reshape(x_t.shape)

    assert list(find_layers(Adapted())) == ["lora_A", "lora_B"]
    with pytest.raises(ValueError, match="'base' matches none"):
        find_layers(Adapted(), "base")


def test_subset_gradients_and_curvature_are_the_full_models_sub_blocks(unet, data, schedule):
    full = _engine(unet, data, schedule)
    subset = _engine(unet, data, schedule, ATTENTION)
    assert set(subset.layers) < set(full.layers)
    grads_full = full.train_gradients([0, 2, 4])
    grads_subset = subset.train_gradients([0, 2, 4])
    assert set(grads_subset) == set(subset.layers)
    for name, (weight, bias) in grads_subset.items():
        torch.testing.assert_close(weight, grads_full[name][0], rtol=1e-12, atol=0)
        if bias is not None:
            torch.testing.assert_close(bias, grads_full[name][1], rtol=1e-12, atol=0)
    curvature_full = full.fit(FIT)
    curvature_subset = subset.fit(FIT)
    assert list(curvature_subset.layers) == list(subset.layers)
    for name, layer in curvature_subset.layers.items():
        reference = curvature_full.layers[name]
        for key, tensor in layer.tensors().items():
            expected = getattr(reference, key)
            if key.startswith("eigvecs"):  # eigenvectors up to sign: compare projectors
                tensor, expected = tensor @ tensor.T, expected @ expected.T
            torch.testing.assert_close(tensor, expected, rtol=1e-9, atol=1e-12)


def test_a_curvature_of_other_layers_is_refused(unet, data, schedule, tmp_path):
    subset = _engine(unet, data, schedule, ATTENTION)
    subset.fit(FIT)
    subset.save_curvature(tmp_path / "curvature")
    with pytest.raises(ArtifactMismatchError, match="layers"):
        _engine(unet, data, schedule).load_curvature(tmp_path / "curvature")
    _engine(unet, data, schedule, "*.attentions.*").load_curvature(tmp_path / "curvature")


def test_layer_memory_is_estimated_and_an_oversized_layer_refused_before_any_pass(
    unet, data, schedule, monkeypatch
):
    layers = find_layers(nn.Sequential(nn.Conv2d(1280, 1280, 3)))
    (info,) = layers.values()
    d_in, d_out = 1280 * 9, 1280
    expected = 8 * (2 * d_in**2 + 2 * d_out**2 + d_in * d_out + d_in + 2 * d_out)
    assert layer_state_bytes(info) == expected  # ≈ 2.3 GB: over the default budget
    with pytest.raises(ValueError, match=r"layer '0' \(conv2d, d_in 11520, d_out 1280\).*LoRA"):
        check_layer_memory(layers, CurvatureConfig().max_layer_bytes)
    check_layer_memory(layers, None)
    engine = _engine(unet, data, schedule)
    largest = max(engine.layers.values(), key=layer_state_bytes)
    report = memory_report(engine.layers)
    assert f"over {len(engine.layers)} layers" in report and largest.name in report
    monkeypatch.setattr(
        type(engine.source), "curvature_seeds", lambda *a, **k: pytest.fail("a pass ran")
    )
    budget = layer_state_bytes(largest) - 1
    with pytest.raises(ValueError, match=f"layer '{largest.name}'"):
        engine.fit(CurvatureConfig(max_layer_bytes=budget))


def test_fit_command_prints_the_estimate_and_takes_layer_globs(tmp_path, capsys):
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": _SCHEDULE})
    images = random_dataset(4, (1, 4, 4), seed=2, dtype=torch.float32).images
    save_file({"images": images}, str(tmp_path / "train.safetensors"))
    model = ["--weights", str(tmp_path / "unet.safetensors")]
    model += ["--data", str(tmp_path / "train.safetensors")]
    fit = ["fit", *model, "--factor-draws", "1", "--eigval-draws", "1"]
    assert main([*fit, "--out", str(tmp_path / "c"), "--layers", "up_blocks.*"]) == 0
    out = capsys.readouterr().out
    assert "curvature memory estimate" in out and "unet.up_blocks." in out
    assert "unet.down_blocks." not in out
    assert main([*fit, "--out", str(tmp_path / "d"), "--layers", "nothing*"]) == 2
    error = capsys.readouterr().err
    assert "'nothing*' matches none" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "d" / "curvature.json").exists()
