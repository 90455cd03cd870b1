"""Checks to call from your own test suite: does a custom proxy loss, or a flow, work with NIR?"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import normflows as nf
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from torch import Tensor, nn

from .losses import NIRRegularizer
from .nir import NIRTerm
from .proxies import get_proxies

__all__ = ["check_flow", "check_proxy_loss"]

# A flow small enough that the checks take well under a second on CPU. identity_init=False so
# every flow parameter gets a non-zero gradient from the first step.
_SMALL_FLOW = {"num_blocks": 2, "hidden_features": 16, "num_layers": 3, "identity_init": False}

_T = TypeVar("_T")


class _CheckFailed(AssertionError):
    """A failed check (an AssertionError, so pytest reports it as a test failure)."""


def _fail(what: str, fix: str) -> AssertionError:
    return _CheckFailed(f"{what}\nHow to fix: {fix}")


def _guarded(step: str, fix: str, fn: Callable[[], _T]) -> _T:
    """Runs ``fn``; turns any exception but a failed check into one that names the step and fix."""
    try:
        return fn()
    except _CheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise _fail(f"{step} raised {type(exc).__name__}: {exc}", fix) from exc


def _is_nir_loss(loss: nn.Module) -> bool:
    return isinstance(getattr(loss, "nir", None), NIRTerm)


def _proxies_of(loss: nn.Module) -> Tensor:
    return get_proxies(loss)  # NIR losses expose get_proxies() too


def _without_nir(nir_loss: nn.Module) -> nn.Module:
    """The loss's own term, without NIR, sharing nothing with ``nir_loss``."""
    if isinstance(nir_loss, NIRRegularizer):
        return copy.deepcopy(nir_loss.loss)
    plain: Any = copy.deepcopy(nir_loss)
    plain.nir_weight = 0.0
    return plain


@dataclasses.dataclass(frozen=True)
class _Case:
    """The loss under check, as every check sees it: its name, the batch shape and the seed."""

    name: str
    num_classes: int
    embedding_size: int
    batch_size: int
    seed: int

    def batch(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """Unit-norm embeddings (a leaf that requires grad) and labels naming each class twice in turn."""
        g = torch.Generator().manual_seed(self.seed)
        x = F.normalize(torch.randn(self.batch_size, self.embedding_size, generator=g, dtype=torch.float64), dim=1)
        labels = (torch.arange(self.batch_size) // 2) % self.num_classes
        return x.to(device=device, dtype=dtype).requires_grad_(True), labels.to(device)

    def value(self, what: str, fix: str, fn: Callable[[], Any]) -> Tensor:
        """``fn()``, which must not raise and must give a finite scalar; ``what`` names the call in a failure."""
        return _scalar(_guarded(what, fix, fn), what)


def _proxy_params(loss: nn.Module) -> list[nn.Parameter]:
    """The loss's parameters that ``get_proxies`` is computed from (found by autograd)."""
    params = [p for p in loss.parameters() if p.requires_grad]
    proxies = get_proxies(loss)
    if not params or not proxies.requires_grad:
        return []
    grads = torch.autograd.grad(proxies.sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


def _scalar(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise _fail(
            f"{what} returned {shape}, expected a scalar tensor.",
            "let the reducer reduce: return {name: {'losses', 'indices', 'reduction_type'}} from "
            "compute_loss and do not override forward.",
        )
    if not bool(torch.isfinite(value)):
        raise _fail(
            f"{what} is {value.item()} (not finite).",
            "check compute_loss for a log of zero, a division by zero or an overflow.",
        )
    return value


def _wrap_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over the defaults: weight 1 and a small flow unless ``given`` names its own."""
    defaults: dict[str, Any] = {"nir_weight": 1.0}
    if "flow" not in given:
        defaults["flow_options"] = _SMALL_FLOW
    return {**defaults, **given}


def check_proxy_loss(
    loss: nn.Module,
    num_classes: int,
    embedding_size: int,
    *,
    batch_size: int = 12,
    miners: bool = True,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    devices: Sequence[str | torch.device] | None = None,
    nir_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> None:
    """Checks that a proxy loss works with NIR; raises AssertionError naming the problem and the fix.

    ``loss`` is either your proxy loss (it is wrapped in ``NIRRegularizer`` with a small flow) or
    an NIR loss (``NIRRegularizer(...)``, ``ProxyAnchorNIRLoss``). It is never modified: every
    check runs on a deep copy. Checked, in order:

    1. ``get_proxies`` finds the proxies; they have shape (num_classes, embedding_size), or
       (num_classes, K, embedding_size), and are computed from a parameter of the loss; row c is
       class c's proxy (for a sample of class c the loss pulls row c towards it, checked for up
       to 8 classes).
    2. The loss's own term, without NIR, is a finite scalar whose gradient reaches the proxies.
    3. With NIR: a finite scalar; gradients reach the embeddings and every flow parameter.
    4. PML miners (``MultiSimilarityMiner`` pairs, ``TripletMarginMiner`` triplets), unless
       ``miners=False``, and PML reducers (Mean, Sum, AvgNonZero, Threshold) on the loss's own
       terms, with the NIR term still reaching the flow.
    5. Every dtype in ``dtypes`` works, on every device in ``devices`` (default: CPU, and CUDA
       if available); ``.to(device)`` moves the proxies.
    6. ``state_dict`` survives ``torch.save``/``torch.load(weights_only=True)`` and restores the
       proxies and the flow exactly.

    Args:
        loss: A proxy-based loss, plain or already wrapped with NIR.
        num_classes: Number of classes C the loss was built for.
        embedding_size: Embedding width D.
        batch_size: Samples per check batch (each class appears twice in turn).
        miners: Check PML miners; pass False for losses that reject ``indices_tuple`` by design
            (PML's ``P2SGradLoss``).
        dtypes: Floating dtypes to check.
        devices: Devices to check; default CPU, plus ``"cuda"`` when available.
        nir_options: ``NIRRegularizer`` options used to wrap a plain loss (default:
            ``nir_weight=1`` and a small flow in ``flow_options``).
        seed: Seed of the check batches (global RNG untouched).

    Raises:
        AssertionError: A check failed; the message says what is wrong and how to fix it.

    Example:
        >>> from pytorch_metric_learning.losses import ProxyNCALoss
        >>> check_proxy_loss(ProxyNCALoss(num_classes=4, embedding_size=8), 4, 8)
    """
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with torch.random.fork_rng(devices=[]):  # building the small flow draws from torch's RNG: restore it after
        _check_proxy_loss(loss, num_classes, embedding_size, batch_size, miners, dtypes, devices, nir_options, seed)


def _check_proxy_loss(
    loss: nn.Module,
    num_classes: int,
    embedding_size: int,
    batch_size: int,
    miners: bool,
    dtypes: Sequence[torch.dtype],
    devices: Sequence[str | torch.device],
    nir_options: Mapping[str, Any] | None,
    seed: int,
) -> None:
    case = _Case(type(loss).__name__, num_classes, embedding_size, batch_size, seed)
    if _is_nir_loss(loss):
        nir_loss = copy.deepcopy(loss).cpu().float()
        plain = _without_nir(nir_loss)
        _check_proxies(case, plain)
    else:
        plain = copy.deepcopy(loss).cpu().float()
        _check_proxies(case, plain)
        options = _wrap_options(nir_options or {})
        nir_loss = _guarded(
            f"NIRRegularizer({case.name}(...), **{options})",
            "check nir_options.",
            lambda: NIRRegularizer(copy.deepcopy(plain), **options),
        )
    # The checks compare values across calls, copies and dtypes: no training noise (eval mode).
    nir_loss.eval()
    _check_own_term(case, plain)
    _check_class_rows(case, plain)
    _check_nir_gradients(case, nir_loss)
    if miners:
        _check_miners(case, nir_loss)
    _check_reducers(case, nir_loss)
    for device in devices:
        for dtype in dtypes:
            _check_dtype_device(case, plain, nir_loss, dtype, torch.device(device))
    _check_state_dict(case, nir_loss)


def _check_proxies(case: _Case, plain: nn.Module) -> None:
    name, num_classes, embedding_size = case.name, case.num_classes, case.embedding_size
    proxies = _guarded(
        f"get_proxies({name})",
        "give the loss a `proxies` nn.Parameter of shape (C, D), or a get_proxies() method.",
        lambda: get_proxies(plain),
    )
    shape = tuple(proxies.shape)
    ok = proxies.dim() in (2, 3) and shape[0] == num_classes and shape[-1] == embedding_size
    if not ok:
        raise _fail(
            f"get_proxies({name}) has shape {shape}; expected ({num_classes}, {embedding_size}) or "
            f"({num_classes}, K, {embedding_size}).",
            "proxies are one row per class: store them as (num_classes, embedding_size) (PML's W-style "
            "(D, C) matrices are transposed by get_proxies), or fix num_classes/embedding_size in the check.",
        )
    if not proxies.requires_grad or not _proxy_params(plain):
        raise _fail(
            f"{name}'s proxies are not computed from a trainable parameter of the loss "
            f"(requires_grad={proxies.requires_grad}), so no optimizer can learn them.",
            "store them as `self.proxies = torch.nn.Parameter(...)` and do not .detach() them in get_proxies().",
        )


def _rows_of(plain: nn.Module, params: list[nn.Parameter], grads: Sequence[Tensor]) -> Tensor:
    """``grads`` (one per parameter) mapped through ``get_proxies``' Jacobian: per-row proxy gradients."""
    proxies = get_proxies(plain)
    probe = torch.zeros_like(proxies, requires_grad=True)
    # J^T probe is linear in probe; its gradient with respect to probe along `grads` is J grads.
    pulled = torch.autograd.grad(proxies, params, grad_outputs=probe, create_graph=True, allow_unused=True)
    used = [(a, g) for a, g in zip(pulled, grads) if a is not None]
    (rows,) = torch.autograd.grad([a for a, _ in used], probe, grad_outputs=[g for _, g in used])
    return rows


def _check_class_rows(case: _Case, plain: nn.Module) -> None:
    """Row c of ``get_proxies`` is class c's proxy, as the loss itself uses it.

    For a sample of class c placed orthogonal to class c's proxy, the loss pulls that proxy
    towards the sample: the proxies' gradient, mapped to ``get_proxies``' rows, has its most
    negative inner product with the sample on row c (checked for up to 8 classes). A (D, C)
    matrix reshaped to (C, D) has the right shape but rows that mix the classes' columns, and
    fails this.
    """
    name, num_classes, embedding_size = case.name, case.num_classes, case.embedding_size
    params = _proxy_params(plain)
    if num_classes < 2 or not params:
        return
    g = torch.Generator().manual_seed(case.seed)
    classes = torch.linspace(0, num_classes - 1, min(num_classes, 8)).round().long().unique().tolist()
    rows = get_proxies(plain).detach().reshape(-1, embedding_size)
    for c in classes:
        # Orthogonal to class c's proxy (to every proxy when D allows): no class is nearer than
        # another, only the label tells them apart (P2SGradLoss, for one, also pulls the proxies
        # of other classes that have negative cosines, and LargeMarginSoftmaxLoss's margin is not
        # monotone in the angle).
        x = torch.randn(embedding_size, generator=g)
        span = rows if len(rows) < embedding_size else get_proxies(plain).detach()[c].reshape(-1, embedding_size)
        basis = torch.linalg.svd(span, full_matrices=False)[2]
        x = x - basis.t() @ (basis @ x)
        x = F.normalize(x[None], dim=1).expand(2, -1).clone()
        what = f"{name}(embeddings, labels) without NIR, two samples of class {c}"
        fix = "make compute_loss work on any batch of (B, D) embeddings."
        value = case.value(what, fix, functools.partial(plain, x, torch.full((2,), c)))
        grads = torch.autograd.grad(value, params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads))
        row_grads = _guarded(
            f"get_proxies({name}) differentiated twice",
            "compute get_proxies() with torch operations.",
            functools.partial(_rows_of, plain, params, grads),
        )
        pull = (row_grads * x[0]).sum(-1).reshape(num_classes, -1).sum(1)
        best = int(pull.argmin())
        # Ties (no gradient, or a parameter shared by every row) tell nothing.
        if bool(pull[c] - pull[best] > 1e-4 * pull.abs().max()):
            raise _fail(
                f"get_proxies({name})[{c}] is not the proxy of class {c}: for a sample of class {c} the loss pulls "
                f"row {best} of get_proxies() towards the sample (gradient . sample = {pull[best].item():.3g}), "
                f"not row {c} ({pull[c].item():.3g}).",
                "get_proxies() must return row c = the representative the loss uses for class c: for a (D, C) "
                "matrix W return W.t() (W.reshape(C, D) or W.view(C, D) has the right shape but mixes the classes' "
                "columns).",
            )


def _check_own_term(case: _Case, plain: nn.Module) -> None:
    x, labels = case.batch()
    value = case.value(
        f"{case.name}(embeddings, labels) without NIR",
        "make compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels) work "
        "on (B, D) float embeddings and int64 labels.",
        lambda: plain(x, labels),
    )
    params = _proxy_params(plain)
    grads = torch.autograd.grad(value, [x, *params], allow_unused=True)
    if all(g is None or not bool(g.abs().sum() > 0) for g in grads[1:]):
        raise _fail(
            f"{case.name}'s own loss (without NIR) gives no gradient to its proxies: they would never train.",
            "use the proxies parameter itself in compute_loss: no .detach(), .data or torch.no_grad(), and "
            "do not copy it into a new tensor; get_proxies() must return the same tensor the loss uses.",
        )
    if grads[0] is None or not bool(grads[0].abs().sum() > 0):
        raise _fail(
            f"{case.name}'s own loss gives no gradient to the embeddings.",
            "compute the loss from the embeddings passed in, without detaching them.",
        )


def _check_nir_gradients(case: _Case, nir_loss: nn.Module) -> None:
    # That every flow parameter gets a gradient is check_flow's (and the library's tests') to say.
    x, labels = case.batch()
    what = f"NIR-wrapped {case.name}(embeddings, labels)"
    value = case.value(what, "see the message above.", lambda: nir_loss(x, labels))
    if getattr(nir_loss, "nir_weight", 1.0) == 0:
        raise _fail(
            f"the NIR weight of {case.name} is 0, so NIR adds nothing.",
            "check the loss with a non-zero weight (NIRRegularizer(loss, nir_weight=...)).",
        )
    flow = [p for p in cast(NIRTerm, nir_loss.nir).flow.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, [x, *flow], allow_unused=True)
    if grads[0] is None or not bool(grads[0].abs().sum() > 0):
        raise _fail(
            f"NIR-wrapped {case.name} gives no gradient to the embeddings.",
            "compute the loss from the embeddings passed in, without detaching them.",
        )
    if not any(g is not None and bool(g.abs().sum() > 0) for g in grads[1:]):
        raise _fail(f"{what}: no flow parameter gets a gradient.", "check the NIR weight and the flow's log-det.")


def _check_miners(case: _Case, nir_loss: nn.Module) -> None:
    x, labels = case.batch()
    for miner in (
        pml_miners.MultiSimilarityMiner(epsilon=0.5),
        pml_miners.TripletMarginMiner(margin=1.0, type_of_triplets="all"),
    ):
        pairs = isinstance(miner, pml_miners.MultiSimilarityMiner)
        kind = f"{type(miner).__name__} ({'pairs' if pairs else 'triplets'})"
        indices_tuple = miner(x.detach(), labels)
        value = case.value(
            f"NIR-wrapped {case.name}(embeddings, labels, indices_tuple) with {kind}",
            "accept indices_tuple in compute_loss (e.g. lmu.convert_to_weights(indices_tuple, labels, dtype)); if "
            "your loss rejects miners by design, call check_proxy_loss(..., miners=False).",
            functools.partial(nir_loss, x, labels, indices_tuple),
        )
        _guarded(f"backward with {kind}", "see the message above.", functools.partial(torch.autograd.grad, value, x))


def _check_reducers(case: _Case, nir_loss: nn.Module) -> None:
    """PML reducers on the loss's own terms; the NIR term stays in (its flow gets a gradient).

    Thresholding reducers cannot reduce the NIR term (a log-likelihood, usually negative): they
    go to the wrapped loss (``NIRRegularizer``) or to every sub-loss but ``nir_loss``.
    """
    x, labels = case.batch()
    for reducer in (
        pml_reducers.MeanReducer(),
        pml_reducers.SumReducer(),
        pml_reducers.AvgNonZeroReducer(),
        pml_reducers.ThresholdReducer(low=0.0),
    ):
        with_reducer: Any = copy.deepcopy(nir_loss)
        if isinstance(with_reducer, NIRRegularizer):
            inner: Any = with_reducer.loss
            if not hasattr(inner, "set_reducer"):  # not a PML loss: it has no reducer to set
                continue
            inner.set_reducer(reducer)
        elif isinstance(reducer, pml_reducers.ThresholdReducer):
            with_reducer.set_reducer(
                pml_reducers.MultipleReducers({"nir_loss": pml_reducers.MeanReducer()}, default_reducer=reducer)
            )
        else:
            with_reducer.set_reducer(reducer)
        what = f"NIR-wrapped {case.name} with reducer={type(reducer).__name__}()"
        fix = (
            "return sub-losses with a PML reduction_type (element, pos_pair, neg_pair, triplet or "
            "already_reduced) and the matching indices."
        )
        value = case.value(what, fix, functools.partial(with_reducer, x, labels))
        flow: nn.Module = cast(NIRTerm, with_reducer.nir).flow
        grads = _guarded(
            f"backward of {what}",
            fix,
            functools.partial(torch.autograd.grad, value, list(flow.parameters()), allow_unused=True),
        )
        if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
            raise _fail(
                f"{what}: the NIR term drops out (no flow parameter gets a gradient).",
                "keep the NIR term as the `nir_loss` sub-loss (_sub_loss_names) and reduce it with a MeanReducer.",
            )


def _check_dtype_device(
    case: _Case, plain: nn.Module, nir_loss: nn.Module, dtype: torch.dtype, device: torch.device
) -> None:
    name = case.name
    x, labels = case.batch(dtype, device)
    where = f"on {device} in {dtype}"
    fix = (
        "cast the proxies to the embeddings' dtype and device in compute_loss with a differentiable "
        "proxies.to(embeddings) (no .float(), .data or hard-coded dtype), and compute in the embeddings' dtype."
    )
    own = _guarded(
        f"{name} without NIR {where}", fix, lambda: copy.deepcopy(plain).to(device=device, dtype=dtype)(x, labels)
    )
    if not isinstance(own, Tensor) or own.dtype != dtype:
        raise _fail(
            f"{name} without NIR returns {getattr(own, 'dtype', type(own).__name__)} for {dtype} embeddings.", fix
        )
    moved = _guarded(
        f"NIR-wrapped {name}.to({device}, {dtype})",
        "see the message above.",
        lambda: copy.deepcopy(nir_loss).to(device=device, dtype=dtype),
    )
    proxies = _proxies_of(moved)
    if proxies.device.type != device.type:
        raise _fail(
            f"after .to({device!s}) {name}'s proxies are on {proxies.device}.",
            "register them as an nn.Parameter (or buffer) so Module.to() moves them.",
        )
    what = f"NIR-wrapped {name} {where}"
    value = case.value(what, fix, lambda: moved(x, labels))
    _guarded(f"backward of {what}", fix, value.backward)
    if x.grad is None or x.grad.dtype != dtype or x.grad.device.type != device.type:
        raise _fail(
            f"{what}: the embeddings' gradient is missing or has the wrong dtype/device.",
            "do not detach or move the embeddings inside the loss.",
        )


def _plain_tensors(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, attribute, dotted name) of the floating tensors held as plain attributes, which state_dict leaves out."""
    return [
        (m, key, f"{prefix}.{key}".lstrip("."))
        for prefix, m in module.named_modules()
        for key, value in vars(m).items()
        if isinstance(value, Tensor) and value.is_floating_point()
    ]


def _proxy_plain_tensors(loss: nn.Module) -> list[str]:
    """The plain tensor attributes the proxies depend on (changing one changes ``get_proxies``)."""
    before = _proxies_of(loss).detach().clone()
    found = []
    with torch.no_grad():
        for owner, key, dotted in _plain_tensors(loss):
            value = getattr(owner, key)
            setattr(owner, key, value + 1)
            try:
                if not torch.equal(_proxies_of(loss), before):
                    found.append(dotted)
            finally:
                setattr(owner, key, value)
    return found


def _scramble(module: nn.Module, generator: torch.Generator, plain_tensors: bool) -> None:
    """Adds noise to the parameters and persistent buffers of ``module`` (and its plain tensor attributes)."""

    def noise(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

    with torch.no_grad():
        for m in module.modules():
            state = [
                *m.parameters(recurse=False),
                *(b for k, b in m.named_buffers(recurse=False) if k not in m._non_persistent_buffers_set),
            ]
            for t in state:
                if t.is_floating_point():
                    t.add_(noise(t))
        for owner, key, _ in _plain_tensors(module) if plain_tensors else []:
            value = getattr(owner, key)
            setattr(owner, key, (value + noise(value)).requires_grad_(value.requires_grad))


def _check_state_dict(case: _Case, nir_loss: nn.Module) -> None:
    name = case.name
    buffer = io.BytesIO()
    torch.save(nir_loss.state_dict(), buffer)
    buffer.seek(0)
    state = _guarded(
        "torch.load(weights_only=True) of the state_dict",
        "keep only tensors in the state_dict (no custom objects in buffers or extra state).",
        lambda: torch.load(buffer, weights_only=True),
    )
    # Scrambled copies that only load_state_dict can make equal again. A deep copy alone would
    # carry over what state_dict loses, so the proxies are also compared on a copy whose plain
    # tensor attributes are scrambled too (the loss's other plain tensors may be constants its
    # constructor makes, like PML's LargeMarginSoftmaxLoss tables).
    g = torch.Generator().manual_seed(case.seed)
    expected = _proxies_of(nir_loss).detach().clone()  # before any forward (P2SGradLoss renorms in place)
    loaded = []
    for plain_tensors in (False, True):
        other = copy.deepcopy(nir_loss)
        _scramble(other, g, plain_tensors)
        _guarded(
            f"{name}.load_state_dict(state)", "see the message above.", functools.partial(other.load_state_dict, state)
        )
        if not torch.equal(_proxies_of(other), expected):
            unsaved = _proxy_plain_tensors(copy.deepcopy(nir_loss))
            where = (
                f" (computed from plain tensor attributes, which state_dict leaves out: {', '.join(unsaved)})"
                if unsaved
                else ""
            )
            raise _fail(
                f"load_state_dict does not restore {name}'s proxies{where}.",
                "register them with nn.Parameter (or register_buffer), not as a plain tensor attribute.",
            )
        loaded.append(other)
    x, labels = case.batch()
    with torch.no_grad():
        a, b = nir_loss(x, labels), loaded[0](x, labels)
    if not torch.equal(a, b):
        raise _fail(
            f"after a state_dict round trip {name} gives {b.item()} instead of {a.item()}.",
            "every tensor the loss computes with must be a parameter or a buffer.",
        )


# -- flows -------------------------------------------------------------------------------------


def _flow_steps(flow: nn.Module) -> tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., tuple[Tensor, Tensor]]]:
    """(density x -> (z, log|det dz/dx|), sampling z -> (x, log|det dx/dz|)) of a flow or layer."""
    f: Any = flow
    if hasattr(flow, "inverse_and_log_det") and hasattr(flow, "forward_and_log_det"):
        return f.inverse_and_log_det, f.forward_and_log_det
    if isinstance(flow, nf.flows.Flow):  # a single normflows layer: forward is z -> x
        return f.inverse, f.forward
    raise _fail(
        f"{type(flow).__name__} is not a flow: it has neither inverse_and_log_det/forward_and_log_det "
        "nor normflows.flows.Flow's inverse/forward.",
        "pass a ProxyConditionedFlow, a normflows (Conditional)NormalizingFlow or a normflows Flow layer.",
    )


def _flow_widths(flow: nn.Module, features: int | None, context_features: int | None) -> tuple[int, int | None]:
    """``features`` and ``context_features``, by default the flow's (or coupling's) attributes of those names."""
    features = getattr(flow, "features", None) if features is None else features
    if features is None:
        raise _fail(f"cannot tell the width of {type(flow).__name__}.", "pass check_flow(flow, features=D).")
    return int(features), getattr(flow, "context_features", None) if context_features is None else context_features


def check_flow(
    flow: nn.Module,
    features: int | None = None,
    context_features: int | None = None,
    *,
    num_samples: int = 3,
    perturb: float = 0.1,
    atol: float = 1e-8,
    seed: int = 0,
) -> None:
    """Checks a (conditional) normalizing flow's invariants in float64; raises AssertionError if one fails.

    Runs on a float64 deep copy of ``flow`` whose parameters get N(0, perturb^2) noise, so layers
    initialized as the identity are really exercised. Checked: shapes; ``forward`` undoes
    ``inverse`` and their log-dets cancel; the density direction's log-det equals
    ``slogdet`` of the autograd Jacobian dz/dx for every sample; gradients of the log-density
    reach every parameter; and the log-density depends on the context (a conditional flow that
    ignores its context cannot model one distribution per class).

    Works for ``ProxyConditionedFlow``, normflows flows with ``inverse_and_log_det`` /
    ``forward_and_log_det``, and single normflows layers (``inverse(x, context=c) -> (z, log_det)``).

    Args:
        flow: The flow to check (not modified).
        features: Width D (default ``flow.features``).
        context_features: Context width (default ``flow.context_features``); None for no context.
        num_samples: Samples whose Jacobian is computed (each costs D backward passes).
        perturb: Standard deviation of the noise added to the copy's parameters.
        atol: Absolute tolerance of the float64 comparisons.
        seed: Seed of the inputs and the noise (global RNG untouched).

    Raises:
        AssertionError: A check failed; the message says what is wrong and how to fix it.

    Example:
        >>> from nir_loss import ProxyConditionedFlow
        >>> check_flow(ProxyConditionedFlow(4, num_blocks=2, hidden_features=8))
    """
    name = type(flow).__name__
    features, context_features = _flow_widths(flow, features, context_features)
    g = torch.Generator().manual_seed(seed)
    flow = copy.deepcopy(flow).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g, dtype=p.dtype))
    density, sampling = _flow_steps(flow)
    x = F.normalize(torch.randn(num_samples, features, generator=g, dtype=torch.float64), dim=1)
    ctx = (
        None
        if context_features is None
        else F.normalize(torch.randn(num_samples, context_features, generator=g, dtype=torch.float64), dim=1)
    )

    def run(step: Callable[..., tuple[Tensor, Tensor]], inputs: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        return step(inputs) if c is None else step(inputs, context=c)

    z, log_det = _guarded(
        f"{name} density direction (x -> z)",
        "the density direction must accept (N, D) float64 inputs and context=(N, C_ctx).",
        lambda: run(density, x, ctx),
    )
    if (z.shape, log_det.shape, z.dtype, log_det.dtype) != (x.shape, (num_samples,), x.dtype, x.dtype):
        raise _fail(
            f"{name}: x {tuple(x.shape)} float64 gave z {tuple(z.shape)} {z.dtype} and log_det "
            f"{tuple(log_det.shape)} {log_det.dtype}; expected z like x and log_det ({num_samples},) float64.",
            "return (z, log_det) with one log-det per sample (sum over features), accumulated in the input's "
            "dtype (normflows' own accumulator is float32).",
        )
    x_back, log_det_back = run(sampling, z, ctx)
    err = (x_back - x).abs().max().item()
    if err > 1e3 * atol:
        raise _fail(
            f"{name} is not invertible: forward(inverse(x)) differs from x by {err:.3g}.",
            "forward (z -> x) must undo inverse (x -> z) exactly: same parameters, same context, "
            "same permutation (inv_perm in one direction, perm in the other).",
        )
    err = (log_det + log_det_back).abs().max().item()
    if err > 1e3 * atol:
        raise _fail(
            f"{name}'s log-dets do not cancel: log|det dz/dx| + log|det dx/dz| = {err:.3g}, expected 0.",
            "the sampling direction must return minus the density direction's log-det.",
        )

    for i in range(num_samples):
        ci = None if ctx is None else ctx[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda xi, c=ci: run(density, xi[None], c)[0][0], x[i])
        exact = torch.linalg.slogdet(jac).logabsdet.item()
        err = abs(exact - log_det[i].item())
        if err > max(atol, 1e-9 * abs(exact)) * 1e2:
            raise _fail(
                f"{name}'s log-det is wrong: sample {i} reports {log_det[i].item():.10g}, but slogdet of "
                f"the autograd Jacobian dz/dx is {exact:.10g} (difference {err:.3g}).",
                "return the log|det| of the map actually applied: for an affine coupling "
                "z = x * exp(s) + t it is sum(s) over the transformed features, with the clamped s.",
            )

    x_req = x.clone().requires_grad_(True)
    ctx_req = None if ctx is None else ctx.clone().requires_grad_(True)
    z, log_det = run(density, x_req, ctx_req)
    log_prob = -0.5 * z.square().sum(-1) + log_det
    params: list[Tensor] = [p for p in flow.parameters() if p.requires_grad]
    inputs: list[Tensor] = [x_req] + ([] if ctx_req is None else [ctx_req])
    grads = torch.autograd.grad(log_prob.sum(), inputs + params, allow_unused=True)
    names = [n for n, p in flow.named_parameters() if p.requires_grad]
    unused = [n for n, gr in zip(names, grads[len(inputs) :]) if gr is None]
    if unused:
        raise _fail(
            f"{name}: parameters get no gradient from the log-density: {unused[:5]}.",
            "remove unused parameters, or use them in the density direction.",
        )
    if ctx_req is not None and (grads[1] is None or not bool(grads[1].abs().sum() > 0)):
        raise _fail(
            f"{name}'s log-density does not depend on its context.",
            "feed the context to the couplings' subnets (ProxyConditionedFlow does this for you).",
        )
