"""Shared fixtures. Kernel tests run under the Triton interpreter when there is no GPU:
TRITON_INTERPRET must be set before triton is first imported (diffusers imports it early)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTINF_PROGRESS", "0")

from fastinf.diffusion import NoiseSchedule

from tiny import TinyConvEps, random_dataset


@pytest.fixture
def schedule():
    return NoiseSchedule.linear(100, 1e-3, 0.2)


@pytest.fixture
def conv_model():
    torch.manual_seed(0)
    return TinyConvEps().double()


@pytest.fixture
def conv_data():
    return random_dataset(6, (2, 5, 5), seed=1)
