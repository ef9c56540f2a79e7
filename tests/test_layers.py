"""Captured rows and K-FAC factor sums against brute-force sums over positions."""

import pytest
import torch
from torch import nn

from fastinf.curvature.factors import FactorSums
from fastinf.layers import capture_layers, find_layers

CONV_VARIANTS = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=3, stride=2, padding=0, dilation=1),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=1),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=3, stride=1, padding="same", dilation=1),
]


def brute_force_patches(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """Patches [n, R, C·kh·kw] by explicit loops over output positions."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        ph, pw = conv.padding
    padded = nn.functional.pad(inputs, (pw, pw, ph, ph))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(patch.reshape(inputs.shape[0], -1))
    return torch.stack(rows, dim=1)


class Recorder:
    def __init__(self):
        self.calls = []
        self.layer_calls = []

    def __call__(self, name, call):
        self.calls.append((name, *call.rows()))
        self.layer_calls.append(call)


@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_conv_rows_match_brute_force_patches(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, **variant)).double()
    inputs = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    recorder = Recorder()
    layers = find_layers(model)
    with capture_layers(layers, recorder) as capture:
        out = model(inputs)
        seed = torch.randn_like(out)
        capture.backward(out, seed)
    ((_, act, grad),) = recorder.calls
    torch.testing.assert_close(act, brute_force_patches(model[0], inputs))
    torch.testing.assert_close(grad, seed.flatten(2).transpose(1, 2))
    # Σ_r b_r a_rᵀ is the weight gradient of ⟨out, seed⟩.
    (weight_grad,) = torch.autograd.grad((model(inputs) * seed).sum(), model[0].weight)
    torch.testing.assert_close(torch.einsum("nro,nri->oi", grad, act), weight_grad.flatten(1))
    # Per-example gradients without unfolding (grouped weight-gradient convolution), 2 draws
    # per example, against the rows.
    weight, bias = recorder.layer_calls[0].example_gradients(2)
    expected = torch.einsum(
        "bmo,bmi->boi", grad.reshape(2, -1, 3), act.reshape(2, -1, act.shape[-1])
    )
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(bias, grad.reshape(2, -1, 3).sum(1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factor_sums_match_brute_force(approx):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2)
    ).double()
    inputs = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    layers = find_layers(model)
    sums = FactorSums(layers, approx, "cpu")
    with capture_layers(layers, sums) as capture:
        out = model(inputs)
        seed = torch.randn_like(out)
        capture.backward(out, seed)
    # Brute force for the first conv: inputs are known; output-gradients via autograd.
    hidden = model[0](inputs)
    (hidden_grad,) = torch.autograd.grad((model[2](model[1](hidden)) * seed).sum(), hidden)
    patches = brute_force_patches(model[0], inputs)  # [n, R, d_in]
    grads = hidden_grad.flatten(2).transpose(1, 2)  # [n, R, d_out]
    act_sum = torch.zeros(18, 18, dtype=torch.float64)
    grad_sum = torch.zeros(3, 3, dtype=torch.float64)
    for n in range(inputs.shape[0]):
        if approx == "expand":
            for r in range(patches.shape[1]):
                act_sum += torch.outer(patches[n, r], patches[n, r])
                grad_sum += torch.outer(grads[n, r], grads[n, r])
        else:
            mean_act, sum_grad = patches[n].mean(0), grads[n].sum(0)
            act_sum += torch.outer(mean_act, mean_act)
            grad_sum += torch.outer(sum_grad, sum_grad)
    torch.testing.assert_close(sums.act["0"], act_sum, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sums.grad["0"], grad_sum, rtol=1e-6, atol=1e-9)
    expected_count = patches.shape[0] * (patches.shape[1] if approx == "expand" else 1)
    assert sums.act_count["0"] == expected_count


class TwiceLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_contributes_both_calls_as_positions():
    torch.manual_seed(2)
    model = TwiceLinear().double()
    inputs = torch.randn(3, 5, 4, dtype=torch.float64)  # 5 positions per item
    recorder = Recorder()
    with capture_layers(find_layers(model), recorder) as capture:
        out = model(inputs)
        seed = torch.randn_like(out)
        capture.backward(out, seed)
    delivered = {name: (act, grad) for name, act, grad in recorder.calls}
    assert len(recorder.calls) == 2, "each layer is delivered exactly once per pass"
    act, grad = delivered["shared"]
    assert act.shape == (3, 10, 4) and grad.shape == (3, 10, 4)
    weight_grad, bias_grad = torch.autograd.grad(
        (model(inputs) * seed).sum(), [model.shared.weight, model.shared.bias]
    )
    torch.testing.assert_close(torch.einsum("nro,nri->oi", grad, act), weight_grad)
    torch.testing.assert_close(grad.sum((0, 1)), bias_grad)


def test_find_layers_excludes_norms_frozen_and_rejects_grouped_conv():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.Linear(3, 3)
    )
    model[4].weight.requires_grad_(False)
    assert list(find_layers(model)) == ["0", "3"]
    with pytest.raises(ValueError, match="grouped convolutions"):
        find_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(ValueError, match=r"no trainable nn\.Linear"):
        find_layers(nn.Sequential(nn.GroupNorm(1, 2)))


def test_subclasses_are_tracked():
    class MyLinear(nn.Linear):
        pass

    assert list(find_layers(nn.Sequential(MyLinear(3, 2)))) == ["0"]
