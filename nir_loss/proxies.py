"""Access to the class proxies of pytorch-metric-learning losses."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

__all__ = ["get_proxies"]

# Losses whose class representatives are the columns of a (D, C) matrix, by attribute name.
_COLUMN_PROXIES: tuple[tuple[type, str], ...] = (
    (pml_losses.LargeMarginSoftmaxLoss, "W"),  # also ArcFace, CosFace, SphereFace
    (pml_losses.NormalizedSoftmaxLoss, "W"),
    (pml_losses.P2SGradLoss, "weight"),
)
# Losses with K centres per class: columns of a (D, C * K) matrix, column = class * K + k.
_MULTI_CENTRE: tuple[tuple[type, str, str], ...] = (
    (pml_losses.SubCenterArcFaceLoss, "W", "sub_centers"),
    (pml_losses.SoftTripleLoss, "fc", "centers_per_class"),
)

_NO_PROXIES = (
    "{name} has no class proxies: NIR conditions its flow on a learned representative per class. "
    "Wrap a proxy-based loss (ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss, NormalizedSoftmaxLoss, "
    "ArcFaceLoss, CosFaceLoss, ...), or give your loss a `proxies` parameter of shape (C, D) or a "
    "`get_proxies()` method returning (C, D) or (C, K, D)."
)


def get_proxies(loss: nn.Module) -> Tensor:
    """Returns the class proxies of a loss as (C, D), or (C, K, D) for K centres per class.

    The result is a view of the loss's parameter, so gradients reach it. Supported: PML's
    ProxyAnchorLoss, ProxyNCALoss, NormalizedSoftmaxLoss, ArcFaceLoss, CosFaceLoss,
    LargeMarginSoftmaxLoss, SphereFaceLoss, P2SGradLoss, SubCenterArcFaceLoss, SoftTripleLoss,
    and any module with a ``get_proxies()`` method or a ``proxies`` parameter.

    Raises:
        TypeError: The loss has no class proxies (e.g. ContrastiveLoss, TripletMarginLoss).

    Example:
        >>> from pytorch_metric_learning.losses import ArcFaceLoss, SoftTripleLoss
        >>> get_proxies(ArcFaceLoss(num_classes=10, embedding_size=4)).shape
        torch.Size([10, 4])
        >>> loss = SoftTripleLoss(10, embedding_size=4, centers_per_class=3)
        >>> get_proxies(loss).shape
        torch.Size([10, 3, 4])
    """
    getter = getattr(loss, "get_proxies", None)
    if callable(getter):
        proxies = getter()
        _check_shape(loss, proxies)
        return proxies
    for cls, attr, k_attr in _MULTI_CENTRE:
        if isinstance(loss, cls):
            w = getattr(loss, attr)
            k = int(getattr(loss, k_attr))
            return w.t().unflatten(0, (w.shape[1] // k, k))
    for cls, attr in _COLUMN_PROXIES:
        if isinstance(loss, cls):
            return getattr(loss, attr).t()
    proxies = getattr(loss, "proxies", None)
    if isinstance(proxies, Tensor):
        _check_shape(loss, proxies)
        return proxies
    raise TypeError(_NO_PROXIES.format(name=type(loss).__name__))


def _check_shape(loss: nn.Module, proxies: object) -> None:
    if not isinstance(proxies, Tensor) or proxies.dim() not in (2, 3):
        shape = tuple(proxies.shape) if isinstance(proxies, Tensor) else type(proxies).__name__
        raise TypeError(
            f"{type(loss).__name__} gave proxies of shape {shape}; expected a tensor of shape "
            "(C, D), or (C, K, D) for K centres per class."
        )
