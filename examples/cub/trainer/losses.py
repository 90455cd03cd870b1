"""Builds the metric-learning loss: a PML proxy loss, with or without NIR (nir_loss public API)."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import nn

import nir_loss

LOSSES = ("proxyanchor", "proxynca", "softtriple", "normsoftmax", "arcface")


def build_loss(
    name: str,
    num_classes: int,
    embedding_size: int,
    nir: bool = True,
    nir_weight: float | None = None,
    objective: str = nir_loss.DEFAULT_OBJECTIVE,
    margin: float = 0.1,
    alpha: float = 32.0,
    flow_options: dict | None = None,
) -> nn.Module:
    """A PML proxy loss; with ``nir`` the NIR term is added (ProxyAnchorNIRLoss or NIRRegularizer).

    Args:
        name: One of ``LOSSES``.
        num_classes: Training classes C.
        embedding_size: Embedding width D.
        nir: Add Non-isotropy Regularization.
        nir_weight: Weight of the NIR term (None: the library's default for D and the objective).
        objective: ``"nll"`` or ``"exp_nll"``.
        margin: ProxyAnchor margin.
        alpha: ProxyAnchor scale.
        flow_options: ``ProxyConditionedFlow`` options (num_blocks, hidden_features, num_layers, ...).
    """
    flow_options = dict(flow_options or {})
    if name == "proxyanchor":
        if nir:
            return nir_loss.ProxyAnchorNIRLoss(
                num_classes,
                embedding_size,
                margin=margin,
                alpha=alpha,
                nir_weight=nir_weight,
                objective=objective,
                flow_options=flow_options,
            )
        return pml_losses.ProxyAnchorLoss(num_classes, embedding_size, margin=margin, alpha=alpha)
    if name == "proxynca":
        base = pml_losses.ProxyNCALoss(num_classes, embedding_size)
    elif name == "softtriple":
        base = pml_losses.SoftTripleLoss(num_classes, embedding_size)
    elif name == "normsoftmax":
        base = pml_losses.NormalizedSoftmaxLoss(num_classes, embedding_size)
    elif name == "arcface":
        base = pml_losses.ArcFaceLoss(num_classes, embedding_size)
    else:
        raise ValueError(f"unknown loss {name!r}: choose from {', '.join(LOSSES)}")
    if not nir:
        return base
    return nir_loss.NIRRegularizer(base, nir_weight=nir_weight, objective=objective, flow_options=flow_options)


def loss_param_groups(loss_fn: nn.Module, lr: float, proxy_lr_mult: float, flow_lr_mult: float) -> list[dict]:
    """Optimizer groups of the loss's own parameters: the library's ``param_groups`` for NIR
    losses; for a plain PML loss, its proxies at lr x proxy_lr_mult."""
    if hasattr(loss_fn, "param_groups"):
        return loss_fn.param_groups(lr, proxy_lr_mult=proxy_lr_mult, flow_lr_mult=flow_lr_mult)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    return [{"params": params, "lr": lr * proxy_lr_mult, "name": "proxies"}] if params else []


def has_nir(loss_fn: nn.Module) -> bool:
    """Whether the loss carries an NIR flow (then log_likelihood is available)."""
    return hasattr(loss_fn, "log_likelihood")
