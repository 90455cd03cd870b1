"""A custom proxy loss with NIR: define it, check it, train it briefly.

The loss is a cosine-softmax over learned class proxies (a few lines on PML's
``BaseMetricLossFunction``). ``NIRRegularizer`` finds its proxies through the
``proxies`` parameter; ``nir_loss.testing.check_proxy_loss`` verifies that the
combination trains (gradients, miners, reducers, dtypes, devices, save/load)
before you spend GPU hours on it.

Run: ``python examples/custom_proxy_loss.py --steps 30``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

from nir_loss import NIRRegularizer
from nir_loss.testing import check_flow, check_proxy_loss

# A small flow, so that the checks and the training are quick.
SMALL_FLOW = {"num_blocks": 2, "hidden_features": 32, "num_layers": 3}


# --8<-- [start:loss]
class CosineProxyLoss(BaseMetricLossFunction):
    """Cross-entropy over scaled cosines between embeddings and class proxies.

    Args:
        num_classes: Number of classes C.
        embedding_size: Embedding width D.
        scale: Inverse temperature of the softmax.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 16.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.scale = scale
        # An nn.Parameter named `proxies`, one row per class: what
        # get_proxies() looks for.
        proxies = torch.randn(num_classes, embedding_size) / 8
        self.proxies = nn.Parameter(proxies)

    def compute_loss(
        self,
        embeddings,
        labels,
        indices_tuple,
        ref_emb,
        ref_labels,
    ):
        c_f.labels_required(labels)
        # A differentiable cast (not `.data`), so float64 or another device
        # still trains the proxies.
        proxies = F.normalize(self.proxies.to(embeddings), dim=1)
        logits = self.scale * F.normalize(embeddings, dim=1) @ proxies.t()
        losses = F.cross_entropy(logits, labels, reduction="none")
        # Miners give per-sample weights, as in PML's own proxy losses.
        dtype = embeddings.dtype
        weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        return {
            "loss": {
                "losses": losses * weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }


# --8<-- [end:loss]


def build_loss(
    num_classes: int,
    embedding_size: int,
    **flow_options,
) -> NIRRegularizer:
    """The custom loss with NIR added (the flow conditions on its proxies)."""
    return NIRRegularizer(
        CosineProxyLoss(num_classes, embedding_size),
        nir_weight=0.01,
        flow_options=flow_options,
    )


def train(steps: int, seed: int = 0) -> tuple[float, float]:
    """A few steps on sklearn's digits (8x8 images, 10 classes).

    Returns:
        The first and the last step's loss.
    """
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    loss_fn = build_loss(10, 16, **SMALL_FLOW)
    groups = [{"params": model.parameters(), "lr": 1e-3}]
    groups += loss_fn.param_groups(1e-3)
    opt = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=generator)
        loss = loss_fn(F.normalize(model(x[idx]), dim=1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    loss_fn = build_loss(10, 16, **SMALL_FLOW)
    check_proxy_loss(loss_fn, num_classes=10, embedding_size=16)
    check_flow(loss_fn.flow)
    print("check_proxy_loss and check_flow passed")
    first, last = train(args.steps)
    print(f"loss {first:.3f} -> {last:.3f} after {args.steps} steps")


if __name__ == "__main__":
    main()
