"""Input checks that turn bad input into errors naming the fix."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning import reducers as pml_reducers
from torch import Tensor, nn

__all__ = [
    "blocking_checks",
    "check_device",
    "check_embeddings",
    "check_labels",
    "check_nir_reducer",
    "sub_loss_reducer",
    "values_checked",
]

# Blocking value checks on an accelerator: only the first calls (they read values: a host sync).
_BLOCKING_CALLS_ON_ACCELERATORS = 1
_LABELS_OUT_OF_RANGE = "labels must lie in [0, {num_classes}) (one label per class proxy)"
_NOT_FINITE = (
    "embeddings contain NaN or inf: check the model's output (learning rate, fp16 "
    "overflow, a division by a zero norm) before the loss."
)


def values_checked(validate: bool) -> bool:
    """Whether value checks (NaN/inf, label range) run: on unless switched off or traced."""
    return validate and not torch.compiler.is_compiling()


def blocking_checks(device: torch.device | str, calls_so_far: int) -> bool:
    """Whether value checks may read values on the host (``ValueError`` naming the values and the fix).

    On CPU reading a value costs nothing, so always. On an accelerator it is a host sync, so only
    for the first call; later calls check on the device without blocking
    (``torch._assert_async``: a device-side assert that fails the next synchronizing call).
    Meta tensors have no values: never.

    Example:
        >>> blocking_checks("cpu", 100), blocking_checks("cuda", 0)
        (True, True)
        >>> blocking_checks("cuda", 1)
        False
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    return kind != "meta" and calls_so_far < _BLOCKING_CALLS_ON_ACCELERATORS


def check_embeddings(embeddings: Tensor, embedding_size: int, check_values: bool = True, blocking: bool = True) -> None:
    """Raises ValueError, naming the fix, for embeddings NIR cannot use.

    With ``check_values`` it also rejects NaN/inf: with ``blocking`` by reading the result on the
    host (a host sync on CUDA), else with a device-side assert that does not wait.

    Example:
        >>> check_embeddings(torch.zeros(2, 4), embedding_size=4)
        >>> check_embeddings(torch.zeros(2, 3), embedding_size=4)
        Traceback (most recent call last):
        ...
        ValueError: embeddings have width 3 but the loss was built with embedding_size=4: ...
    """
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}.")
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be 2-D (batch, {embedding_size}); got shape {tuple(embeddings.shape)}. "
            "Flatten per-sample features first, e.g. embeddings.flatten(1)."
        )
    if embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"embeddings have width {embeddings.shape[1]} but the loss was built with "
            f"embedding_size={embedding_size}: make the embedding head output {embedding_size} "
            f"features, or build the loss with embedding_size={embeddings.shape[1]}."
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}: use embeddings.float().")
    if not check_values or embeddings.numel() == 0:
        return
    finite = torch.isfinite(embeddings).all()
    if not blocking:
        torch._assert_async(finite, _NOT_FINITE)
    elif not bool(finite):
        raise ValueError(
            "embeddings contain NaN or inf: check the model's output (learning rate, fp16 "
            "overflow, a division by a zero norm) before the loss."
        )


def check_labels(
    labels: Tensor | None, batch_size: int, num_classes: int, check_values: bool = True, blocking: bool = True
) -> None:
    """Raises ValueError, naming the fix, for labels that are not 1-D int64 in [0, num_classes).

    With ``check_values`` it also checks the range: with ``blocking`` by reading the labels'
    extremes on the host (a host sync on CUDA), else with a device-side assert that does not wait.

    Example:
        >>> check_labels(torch.tensor([0, 3]), batch_size=2, num_classes=3)
        Traceback (most recent call last):
        ...
        ValueError: labels must lie in [0, 3) (one label per class proxy); got values in [0, 3]. ...
    """
    if labels is None:
        raise ValueError("NIR needs labels: call loss(embeddings, labels) with labels of shape (batch,), int64.")
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"labels must be a torch.Tensor of int64, got {type(labels).__name__}: use torch.as_tensor(labels)."
        )
    if labels.dim() != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must be 1-D with one label per embedding, shape ({batch_size},); "
            f"got shape {tuple(labels.shape)}. Use labels.view(-1)."
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got {labels.dtype}: use labels.long().")
    if not check_values or labels.numel() == 0:
        return
    if not blocking:
        in_range = labels.clamp(0, num_classes - 1).eq(labels).all()
        torch._assert_async(
            in_range,
            _LABELS_OUT_OF_RANGE.format(num_classes=num_classes)
            + (
                ": a label outside it reached the loss (checked on the device, so the values are not shown). "
                "Map your class ids to 0..C-1 first, or build the loss with a larger num_classes."
            ),
        )
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (one label per class proxy); got values in "
            f"[{low}, {high}]. Map your class ids to 0..C-1 first, or build the loss with "
            f"num_classes={max(high + 1, num_classes)}."
        )


def sub_loss_reducer(reducer: Any, sub_loss: str = "nir_loss") -> Any:
    """The reducer that reduces ``sub_loss``: the matching one of a ``MultipleReducers``, else ``reducer``.

    Example:
        >>> from pytorch_metric_learning.reducers import (
        ...     MeanReducer,
        ...     MultipleReducers,
        ...     SumReducer,
        ... )
        >>> both = MultipleReducers(
        ...     {"nir_loss": SumReducer()}, default_reducer=MeanReducer()
        ... )
        >>> (
        ...     type(sub_loss_reducer(both)).__name__,
        ...     type(sub_loss_reducer(both, "pos_loss")).__name__,
        ... )
        ('SumReducer', 'MeanReducer')
    """
    if isinstance(reducer, pml_reducers.MultipleReducers):
        return reducer.reducers[sub_loss] if sub_loss in reducer.reducers else reducer.default_reducer
    return reducer


def check_nir_reducer(reducer: object, sub_loss: str = "nir_loss") -> None:
    """Raises ValueError, naming the fix, if the reducer of the NIR sub-loss filters losses by value.

    PML's ``ThresholdReducer`` (and ``AvgNonZeroReducer``, its ``low=0`` case) keeps only the
    losses above ``low`` / below ``high``. The NIR term is a negative log-likelihood whose sign
    and scale depend on the density (it is usually negative once the flow has trained), so such
    a filter would silently drop it. With ``MultipleReducers`` the reducer of ``sub_loss`` is checked.

    Example:
        >>> from pytorch_metric_learning.reducers import (
        ...     AvgNonZeroReducer,
        ...     MeanReducer,
        ...     MultipleReducers,
        ... )
        >>> check_nir_reducer(
        ...     MultipleReducers(
        ...         {"nir_loss": MeanReducer()}, default_reducer=AvgNonZeroReducer()
        ...     )
        ... )
        >>> check_nir_reducer(AvgNonZeroReducer())
        Traceback (most recent call last):
        ...
        ValueError: AvgNonZeroReducer(low=0, high=None) cannot reduce the NIR term: ...
    """
    reducer = sub_loss_reducer(reducer, sub_loss)
    if isinstance(reducer, pml_reducers.ThresholdReducer):
        raise ValueError(
            f"{type(reducer).__name__}(low={reducer.low}, high={reducer.high}) cannot reduce the NIR term: it "
            "keeps only losses above low / below high, and the NIR term is a negative log-likelihood, usually "
            "below 0, so it would silently drop out. Reduce the NIR term with a MeanReducer, e.g. "
            f"reducer=MultipleReducers({{'{sub_loss}': MeanReducer()}}, "
            f"default_reducer={type(reducer).__name__}(...)), "
            "or give the thresholding reducer to the wrapped loss: "
            "NIRRegularizer(ProxyNCALoss(..., reducer=AvgNonZeroReducer()))."
        )


def check_device(embeddings: Tensor, module: nn.Module, what: str = "the NIR flow") -> None:
    """Raises ValueError, naming the fix, if ``module``'s parameters are not on the embeddings' device.

    Nothing is moved inside a call: that would leave the optimizer's state on the old device
    (and on "meta" lose the weights). Free: no host sync.

    Example:
        >>> emb = torch.zeros(2, 4, device="meta")
        >>> check_device(emb, torch.nn.Linear(4, 4), "the loss")
        Traceback (most recent call last):
        ...
        ValueError: embeddings are on meta but the loss is on cpu: ... loss_fn.to('meta').
    """
    p = next(module.parameters(), None)
    if p is not None and p.device != embeddings.device:
        raise ValueError(
            f"embeddings are on {embeddings.device} but {what} is on {p.device}: move the loss to the "
            f"embeddings' device once, before building the optimizer: loss_fn.to({str(embeddings.device)!r})."
        )
