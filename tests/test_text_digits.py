"""The text-conditional embedded default: captions, the shipped encoder and UNet, the
text demo, and the LDS harness on it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_lds import METHODS, TINY

from fastinf.artifacts import model_fingerprint
from fastinf.cli import main
from fastinf.data import load_digits_dataset
from fastinf.demo import _prompt_digit
from fastinf.evaluation import measure_queries
from fastinf.lds import LDSRun, query_prompts
from fastinf.models import DiffusersCrossAttentionEpsModel, default_schedule, load_sidecar
from fastinf.sampling import sample_ddpm
from fastinf.text_digits import (
    CAPTION_TEMPLATES,
    NUMBER_WORDS,
    TEXT_DIGITS_WEIGHTS_PATH,
    build_text_encoder,
    digit_caption,
    digits_captions,
    load_text_digits_dataset,
    load_text_digits_model,
    load_text_encoder,
)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def test_every_class_is_captioned_in_every_template():
    labels = load_digits_dataset().labels.tolist()
    captions = digits_captions(labels)
    for digit in range(10):
        mine = {c for c, label in zip(captions, labels, strict=True) if label == digit}
        assert mine == {digit_caption(digit, t) for t in range(len(CAPTION_TEMPLATES))}
    assert digit_caption(3, 0) == "a handwritten three"
    assert [_prompt_digit(digit_caption(7, t)) for t in range(5)] == [7] * 5
    with pytest.raises(ValueError, match="not a digit"):
        digit_caption(10)


def test_the_shipped_encoder_is_the_one_its_config_and_seed_build(encoder):
    rebuilt = build_text_encoder(seed=0)
    assert model_fingerprint(rebuilt.text_encoder) == model_fingerprint(encoder.text_encoder)
    assert rebuilt.tokenizer.get_vocab() == encoder.tokenizer.get_vocab()
    sidecar = load_sidecar(TEXT_DIGITS_WEIGHTS_PATH)
    assert sidecar["text_encoder_fingerprint"] == encoder.fingerprint  # the UNet's own encoder
    assert not any(p.requires_grad for p in encoder.text_encoder.parameters())


def test_the_dataset_carries_each_captions_states(encoder):
    data = load_text_digits_dataset(encoder)
    assert len(data) == 1797 and data.states.shape == (1797, 32, 32)
    torch.testing.assert_close(data[5][1], encoder.encode([data.captions[5]])[0])
    assert (
        NUMBER_WORDS[int(data.labels[5])] in data.captions[5]
        or str(int(data.labels[5])) in (data.captions[5])
    )


def test_the_shipped_model_draws_the_prompted_digit(encoder):
    """Samples of "the digit d" look like d to a nearest-class-mean classifier of the real
    digits — the UNet reads the prompt (chance is 10%)."""
    model = load_text_digits_model()
    assert isinstance(model, DiffusersCrossAttentionEpsModel)
    digits = load_digits_dataset()
    means = torch.stack([digits.images[digits.labels == d].mean(0) for d in range(10)])
    prompts = [digit_caption(d, t) for d in range(10) for t in (1, 3)]
    samples = sample_ddpm(
        model,
        default_schedule(),
        len(prompts),
        seed=0,
        num_inference_steps=100,
        cond=encoder.encode(prompts),
    )
    distances = (samples[:, None] - means[None]).flatten(2).square().sum(-1)
    predicted = distances.argmin(1)
    wanted = torch.tensor([d for d in range(10) for _ in (1, 3)])
    assert float((predicted == wanted).double().mean()) >= 0.5


@pytest.mark.slow
def test_demo_text_draws_prompts_samples_and_their_influencers(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--text", "--out", str(out), "--prompt", "the digit 7", "--queries", "1"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["prompts"] == ["the digit 7"]
    assert len(results["proponent_labels"][0]) == 6
    assert set(results["proponents_of_the_prompted_digit"]) == {"the digit 7"}
    assert (out / "grid.png").stat().st_size > 0


def test_demo_prompt_needs_text(capsys):
    assert main(["demo", "--prompt", "the digit 7", "--out", "unused"]) == 2
    assert "--prompt needs --text" in capsys.readouterr().err


def test_lds_on_the_text_model_measures_and_scores_queries_with_their_prompts(tmp_path, encoder):
    config = dataclasses.replace(TINY, model="text-digits")
    run = LDSRun(tmp_path, config, num_workers=1)
    rows = run.evaluate(METHODS[:1])
    assert rows[0]["num_queries"] == config.num_queries
    cond = run.query_cond()
    torch.testing.assert_close(cond, encoder.encode(query_prompts(config.num_queries)))
    job = run.subset_jobs(config.train_seed, 1)[0]
    recorded = run.store.measurements([job], run.probe())[0]
    model = run.store.load(job.name)
    measured = measure_queries(
        model, run.schedule, run.queries(), num_draws=config.measurement_draws, cond=cond
    )
    torch.testing.assert_close(recorded, measured)
    unprompted = measure_queries(
        model, run.schedule, run.queries(), num_draws=config.measurement_draws, cond=cond.flip(0)
    )
    assert not torch.allclose(measured, unprompted)  # the prompt is part of the measurement


def test_lds_of_a_lora_fine_tune_attributes_through_the_lora_weights_only(tmp_path):
    from safetensors.torch import load_file

    config = dataclasses.replace(TINY, model="text-digits", lora_rank=2)
    run = LDSRun(tmp_path, config, num_workers=1)
    rows = run.evaluate(METHODS[:1])
    assert not math.isnan(rows[0]["lds"])
    engine = run.engine()
    assert engine.layers and all(".lora_" in name for name in engine.layers)
    model = run.store.load("base")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    # The frozen base of every LoRA model is the pretrained model, bit for bit.
    pretrained = load_file(str(run.pretrained.path("pretrained")))
    tuned = load_file(str(run.store.path("base")))
    for name, tensor in pretrained.items():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias"
        )
        assert torch.equal(tensor, tuned.get(name, tuned.get(peft_name)))
    assert any(".lora_B" in name and tensor.abs().sum() > 0 for name, tensor in tuned.items())
    with pytest.raises(ValueError, match="lora_rank"):
        dataclasses.replace(TINY, lora_rank=2)  # the digits model has no LoRA scenario
