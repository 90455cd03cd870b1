"""What the tests of the library modules share: small flows, the exact NLL, a batch, the meta device."""

import math

import torch

from .conftest import TEST_DEVICE

# Classes and embedding width of the loss tests' batches.
C, D = 6, 8
# A small flow that is not the identity at the start (identity_init=False): fast, and every
# coupling changes what it is given.
FLOW = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)
# The smallest flow (one block, the identity at the start): where the flow's values do not matter.
TINY_FLOW = {"num_blocks": 1, "hidden_features": 8, "num_layers": 2}
# The plain NLL: no training noise, no tail guard (deterministic, as the references compute).
EXACT = dict(noise_std=0.0, guard_radius=math.inf)
# Meta tensors carry shapes but no data, so any ``.item()``, ``bool(tensor)``, data-dependent
# shape or host copy raises: a computation that runs on them never syncs with the host on CUDA.
META = torch.device("meta")


def batch(b=12, dtype=torch.float32, requires_grad=True):
    """b random embeddings of width D on TEST_DEVICE, and labels cycling through the C classes."""
    x = torch.randn(b, D, dtype=dtype, device=TEST_DEVICE).requires_grad_(requires_grad)
    return x, torch.arange(b, device=TEST_DEVICE) % C
