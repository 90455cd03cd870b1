"""Distributed training: PML's DistributedLossWrapper with correct gradients for loss parameters."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.utils import distributed as pml_dist
from torch import Tensor, nn

__all__ = ["DistributedLossWrapper"]


class _ScaleGrad(torch.autograd.Function):
    """The identity in the forward pass; multiplies the incoming gradient by ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class DistributedLossWrapper(pml_dist.DistributedLossWrapper):
    """PML's ``DistributedLossWrapper`` that also gets the loss's own parameters right.

    Like PML's wrapper (``efficient=False``) it gathers the embeddings and labels of all ranks,
    computes the loss on the whole batch on every rank and returns world_size x that loss, so
    the model's gradients are right after DDP's averaging. Unlike it, the loss's own parameters
    (proxies, the NIR flow), which see the whole batch on every rank and are not averaged by
    DDP, get the gradient of the loss itself, not world_size x that gradient: every rank then
    computes the same, correct gradient and its optimizer keeps the proxies and flow in sync.

    All of this happens inside ``forward`` (the world-size factor is applied to the local
    embeddings' gradient, not to the returned loss's), so it survives ``copy.deepcopy``,
    pickling and ``torch.save`` of the wrapper, and wrapping the same loss twice never applies
    it twice. Keep the loss out of the DDP-wrapped model. Only ``efficient=False`` (PML's
    default) is supported: proxy losses take no ``ref_emb``.

    Example:
        >>> from nir_loss import ProxyAnchorNIRLoss
        >>> loss_fn = DistributedLossWrapper(ProxyAnchorNIRLoss(num_classes=5, embedding_size=8))
    """

    def __init__(self, loss: nn.Module, efficient: bool = False) -> None:
        if efficient:
            raise ValueError(
                "efficient=True passes the gathered batch as ref_emb, which proxy losses do not "
                "support: use efficient=False (the default)."
            )
        super().__init__(loss, efficient=False)

    def forward_regular_loss(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size):
        if world_size <= 1:
            return self.loss(emb, labels, indices_tuple, ref_emb, ref_labels)
        # PML: loss(gathered) * world_size, whose gradient is world_size x too large for the
        # loss's parameters. Here: the gradient reaches the local embeddings world_size x (as
        # with PML) and the loss's parameters 1x; the returned value is PML's.
        emb = _ScaleGrad.apply(emb, float(world_size))
        if ref_emb is not None:
            ref_emb = _ScaleGrad.apply(ref_emb, float(world_size))
        all_emb, all_labels, all_ref_emb, all_ref_labels, _ = pml_dist.gather_emb_and_ref(
            emb, labels, ref_emb, ref_labels)
        loss = self.loss(all_emb, all_labels, indices_tuple, all_ref_emb, all_ref_labels)
        return loss + (world_size - 1) * loss.detach()
