import json

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

import fastinf.models as models_module
from fastinf.data import load_digits_dataset
from fastinf.models import (
    DIGITS_WEIGHTS_PATH,
    DiffusersEpsModel,
    as_eps_model,
    default_schedule,
    digits_unet_config,
    load_digits_model,
    load_sidecar,
    load_unet,
    resolve_sample_shape,
    save_unet,
    schedule_from_sidecar,
)
from fastinf.train import evaluate_loss

from tiny import small_unet


def tiny_unet(num_class_embeds=None, seed=0):
    return small_unet(num_class_embeds, seed, sample_size=(8, 6), channels=2)


def normalised(config):
    """Config values as JSON would store them (tuples become lists)."""
    return json.loads(json.dumps(config))


def test_public_api_is_pinned():
    assert sorted(models_module.__all__) == sorted(
        [
            "DIGITS_WEIGHTS_PATH",
            "DiffusersEpsModel",
            "DiffusersCrossAttentionEpsModel",
            "DiffusersTransformerEpsModel",
            "LORA_TARGETS",
            "UNET_CLASSES",
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
    )


def test_adapter_returns_the_unets_sample():
    unet = tiny_unet()
    model = DiffusersEpsModel(unet)
    x_t = torch.randn(3, 2, 8, 6)
    timesteps = torch.tensor([0, 17, 999])
    expected = unet(x_t, timesteps).sample
    assert torch.equal(model(x_t, timesteps), expected)
    # An unconditional UNet ignores labels carried by a labelled dataset.
    assert torch.equal(model(x_t, timesteps, torch.tensor([1, 2, 3])), expected)
    assert model.sample_shape == (2, 8, 6)
    assert model.num_classes is None and not model.is_conditional


def test_class_conditional_unet_needs_cond():
    unet = tiny_unet(num_class_embeds=3)
    model = as_eps_model(unet)
    assert isinstance(model, DiffusersEpsModel) and model.unet is unet
    assert model.num_classes == 3 and model.is_conditional
    x_t = torch.randn(2, 2, 8, 6)
    timesteps = torch.tensor([5, 500])
    labels = torch.tensor([0, 2])
    expected = unet(x_t, timesteps, class_labels=labels).sample
    assert torch.equal(model(x_t, timesteps, labels), expected)
    # The label must matter, or the check below would prove nothing.
    assert not torch.allclose(model(x_t, timesteps, torch.tensor([1, 1])), expected)
    with pytest.raises(
        ValueError, match=r"class-conditional .* needs cond: \[B\] int64 class labels in 0\.\.2"
    ):
        model(x_t, timesteps)
    with pytest.raises(ValueError, match="not None or -1"):
        model(x_t, timesteps, torch.tensor([-1, -1]))


def test_as_eps_model_leaves_other_modules_alone():
    generic = nn.Conv2d(1, 1, 3, padding=1)
    assert as_eps_model(generic) is generic
    adapted = DiffusersEpsModel(tiny_unet())
    assert as_eps_model(adapted) is adapted
    with pytest.raises(TypeError, match=r"expected a torch nn\.Module"):
        as_eps_model(lambda x_t, t, cond: x_t)


def test_resolve_sample_shape():
    generic = nn.Conv2d(1, 1, 3, padding=1)
    assert resolve_sample_shape(generic, (1, 4, 4)) == (1, 4, 4)
    with pytest.raises(
        ValueError, match=r"give the model a `sample_shape` attribute .* or pass sample_shape"
    ):
        resolve_sample_shape(generic)
    generic.sample_shape = (1, 5, 5)
    assert resolve_sample_shape(generic) == (1, 5, 5)
    assert resolve_sample_shape(DiffusersEpsModel(tiny_unet())) == (2, 8, 6)


def test_save_and_load_round_trip(tmp_path):
    unet = tiny_unet(num_class_embeds=3)
    path = tmp_path / "nested" / "tiny.safetensors"
    sidecar_path = save_unet(
        DiffusersEpsModel(unet), path, {"schedule": {"beta_schedule": "linear"}}
    )
    assert sidecar_path == tmp_path / "nested" / "tiny.json"
    loaded = load_unet(path)
    assert not loaded.training
    for (name, expected), (loaded_name, value) in zip(
        unet.state_dict().items(), loaded.unet.state_dict().items(), strict=True
    ):
        assert name == loaded_name and torch.equal(expected, value)
    assert load_sidecar(path)["schedule"] == {"beta_schedule": "linear"}
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        load_sidecar(tmp_path / "missing.safetensors")


def test_shipped_weights_load_with_the_default_config():
    model = load_digits_model()
    assert isinstance(model, DiffusersEpsModel)
    assert not model.training
    assert model.sample_shape == (1, 8, 8) and model.num_classes is None
    sidecar = load_sidecar(DIGITS_WEIGHTS_PATH)
    for key, value in normalised(digits_unet_config()).items():
        assert normalised(sidecar["unet_config"][key]) == value, key
    expected_config = UNet2DModel(**digits_unet_config()).config
    for key, value in expected_config.items():
        if not key.startswith("_"):
            assert normalised(model.unet.config[key]) == normalised(value), key
    assert all(param.dtype == torch.float32 for param in model.parameters())
    assert DIGITS_WEIGHTS_PATH.stat().st_size < 4_000_000
    for key in ("command", "training", "final_train_loss", "ema_eval_loss"):
        assert key in sidecar


def test_shipped_schedule_is_the_default_schedule():
    sidecar = load_sidecar(DIGITS_WEIGHTS_PATH)
    schedule = schedule_from_sidecar(sidecar)
    expected = default_schedule()
    assert schedule.num_timesteps == 1000
    torch.testing.assert_close(schedule.alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(expected.betas[[0, -1]].float(), torch.tensor([1e-4, 2e-2]))


def test_shipped_model_loss_is_far_below_a_fresh_model():
    dataset = torch.utils.data.Subset(load_digits_dataset(), range(0, 1797, 14))
    schedule = default_schedule()
    trained = evaluate_loss(load_digits_model(), dataset, schedule, num_draws=2, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh_unet = UNet2DModel(**digits_unet_config())
    fresh = evaluate_loss(fresh_unet, dataset, schedule, num_draws=2, seed=3)
    assert fresh > 0.5
    assert trained < 0.1
    assert trained < 0.2 * fresh
