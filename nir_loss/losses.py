"""pytorch-metric-learning adapters: NIRRegularizer and ProxyAnchorNIRLoss."""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, ProxyAnchorLoss
from pytorch_metric_learning.reducers import DivisorReducer
from pytorch_metric_learning.utils import common_functions as c_f
from torch import Tensor, nn

if TYPE_CHECKING:
    from typing_extensions import Self

from .flow import ProxyConditionedFlow, _compute_dtype, _SameReleasePickles
from .nir import DEFAULT_OBJECTIVE as DEFAULT_OBJECTIVE  # defined in nir.py; imported from here up to 0.3.0
from .nir import NIROptions, NIRTerm, default_nir_weight
from .proxies import get_proxies
from .validation import (
    blocking_checks,
    check_device,
    check_embeddings,
    check_labels,
    check_nir_reducer,
    sub_loss_reducer,
    values_checked,
)

__all__ = [
    "NIRRegularizer",
    "ProxyAnchorNIRLoss",
    "DEFAULT_PROXY_LR_MULT",
    "DEFAULT_FLOW_LR_MULT",
    "miner_weights",
    "weighted_element_losses",
]

# Defaults and the measurements behind them: docs/choosing.md (the NIR term's own are in nir.py).
DEFAULT_PROXY_LR_MULT = 100.0
"""Default learning-rate multiplier of the proxies in ``param_groups``."""
DEFAULT_FLOW_LR_MULT = 1.0
"""Default learning-rate multiplier of the flow in ``param_groups``: the flow trains at the base
learning rate (a 10x multiplier at a base lr of 1e-3 sharpened the flow into NLL spikes;
[Choose the weight and objective](choosing.md))."""

_F = TypeVar("_F", bound=Callable[..., Any])


def miner_weights(
    indices_tuple: tuple[Tensor, ...] | None, batch_size: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Per-sample weights from a PML miner's output, without a host sync.

    Like ``pytorch_metric_learning.utils.loss_and_miner_utils.convert_to_weights``: a sample
    weighs (times it is named) / (most times any sample is named). Unlike it, a miner that names
    no sample gives all-zero weights (PML would fall back to all ones). None means no miner.

    Example:
        >>> pairs = (torch.tensor([0, 0]), torch.tensor([1, 2]))
        >>> miner_weights(pairs, 4, torch.float32, "cpu")
        tensor([1.0000, 0.5000, 0.5000, 0.0000])
    """
    if indices_tuple is None:
        return None
    named = [t.reshape(-1).to(device=device, dtype=torch.int64) for t in indices_tuple]
    counts = torch.zeros(batch_size, dtype=dtype, device=device)
    if named:
        idx = torch.cat(named)
        counts = counts.index_add(0, idx, torch.ones_like(idx, dtype=dtype))
    return counts / counts.max().clamp_min(1) if batch_size else counts


def weighted_element_losses(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    """Element losses whose plain mean is the weighted mean of ``per_sample``.

    ``per_sample_i * w_i / mean(w)``; all-zero weights give all-zero losses (never NaN).

    Example:
        >>> losses, weights = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0])
        >>> weighted_element_losses(losses, weights).mean()
        tensor(1.)
    """
    if weights is None:
        return per_sample
    weights = weights.to(per_sample.dtype)
    scale = weights / weights.mean().clamp_min(torch.finfo(per_sample.dtype).tiny)
    return torch.where(weights > 0, per_sample * scale, torch.zeros_like(per_sample))


def _checked_nir_weight(value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0, else a ValueError naming the fix."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(
            f"nir_weight must be a finite number >= 0 (0: no NIR term), got {value!r}. A negative weight "
            "would maximise the NLL, NaN or inf make the loss NaN: pass None for "
            "default_nir_weight(embedding_size, objective), or a value such as 0.01."
        )
    return weight


# NIRRegularizer's keywords before 0.3.0, removed in 0.4.0 (deprecated in 0.3.0): old -> new.
_RENAMED = {"weight": "nir_weight"}


def _keywords_name_the_fix(init: _F) -> _F:
    """``__init__`` whose TypeError for a keyword it does not take names the fix (Python's names the keyword only).

    A spelling removed in 0.4.0 gets its new name; flow options given as keywords are shown
    inside ``flow_options={...}``; any other name gets the list of valid ones.
    """
    own = [n for n in inspect.signature(init).parameters if n != "self"]

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(own))
        if unknown:
            raise TypeError(_unknown_keywords_message(type(self).__name__, unknown, kwargs, own))
        return init(self, *args, **kwargs)

    return cast(_F, checked)


def _unknown_keywords_message(owner: str, unknown: list[str], given: Mapping[str, Any], own: list[str]) -> str:
    flow_names = NIROptions.flow_option_names()
    fixes = [
        f"{old}= is {_RENAMED[old]}= (the old spelling was removed in 0.4.0)" for old in unknown if old in _RENAMED
    ]
    flow = [n for n in unknown if n in flow_names]
    if flow:
        options = ", ".join(f"{n!r}: {given[n]!r}" for n in flow)
        fixes.append(
            f"flow options go inside flow_options={{...}} (as keywords removed in 0.4.0): flow_options={{{options}}}"
        )
    if set(unknown) - set(_RENAMED) - set(flow):
        fixes.append(
            f"expected its own parameters ({', '.join(own)}), or ProxyConditionedFlow options inside "
            f"flow_options={{...}} ({', '.join(flow_names)})"
        )
    return f"{owner} got unexpected keyword arguments {unknown}; {'; '.join(fixes)}."


def _pml_regularizer_role(module: object) -> str | None:
    """``"embedding"`` or ``"weight"`` if a PML loss is calling ``module`` as its regularizer, else None."""
    frame = inspect.currentframe()
    while frame is not None:
        name = frame.f_code.co_name
        if name in ("embedding_regularization_loss", "weight_regularization_loss"):
            kind = name.split("_")[0]
            if getattr(frame.f_locals.get("self"), f"{kind}_regularizer", None) is module:
                return kind
        frame = frame.f_back
    return None


class _NIRMixin(_SameReleasePickles):
    """What both adapters share; the host supplies ``_class_proxies()`` and PML's machinery.

    (Not named ``*RegularizerMixin``: PML treats such mixins as tensor-only regularizers.)
    """

    nir: NIRTerm
    add_to_recordable_attributes: Any  # from PML's ModuleWithRecords
    reducer: Any  # from PML's BaseMetricLossFunction

    def _init_nir(self, embedding_size: int, options: NIROptions, nir_weight: float | None, validate: bool) -> None:
        self.nir = NIRTerm.from_options(embedding_size, options)
        self.nir_weight = self.get_default_nir_weight() if nir_weight is None else nir_weight
        self.validate = validate
        if self.nir_weight != 0:
            check_nir_reducer(self.reducer)
        self._validated_calls = 0  # value checks block (read values on the host) only on the first calls
        # Detached device tensors set by every call: reading them is the caller's (only) sync.
        self.nir_nll_mean: Tensor | float = math.nan
        self.nir_nll_max: Tensor | float = math.nan
        self.add_to_recordable_attributes(list_of_names=["nir_weight", "nir_nll_mean", "nir_nll_max"], is_stat=False)

    def get_default_nir_weight(self) -> float:
        """The weight used for ``nir_weight=None``: ``default_nir_weight(D, objective)``.

        Example:
            >>> ProxyAnchorNIRLoss(3, 4, objective="nll").get_default_nir_weight()
            0.32
        """
        return default_nir_weight(self.nir.embedding_size, self.nir.objective)

    @property
    def nir_weight(self) -> float:
        """Weight of the NIR term: a finite number >= 0 (0: the wrapped loss alone), checked on assignment."""
        return self._nir_weight

    @nir_weight.setter
    def nir_weight(self, value: float) -> None:
        self._nir_weight = _checked_nir_weight(value)

    def _class_proxies(self) -> Tensor:
        raise NotImplementedError

    def _compared_distance(self) -> Any:
        """The PML distance the proxy loss compares embeddings with (None: unknown)."""
        return getattr(self, "distance", None)

    def _compared(self, embeddings: Tensor) -> Tensor:
        """The embeddings as the proxy loss compares them: L2-normalized if its distance normalizes.

        NIR models what the proxy loss compares, so the flow sees unit vectors when the loss's
        distance has ``normalize_embeddings=True`` (PML's default), whatever the model outputs.
        """
        distance = self._compared_distance()
        if distance is None or not getattr(distance, "normalize_embeddings", False):
            return embeddings
        return distance.maybe_normalize(embeddings.to(_compute_dtype(embeddings)))

    def _record_nll(self, nll: Tensor | None) -> None:
        """Sets ``nir_nll_mean`` / ``nir_nll_max``: NaN when the term was not computed (empty batch, weight 0)."""
        if nll is None:
            self.nir_nll_mean = self.nir_nll_max = math.nan
        else:
            self.nir_nll_mean, self.nir_nll_max = nll.mean(), nll.max()

    def get_proxies(self) -> Tensor:
        """The class proxies the NIR term conditions on: (C, D), or (C, K, D) for K centres per class.

        Example:
            >>> ProxyAnchorNIRLoss(num_classes=3, embedding_size=4).get_proxies().shape
            torch.Size([3, 4])
        """
        return self._class_proxies()

    def compile_nir(
        self, enabled: bool = True, *, mode: str | None = "auto", backend: str | Callable = "inductor"
    ) -> Self:
        """Compiles the NIR term (PML's loss stays eager); returns the loss. See ``NIRTerm.compile_nir``.

        Fullgraph with static shapes; CUDA graphs (``mode="reduce-overhead"``) on CUDA.

        Example:
            >>> loss_fn = ProxyAnchorNIRLoss(num_classes=3, embedding_size=4)
            >>> loss_fn = loss_fn.compile_nir()
        """
        self.nir.compile_nir(enabled, mode=mode, backend=backend)
        return self

    @property
    def flow(self) -> ProxyConditionedFlow:
        """The proxy-conditioned normalizing flow."""
        return self.nir.flow

    def _checked_proxies(self, embeddings: Tensor, labels: Tensor | None, need_labels: bool = True) -> Tensor:
        proxies = self._class_proxies()
        if need_labels and labels is None:
            role = _pml_regularizer_role(self)
            if role is not None:
                name = type(self).__name__
                raise ValueError(
                    f"{name} was passed to a PML loss as its {role}_regularizer=, but PML calls regularizers "
                    "with a tensor only, and NIR needs each sample's label. NIR wraps the proxy loss instead: "
                    "loss_fn = NIRRegularizer(ProxyAnchorLoss(...)) (or ProxyAnchorNIRLoss(...)), called as "
                    "loss_fn(embeddings, labels)."
                )
        check_values = values_checked(self.validate)
        blocking = check_values and blocking_checks(embeddings.device, self._validated_calls)
        check_embeddings(embeddings, self.nir.embedding_size, check_values, blocking)
        self.nir._check_dtype(embeddings)  # before PML recasts its proxies
        check_device(embeddings, cast(nn.Module, self), "the loss")  # before PML moves its proxies in place
        if need_labels:
            check_labels(labels, embeddings.shape[0], proxies.shape[0], check_values, blocking)
        if check_values:
            self._validated_calls += 1
        return proxies

    def _nir_loss_entry(self, embeddings: Tensor, labels: Tensor, indices_tuple) -> dict:
        if self.nir_weight == 0 or embeddings.shape[0] == 0:
            self._record_nll(None)
            return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
        reducer = sub_loss_reducer(self.reducer)
        check_nir_reducer(reducer)  # also catches set_reducer() after construction
        per_sample, nll = self.nir.loss_and_nll(self._compared(embeddings), self._class_proxies(), labels)
        self._record_nll(nll.detach())
        weights = miner_weights(indices_tuple, embeddings.shape[0], per_sample.dtype, embeddings.device)
        losses = self.nir_weight * weighted_element_losses(per_sample, weights)
        if type(reducer) is DivisorReducer and not reducer.collect_stats:
            # What DivisorReducer computes (sum / divisor, divisor = B), without its isnan check,
            # which reads a value on the host (a sync on CUDA, and a graph break under torch.compile).
            return {
                "losses": torch.sum(losses) / embeddings.shape[0],
                "indices": None,
                "reduction_type": "already_reduced",
            }
        return {
            "losses": losses,
            "indices": c_f.torch_arange_from_size(embeddings),
            "reduction_type": "element",
            "divisor": embeddings.shape[0],  # for DivisorReducer: the plain mean
        }

    def log_likelihood(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """log p(x_i | proxy of y_i), shape (B,), float32 (float64 for float64 input).

        Example:
            >>> loss_fn = ProxyAnchorNIRLoss(num_classes=3, embedding_size=4)
            >>> loss_fn.log_likelihood(torch.randn(2, 4), torch.tensor([0, 2])).shape
            torch.Size([2])
        """
        proxies = self._checked_proxies(embeddings, labels)
        return self.nir.log_likelihood(self._compared(embeddings), proxies, labels.to(embeddings.device))

    def log_likelihood_matrix(
        self, embeddings: Tensor, chunk_size: int | None = None, *, requires_grad: bool = False
    ) -> Tensor:
        """log p(x_i | proxy_c) for all samples and classes, shape (B, C), in chunked passes.

        ``chunk_size`` samples per pass, each pass evaluating chunk_size x C pairs. No autograd
        graph is kept (memory of one pass, in any grad mode) unless ``requires_grad=True``.

        Example:
            >>> loss_fn = ProxyAnchorNIRLoss(num_classes=3, embedding_size=4)
            >>> loss_fn.log_likelihood_matrix(torch.randn(2, 4)).shape
            torch.Size([2, 3])
        """
        proxies = self._checked_proxies(embeddings, None, need_labels=False)
        return self.nir.log_likelihood_matrix(
            self._compared(embeddings), proxies, chunk_size, requires_grad=requires_grad
        )

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draws one embedding from p(x | proxy_y) per label, shape (len(labels), D).

        Example:
            >>> loss_fn = ProxyAnchorNIRLoss(num_classes=3, embedding_size=4)
            >>> loss_fn.sample(torch.tensor([0, 0, 1])).shape
            torch.Size([3, 4])
        """
        proxies = self._class_proxies()
        # One draw per label: any count is right, the shape must be (N,) (0-d labels get the 1-D error).
        check_labels(
            labels,
            labels.numel() if isinstance(labels, Tensor) else -1,
            proxies.shape[0],
            values_checked(self.validate),
        )
        return self.nir.sample(proxies, labels.to(proxies.device), generator)

    def param_groups(
        self,
        model_lr: float | None = None,
        proxy_lr_mult: float = 100.0,  # DEFAULT_PROXY_LR_MULT, spelled out for the API page
        flow_lr_mult: float = 1.0,  # DEFAULT_FLOW_LR_MULT
        *,
        lr: float | None = None,
    ) -> list[dict]:
        """Optimizer groups for the loss's own parameters, scaled from your model's learning rate.

        ``model_lr`` is the learning rate of your model (backbone and embedding head), not one
        for the loss: the proxies train at ``model_lr * proxy_lr_mult`` (x100 by default) and
        the flow at ``model_lr * flow_lr_mult`` (x1). With Adam and a model at 1e-4 the proxies
        get 1e-2, the usual lr of PML's separate loss optimizer. Add your model's group(s)
        beside these; a setting that puts the proxies at lr 1 or more warns. ``lr=`` is the
        spelling before 0.4.0 (deprecated, removed in 0.5.0).

        Example:
            >>> loss_fn = ProxyAnchorNIRLoss(num_classes=3, embedding_size=4)
            >>> model = torch.nn.Linear(8, 4)
            >>> groups = [{"params": model.parameters(), "lr": 1e-3}]
            >>> groups += loss_fn.param_groups(model_lr=1e-3)
            >>> opt = torch.optim.Adam(groups)
            >>> [(g.get("name", "model"), g["lr"]) for g in opt.param_groups]
            [('model', 0.001), ('proxies', 0.1), ('flow', 0.001)]
        """
        if lr is not None:
            if model_lr is not None:
                raise TypeError(
                    f"param_groups() got both model_lr={model_lr} and lr={lr}; lr= is the old spelling "
                    "of model_lr=: pass model_lr= only."
                )
            warnings.warn(
                "param_groups(lr=...) is deprecated and will be removed in 0.5.0: use "
                "param_groups(model_lr=...), your model's learning rate, which the multipliers scale.",
                DeprecationWarning,
                stacklevel=2,
            )
            model_lr = lr
        if model_lr is None:
            raise TypeError(
                "param_groups() needs model_lr=, your model's learning rate: the proxies train at "
                "model_lr * proxy_lr_mult and the flow at model_lr * flow_lr_mult."
            )
        if model_lr * proxy_lr_mult >= 1:
            warnings.warn(
                f"param_groups(model_lr={model_lr}) trains the proxies at lr {model_lr * proxy_lr_mult:g} "
                f"(model_lr x proxy_lr_mult {proxy_lr_mult:g}). model_lr is your model's learning rate, "
                "which the multipliers scale; for proxies at the lr of PML's loss optimizers (0.01) with "
                f"the default x{DEFAULT_PROXY_LR_MULT:g}, pass model_lr=1e-4.",
                UserWarning,
                stacklevel=2,
            )
        flow_ids = {id(p) for p in self.nir.parameters()}
        own = [p for p in self.parameters() if id(p) not in flow_ids]  # type: ignore[attr-defined]
        groups = [
            {"params": own, "lr": model_lr * proxy_lr_mult, "name": "proxies"},
            {"params": list(self.nir.parameters()), "lr": model_lr * flow_lr_mult, "name": "flow"},
        ]
        return [g for g in groups if g["params"]]


class NIRRegularizer(_NIRMixin, BaseMetricLossFunction):
    """Adds Non-isotropy Regularization to any proxy-based PML loss.

    A drop-in replacement for the wrapped loss: ``loss_fn(embeddings, labels, indices_tuple,
    ref_emb, ref_labels)`` returns ``loss(...) + nir_weight * reduce(NIR term)``. The wrapped
    loss runs unchanged (its own reducer, miners, regularizers); its value is the ``proxy_loss``
    sub-loss. The NIR term is the ``nir_loss`` sub-loss: per-sample exp(NLL)
    (``objective="exp_nll"``, the default) or NLL (``"nll"``), weighted by the miner's
    per-sample weights if ``indices_tuple`` is given, reduced by this module's reducer (default
    ``MeanReducer``). ``parameters()`` include the wrapped loss's and the flow's. The flow
    models the embeddings as the wrapped loss compares them: L2-normalized if its distance
    normalizes (PML's default), as they are otherwise. Pass the loss itself, not as a PML
    ``embedding_regularizer=``: PML calls regularizers without labels. The wrapped loss is
    ``loss_fn.loss``: call its own methods there, e.g. ``loss_fn.loss.get_logits(embeddings)``
    for ArcFace.

    The NIR term's options, ``objective``, ``flow``, ``flow_options``, ``detach_proxies``,
    ``noise_std``, ``guard_radius``, ``centered`` and ``fit_flow``, are documented once, in
    [`NIROptions`][nir_loss.nir.NIROptions]; both losses take them as keywords.

    Args:
        loss: A PML loss with class proxies (see ``get_proxies``).
        nir_weight: Weight of the NIR term, a finite number >= 0; None:
            ``get_default_nir_weight()``, that is ``default_nir_weight(D, objective)``.
        validate: Check label range and finiteness (on an accelerator only the first call reads values,
            a host sync; later calls assert on the device without one; off under torch.compile).
        reducer: PML reducer for the NIR term.
        collect_stats: PML's collect_stats.

    Example:
        >>> from pytorch_metric_learning.losses import ProxyNCALoss
        >>> proxy_loss = ProxyNCALoss(num_classes=5, embedding_size=8)
        >>> loss_fn = NIRRegularizer(proxy_loss, nir_weight=0.01)
        >>> x = torch.randn(6, 8, requires_grad=True)
        >>> emb = torch.nn.functional.normalize(x, dim=1)
        >>> loss = loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 4]))
        >>> loss.backward()
    """

    @_keywords_name_the_fix
    def __init__(
        self,
        loss: nn.Module,
        nir_weight: float | None = None,
        objective: str = "exp_nll",  # DEFAULT_OBJECTIVE
        flow: ProxyConditionedFlow | None = None,
        *,
        flow_options: Mapping[str, Any] | None = None,
        detach_proxies: bool = False,
        noise_std: float | None = None,
        guard_radius: float | None = None,
        centered: bool = False,
        fit_flow: bool = False,
        validate: bool = True,
        reducer=None,
        collect_stats: bool | None = None,
    ) -> None:
        proxies = get_proxies(loss)
        options = NIROptions(
            objective=objective,
            detach_proxies=detach_proxies,
            flow=flow,
            flow_options=flow_options or {},
            noise_std=noise_std,
            guard_radius=guard_radius,
            centered=centered,
            fit_flow=fit_flow,
        )
        super().__init__(reducer=reducer, collect_stats=collect_stats)
        self.loss = loss
        self._init_nir(proxies.shape[-1], options, nir_weight, validate)

    def _class_proxies(self) -> Tensor:
        return get_proxies(self.loss)

    def _compared_distance(self) -> Any:
        return getattr(self.loss, "distance", None)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._checked_proxies(embeddings, labels)
        if embeddings.shape[0] == 0:
            self._record_nll(None)
            return self.zero_losses()
        proxy_loss = self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return {
            "proxy_loss": {"losses": proxy_loss, "indices": None, "reduction_type": "already_reduced"},
            "nir_loss": self._nir_loss_entry(embeddings, labels, indices_tuple),
        }

    def _sub_loss_names(self):
        return ["proxy_loss", "nir_loss"]


def _check_pml_options(kwargs: Mapping[str, Any]) -> None:
    """A TypeError naming the valid options for keywords that neither ProxyAnchorNIRLoss nor PML takes."""
    pml = sorted(
        name
        for cls in ProxyAnchorLoss.__mro__
        if cls not in (nn.Module, object) and "__init__" in cls.__dict__
        for name, p in inspect.signature(cls.__dict__["__init__"]).parameters.items()
        if name not in ("self", "num_classes", "embedding_size", "margin", "alpha")
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )
    unknown = sorted(set(kwargs) - set(pml))
    if unknown:
        own = [n for n in inspect.signature(ProxyAnchorNIRLoss).parameters if n != "kwargs"]
        raise TypeError(
            f"ProxyAnchorNIRLoss got unexpected keyword arguments {unknown}; expected its own "
            f"parameters ({', '.join(own)}), ProxyAnchorLoss options ({', '.join(pml)}), or "
            f"ProxyConditionedFlow options inside flow_options={{...}} ({', '.join(NIROptions.flow_option_names())})."
        )


class ProxyAnchorNIRLoss(_NIRMixin, ProxyAnchorLoss):
    """PML's ProxyAnchorLoss with the NIR term built in (``isinstance(.., ProxyAnchorLoss)``).

    Sub-losses ``pos_loss``, ``neg_loss`` (ProxyAnchor's, unchanged) and ``nir_loss`` (the NIR
    term, weighted by ``nir_weight``); all reduced by ProxyAnchor's default ``DivisorReducer``
    (``nir_loss`` to the same batch mean by nir-loss itself, without the reducer's host sync).
    With ``nir_weight=0`` the value and gradients are exactly ProxyAnchorLoss's. The flow models
    the embeddings as the loss's distance compares them (L2-normalized by PML's default
    ``CosineSimilarity``), so raw model outputs and their normalized form give the same loss.

    The NIR term's options, ``objective``, ``flow``, ``flow_options``, ``detach_proxies``,
    ``noise_std``, ``guard_radius``, ``centered`` and ``fit_flow``, are documented once, in
    [`NIROptions`][nir_loss.nir.NIROptions]; both losses take them as keywords.

    Args:
        num_classes: Number of classes C.
        embedding_size: Embedding width D.
        margin: ProxyAnchor margin.
        alpha: ProxyAnchor scale.
        nir_weight: Weight of the NIR term, a finite number >= 0; None:
            ``get_default_nir_weight()``, that is ``default_nir_weight(D, objective)``.
        validate: Check label range and finiteness (on an accelerator only the first call reads values,
            a host sync; later calls assert on the device without one; off under torch.compile).
        **kwargs: ProxyAnchorLoss / BaseMetricLossFunction options (reducer, distance, ...).

    Example:
        >>> loss_fn = ProxyAnchorNIRLoss(num_classes=5, embedding_size=8)
        >>> x = torch.randn(6, 8, requires_grad=True)
        >>> emb = torch.nn.functional.normalize(x, dim=1)
        >>> loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 4])).backward()
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32,
        nir_weight: float | None = None,
        objective: str = "exp_nll",  # DEFAULT_OBJECTIVE
        flow: ProxyConditionedFlow | None = None,
        *,
        flow_options: Mapping[str, Any] | None = None,
        detach_proxies: bool = False,
        noise_std: float | None = None,
        guard_radius: float | None = None,
        centered: bool = False,
        fit_flow: bool = False,
        validate: bool = True,
        **kwargs,
    ) -> None:
        _check_pml_options(kwargs)
        options = NIROptions(
            objective=objective,
            detach_proxies=detach_proxies,
            flow=flow,
            flow_options=flow_options or {},
            noise_std=noise_std,
            guard_radius=guard_radius,
            centered=centered,
            fit_flow=fit_flow,
        )
        super().__init__(num_classes, embedding_size, margin=margin, alpha=alpha, **kwargs)
        self._init_nir(embedding_size, options, nir_weight, validate)

    def _class_proxies(self) -> Tensor:
        return self.proxies

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._checked_proxies(embeddings, labels)
        loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        loss_dict["nir_loss"] = self._nir_loss_entry(embeddings, labels, indices_tuple)
        return loss_dict

    def _sub_loss_names(self):
        return super()._sub_loss_names() + ["nir_loss"]
