"""An independent implementation of the reference NIR flow in FrEIA, for speed comparisons.

5 x [PermuteRandom, GLOWCouplingBlock(clamp=2, ATAN soft clamp)], each subnet 8 Linear layers of
width 128 with ReLU between them; the condition (the L2-normalized proxy of the sample's class) is
concatenated to the subnet input of every coupling, as the reference code (ExplainableML/
NonIsotropicProxyDML, criteria/nir.py) built it with FrEIA.
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn


def subnet_constructor(hidden: int = 128, num_layers: int = 8):
    def make(c_in: int, c_out: int) -> nn.Module:
        dims = [c_in] + [hidden] * (num_layers - 1) + [c_out]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return make


def build_freia_flow(
    features: int,
    context_features: int | None = None,
    num_blocks: int = 5,
    hidden: int = 128,
    num_layers: int = 8,
    clamp: float = 2.0,
) -> Ff.GraphINN:
    context_features = features if context_features is None else context_features
    cond = Ff.ConditionNode(context_features, name="proxy")
    nodes = [Ff.InputNode(features, name="x")]
    for k in range(num_blocks):
        nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": k}, name=f"perm{k}"))
        nodes.append(
            Ff.Node(
                nodes[-1],
                Fm.GLOWCouplingBlock,
                {"subnet_constructor": subnet_constructor(hidden, num_layers), "clamp": clamp},
                conditions=cond,
                name=f"glow{k}",
            )
        )
    nodes.append(Ff.OutputNode(nodes[-1], name="z"))
    return Ff.GraphINN(nodes + [cond], verbose=False)


def freia_log_likelihood(
    inn: Ff.GraphINN, embeddings: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """log p(x_i | normalized proxy of y_i), (B,), with the -(D/2) log(2 pi) constant."""
    context = F.normalize(proxies.index_select(0, labels), dim=1)
    z, log_jac = inn(embeddings, c=[context])
    return -0.5 * z.square().sum(1) + log_jac - 0.5 * z.shape[1] * math.log(2 * math.pi)
