"""Distributed training: PML's DistributedLossWrapper with correct gradients for loss parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_metric_learning.utils import distributed as pml_dist
from torch import Tensor, nn

from .validation import values_checked

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
    the model's gradients are right after DDP's averaging; the batch is concatenated in rank
    order, the same on every rank (PML puts each rank's own part first, and a miner's
    ``indices_tuple``, which refers to PML's order, is renumbered). Unlike it, the loss's own parameters
    (proxies, the NIR flow), which see the whole batch on every rank and are not averaged by
    DDP, get the gradient of the loss itself, not world_size x that gradient: every rank then
    computes the same, correct gradient and its optimizer keeps the proxies and flow in sync.

    All of this happens inside ``forward`` (the world-size factor is applied to the local
    embeddings' gradient, not to the returned loss's), so it survives ``copy.deepcopy``,
    pickling and ``torch.save`` of the wrapper, and wrapping the same loss twice never applies
    it twice. The loss's own randomness (NIR's training noise) is drawn from a generator seeded
    alike on every rank (rank 0's seed, broadcast at the first call, and a call counter), so
    every rank computes the same loss on the same batch whatever its RNG did in between (data
    augmentation, say); torch's RNG state is restored after the call. Keep the loss out of the
    DDP-wrapped model. Only ``efficient=False`` (PML's default) is supported: proxy losses take
    no ``ref_emb``. Every rank must pass the same batch size (``drop_last=True``): each call
    first exchanges the ranks' batch sizes (one small all_gather, read on the host) and raises
    the same ``ValueError`` on every rank if they differ. The wrapped loss's ``validate=False``
    skips that check and its host read.

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
        self._seed: int | None = None  # agreed by all ranks at the first distributed call
        self._calls = 0

    @contextlib.contextmanager
    def _same_rng_on_every_rank(self, device: torch.device) -> Iterator[None]:
        """Seeds the embeddings' device generator alike on every rank for one call; restores it after."""
        cuda = device.type == "cuda"
        if self._seed is None:
            with torch.random.fork_rng(devices=[]):
                seed = torch.randint(2**62, (1,)).to(device)
            torch.distributed.broadcast(seed, src=0)
            self._seed = int(seed.item())  # one host sync, at the first call only
        self._calls += 1
        step_seed = (self._seed + self._calls) % 2**63
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(step_seed)
            else:
                torch.random.default_generator.manual_seed(step_seed)
            yield

    def forward_regular_loss(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size):
        if world_size <= 1:
            return self.loss(emb, labels, indices_tuple, ref_emb, ref_labels)
        # PML: loss(gathered) * world_size, whose gradient is world_size x too large for the
        # loss's parameters. Here: the gradient reaches the local embeddings world_size x (as
        # with PML) and the loss's parameters 1x; the returned value is PML's.
        if values_checked(getattr(self.loss, "validate", True)):  # a host read: off with validate=False
            _check_equal_batch_sizes(emb, world_size)
        rank = torch.distributed.get_rank()
        emb = _ScaleGrad.apply(emb, float(world_size))
        all_emb = _gather_in_rank_order(emb, rank, world_size)
        all_labels = None if labels is None else _gather_in_rank_order(labels.to(emb.device), rank, world_size)
        all_ref_emb = all_ref_labels = None
        if ref_emb is not None:
            all_ref_emb = _gather_in_rank_order(_ScaleGrad.apply(ref_emb, float(world_size)), rank, world_size)
            if ref_labels is not None:
                all_ref_labels = _gather_in_rank_order(ref_labels.to(ref_emb.device), rank, world_size)
        if indices_tuple is not None:  # PML's gathered batch puts the local part first: renumber
            order = _pml_to_rank_order(emb.shape[0], rank, world_size, emb.device)
            indices_tuple = tuple(order[t] for t in indices_tuple)
        with self._same_rng_on_every_rank(all_emb.device):
            loss = self.loss(all_emb, all_labels, indices_tuple, all_ref_emb, all_ref_labels)
        return loss + (world_size - 1) * loss.detach()


def _check_equal_batch_sizes(emb: Tensor, world_size: int) -> None:
    """Raises the same ValueError on every rank if the ranks' batch sizes differ.

    Gathering needs one size (gloo fails with "Received data size doesn't match" otherwise, NCCL
    may hang); the sizes are exchanged first (a one-number all_gather and a host read).
    """
    mine = torch.tensor([emb.shape[0]], dtype=torch.int64, device=emb.device)
    sizes = [torch.empty_like(mine) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, mine)
    batch_sizes = [int(n) for n in torch.cat(sizes).tolist()]
    if len(set(batch_sizes)) > 1:
        raise ValueError(
            f"DistributedLossWrapper needs the same batch size on every rank; got batch sizes "
            f"{batch_sizes} (rank 0 first). Use DataLoader(..., drop_last=True) with a "
            "DistributedSampler, so that every rank gets full batches and as many of them."
        )


def _gather_in_rank_order(x: Tensor, rank: int, world_size: int) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, the same on every rank; the local part keeps its graph.

    (PML puts the local part first, so each rank would see the batch in another order: sums
    would round differently, and per-sample noise would land on other samples.)
    """
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts)


def _pml_to_rank_order(batch: int, rank: int, world_size: int, device: torch.device) -> Tensor:
    """Position in the rank-ordered gathered batch of each position in PML's (local part first)."""
    others = [r for r in range(world_size) if r != rank]
    blocks = [rank, *others]
    return torch.cat([torch.arange(batch, device=device) + b * batch for b in blocks])
