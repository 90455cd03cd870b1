"""Shared test settings: one torch thread, dtypes and device from the environment like PML's tests."""

import os

import pytest
import torch

torch.set_num_threads(1)

TEST_DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
TEST_DTYPES = [getattr(torch, d) for d in os.environ.get("TEST_DTYPES", "float32,float64").split(",")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
