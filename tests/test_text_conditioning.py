"""Cross-attention (text-to-image) denoisers: a diffusers `UNet2DConditionModel` is wrapped
on its own, items and queries carry text states [L, D], per-example gradients match
autograd, and the prompt's states change the scores."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_gradients import assert_example_gradients, autograd_example_gradient

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.data import TextStatesDataset
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.models import DiffusersCrossAttentionEpsModel, as_eps_model

WIDTH, TOKENS = 8, 3


def tiny_text_unet() -> UNet2DConditionModel:
    """A 4×4 UNet2DConditionModel whose second block cross-attends to [L, 8] states."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=WIDTH,
        attention_head_dim=4,
        norm_num_groups=2,
    ).double()


def _states(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, TOKENS, WIDTH, generator=generator, dtype=torch.float64)


@pytest.fixture(scope="module")
def engine():
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(5, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    data = TextStatesDataset(images, _states(5, 1))
    config = ScoreConfig(train_draws=2, query_draws=3, damping=1e-3, damping_mode="absolute")
    return InfluenceEngine(tiny_text_unet(), NoiseSchedule.linear(100), data, config=config)


def test_the_conditional_unet_is_wrapped_and_its_cross_attention_tracked(engine):
    assert isinstance(engine.model, DiffusersCrossAttentionEpsModel)
    assert engine.model.cond_width == WIDTH and engine.sample_shape == (1, 4, 4)
    assert any(name.endswith("attn2.to_k") for name in engine.layers)  # reads the text
    assert any(name.endswith("attn1.to_q") for name in engine.layers)


def test_per_example_gradients_with_text_states_match_autograd(engine):
    indices = [3, 0, 4]
    grads = engine.train_gradients(indices)
    for row, index in enumerate(indices):
        image, states = engine.train_set[index]
        expected = autograd_example_gradient(
            engine.model, engine.schedule, image, states, index, 2, 0
        )
        assert_example_gradients(grads, row, expected)


def test_the_prompt_states_seed_and_steer_the_query_measurement(engine):
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    query = engine.train_set[1][0][None]
    prompt, other = _states(1, 7), _states(1, 8)
    first = engine.score(query, 2, cond=prompt, return_scores=True)
    again = engine.score(query, 2, cond=prompt[0], return_scores=True)  # one [L, D] for all
    changed = engine.score(query, 2, cond=other, return_scores=True)
    assert torch.equal(first.scores, again.scores)
    assert torch.equal(first.query_ids, again.query_ids)
    assert not torch.equal(first.query_ids, changed.query_ids)
    assert not torch.allclose(first.scores, changed.scores)
    # Batched with another query, each answer is the one it gets alone.
    both = engine.score(
        torch.cat([query, query]), 2, cond=torch.cat([prompt, other]), return_scores=True
    )
    torch.testing.assert_close(both.scores[0], first.scores[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(both.scores[1], changed.scores[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "cond, message",
    [
        (None, r"needs them as cond"),
        (torch.tensor([1]), "must be a float tensor"),
        (torch.zeros(1, TOKENS, WIDTH + 1, dtype=torch.float64), "pass \\[Q=1, L, 8\\]"),
        (torch.full((1, TOKENS, WIDTH), float("nan"), dtype=torch.float64), "NaN"),
    ],
)
def test_bad_query_states_are_named(engine, cond, message):
    query = engine.train_set[1][0][None]
    with pytest.raises(ValueError, match=message):
        engine.query_gradients(query, cond)


def test_items_with_states_of_different_lengths_are_refused_with_the_fix():
    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.zeros(1, 4, 4, dtype=torch.float64), torch.zeros(2 + index, WIDTH)

    engine = InfluenceEngine(tiny_text_unet(), NoiseSchedule.linear(100), Ragged())
    with pytest.raises(ValueError, match=r"one shape.*same length"):
        engine.train_gradients([0, 1])


def test_a_text_states_dataset_checks_its_inputs():
    images = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[N=2, L, D\]"):
        TextStatesDataset(images, torch.zeros(3, TOKENS, WIDTH))
    with pytest.raises(ValueError, match="NaN"):
        TextStatesDataset(images, torch.full((2, TOKENS, WIDTH), float("nan")))
    assert isinstance(as_eps_model(tiny_text_unet()), DiffusersCrossAttentionEpsModel)


def test_a_dit_transformer_is_wrapped_and_its_gradients_match_autograd():
    from diffusers import DiTTransformer2DModel

    from fastinf.data import ImageTensorDataset
    from fastinf.models import DiffusersTransformerEpsModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=1,
        out_channels=2,  # ε and a learned variance: ε is the first channel
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=3,
    ).double()
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(4, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    data = ImageTensorDataset(images, torch.tensor([0, 2, 1, 2]))
    config = ScoreConfig(train_draws=2, query_draws=2, damping=1e-3, damping_mode="absolute")
    engine = InfluenceEngine(dit, NoiseSchedule.linear(100), data, config=config)
    assert isinstance(engine.model, DiffusersTransformerEpsModel)
    engine.model.eval()  # in training mode its label embedding drops labels at random (CFG)
    assert engine.model.num_classes == 3 and engine.sample_shape == (1, 4, 4)
    indices = [2, 0]
    grads = engine.train_gradients(indices)
    for row, index in enumerate(indices):
        image, label = data[index]
        expected = autograd_example_gradient(
            engine.model, engine.schedule, image, int(label), index, 2, 0
        )
        assert_example_gradients(grads, row, expected)
    engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
    result = engine.score(images[:1], 2, cond=torch.tensor([1]))
    assert result.proponents.indices.shape == (1, 2)
