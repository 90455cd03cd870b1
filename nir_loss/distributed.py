"""Distributed training: PML's DistributedLossWrapper with correct gradients for loss parameters."""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import distributed as pml_dist
from torch import nn

__all__ = ["DistributedLossWrapper"]


def _divide_by_world_size(grad: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return grad / torch.distributed.get_world_size()
    return grad


class DistributedLossWrapper(pml_dist.DistributedLossWrapper):
    """PML's ``DistributedLossWrapper`` that also gets the loss's own parameters right.

    PML's wrapper returns world_size x the loss on the gathered batch, which gives the model
    the right gradients after DDP's averaging; but parameters owned by the loss (proxies, the
    NIR flow) see the whole batch on every rank and would get world_size x their gradient.
    This wrapper divides those gradients by the world size (a gradient hook, so nothing to
    call after ``backward``). Keep the loss out of the DDP-wrapped model; every rank then
    holds the same loss gradients and its optimizer keeps the proxies and flow in sync.
    Only ``efficient=False`` (PML's default) is supported: proxy losses take no ``ref_emb``.

    Example:
        >>> from nir_loss import ProxyAnchorNIRLoss
        >>> loss_fn = DistributedLossWrapper(ProxyAnchorNIRLoss(5, embedding_size=8))
    """

    def __init__(self, loss: nn.Module, efficient: bool = False) -> None:
        if efficient:
            raise ValueError(
                "efficient=True passes the gathered batch as ref_emb, which proxy losses do not "
                "support: use efficient=False (the default)."
            )
        super().__init__(loss, efficient=False)
        self._hooks = [p.register_hook(_divide_by_world_size) for p in loss.parameters()]
