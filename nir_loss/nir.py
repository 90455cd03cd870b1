"""The NIR term: proxy context, batched log-likelihoods, objectives, sampling."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flow import ProxyConditionedFlow, _compute_dtype, _SameReleasePickles, standard_normal_log_prob
from .validation import check_device

__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "NIROptions",
    "NIRTerm",
    "Objective",
    "default_guard_radius",
    "default_nir_weight",
    "default_noise_std",
    "guarded_energy",
]

# Training noise: its norm, as a fraction of the unit-norm embedding, is the same at every D.
_NOISE_NORM = 0.7  # noise_std 0.062 at D = 128
# Latent radius of the tail guard, in units of the typical latent norm sqrt(D).
_GUARD_RADIUS_TIMES_SQRT_DIM = 2.0
# exp_nll: exp(e) above this energy continues linearly (float32 exp overflows at 88.7).
_EXP_LINEAR_ABOVE = 30.0
# Default weights (the measurements behind them: docs/choosing.md).
_NLL_WEIGHT_TIMES_DIM = 1.28  # 0.01 at D = 128
_EXP_NLL_WEIGHT = 1 / 0.0075  # the reference run's CUB setting
# Rows (sample x class pairs) per pass of the B x C matrix. On CPU smaller passes are faster, as
# their activations stay in cache (measurements: docs/benchmarks.md); accelerators keep the larger pass.
_MATRIX_ROWS = 4096
_MATRIX_ROWS_CPU = 1024
# compile_nir: the compiled functions of each NIRTerm, kept off the module so that copies,
# pickles and state dicts of a term never carry them (a copy compiles its own when first used).
_COMPILED: weakref.WeakKeyDictionary[NIRTerm, dict[tuple[str, str], Callable]] = weakref.WeakKeyDictionary()


def default_noise_std(embedding_size: int) -> float:
    """Std of the Gaussian noise added to the flow's input in training: 0.7 / sqrt(D).

    The noise vector's norm is then about 0.7 at every D, about the spread of a class whose
    samples have cosine 0.7 to its centre. It keeps the flow from sharpening below that
    scale: the training NLL is bounded below by (D/2) log(2 pi e noise_std^2)
    ([Concepts](concepts.md)).

    Example:
        >>> round(default_noise_std(128), 4)
        0.0619
    """
    return _NOISE_NORM / math.sqrt(embedding_size)


def default_guard_radius(embedding_size: int) -> float:
    """Latent norm above which the tail guard makes the NLL grow linearly: 2 sqrt(D).

    A standard normal latent has norm about sqrt(D); 2 sqrt(D) is far in its tail
    (P(||z||^2 > 4D) < 1e-5 for D >= 16), so the guard leaves in-distribution samples alone.

    Example:
        >>> default_guard_radius(64)
        16.0
    """
    return _GUARD_RADIUS_TIMES_SQRT_DIM * math.sqrt(embedding_size)


def guarded_energy(z: Tensor, radius: float) -> Tensor:
    """0.5 ||z||^2 per row, continued linearly in ||z|| beyond ``radius`` (a Huber loss on the norm).

    Value and gradient are continuous at ``radius``; outside it the gradient with respect to z
    has norm ``radius``, so one far-off sample cannot dominate a batch's gradient.
    ``radius=math.inf`` gives 0.5 ||z||^2 exactly.

    Example:
        >>> guarded_energy(torch.tensor([[3.0, 4.0], [0.6, 0.8]]), radius=2.0)
        tensor([8.0000, 0.5000])
    """
    return _guarded_energy_of_squared_norm(z.square().sum(-1), radius)


def _guarded_energy_of_squared_norm(sq: Tensor, radius: float) -> Tensor:
    if math.isinf(radius):
        return 0.5 * sq
    # clamp_min keeps the unused branch's sqrt (and its gradient) finite inside the radius.
    outside = radius * sq.clamp_min(radius * radius).sqrt() - 0.5 * radius * radius
    return torch.where(sq <= radius * radius, 0.5 * sq, outside)


def _guarded_exp(energy: Tensor) -> Tensor:
    """exp(energy), continued linearly above ``_EXP_LINEAR_ABOVE`` (continuous value and slope)."""
    capped = energy.clamp_max(_EXP_LINEAR_ABOVE)
    return torch.exp(capped) * (1 + (energy - capped))


# -- objectives -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """A training objective of the NIR term: one entry of ``OBJECTIVES``.

    Args:
        term: The per-sample training term, ``term(energy, constant)``: ``energy`` is the
            NLL without its (D/2) log(2 pi) constant, its quadratic part tail-guarded
            (``guarded_energy``), shape (B,); ``constant`` is (D/2) log(2 pi).
        default_weight: The NIR weight used when none is given, a function of D.
        saturates: The term's gradient vanishes once the flow fits (as exp(NLL)'s does), so
            the flow stops learning from it: ``fit_flow=True`` applies.

    Example:
        >>> nll = OBJECTIVES["nll"]
        >>> nll.term(torch.tensor([1.0]), 2.0), nll.default_weight(128), nll.saturates
        (tensor([3.]), 0.01, False)
    """

    term: Callable[[Tensor, float], Tensor]
    default_weight: Callable[[int], float]
    saturates: bool = False


def _nll(energy: Tensor, constant: float) -> Tensor:
    return energy + constant


def _exp_nll(energy: Tensor, constant: float) -> Tensor:
    return _guarded_exp(energy)


OBJECTIVES: dict[str, Objective] = {
    "nll": Objective(_nll, default_weight=lambda dim: _NLL_WEIGHT_TIMES_DIM / dim),
    "exp_nll": Objective(_exp_nll, default_weight=lambda dim: _EXP_NLL_WEIGHT, saturates=True),
}
"""The NIR term's objectives by name; a new objective is one entry.

``"nll"`` (the paper): the guarded NLL; default weight 1.28 / D. ``"exp_nll"`` (the reference
code): exp(guarded NLL - (D/2) log(2 pi)), linear above an exponent of 30 so that it stays
finite; default weight 1 / 0.0075; it saturates."""

DEFAULT_OBJECTIVE = "exp_nll"
"""Default objective: the reference code's ``L_proxy + weight * mean(exp(NLL - (D/2) log 2 pi))``.

It trains the flow and pulls the embeddings while the flow is still learning, and switches itself
off once the flow fits (exp of a falling NLL vanishes): the NLL's late contraction, which cost
held-out retrieval on most benchmark sets, never comes. ``"nll"`` is the paper's form
([Choose the weight and objective](choosing.md))."""


def _objective(name: str) -> Objective:
    """The entry ``name`` of ``OBJECTIVES``; a ValueError naming the valid ones if there is none."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}.") from None


def default_nir_weight(embedding_size: int, objective: str = "exp_nll") -> float:  # DEFAULT_OBJECTIVE
    """The NIR weight used when none is given: the objective's ``default_weight(D)``.

    ``"exp_nll"`` (the default objective): 1 / 0.0075, about 133, the reference code's CUB
    setting, at every D. ``"nll"``: 1.28 / D (0.01 at D = 128, 0.0025 at D = 512), a weight of
    1.28 on the NLL per dimension: the NLL's gradient on an embedding grows with D, the proxy
    loss's does not ([Concepts](concepts.md)).

    Example:
        >>> round(default_nir_weight(128), 1)
        133.3
        >>> default_nir_weight(128, "nll"), default_nir_weight(512, "nll")
        (0.01, 0.0025)
    """
    return _objective(objective).default_weight(embedding_size)


@dataclass(frozen=True)
class NIROptions:
    """The options of the NIR term: keywords of the same names in ``ProxyAnchorNIRLoss``,
    ``NIRRegularizer`` and ``NIRTerm`` (flow options as ``NIRTerm``'s own keywords there).

    Checked when built: an unknown objective or flow option, a negative noise, a guard radius
    that is not positive, or ``flow=`` with flow options is an error naming the fix.

    Args:
        objective: A name in ``OBJECTIVES``: ``"exp_nll"`` (the reference code, the default:
            mean of exp(NLL without the (D/2) log(2 pi) constant)) or ``"nll"`` (the paper:
            mean NLL).
        detach_proxies: Stop the NIR term's gradient from reaching the proxies.
        flow: A ``ProxyConditionedFlow`` to use; else one is built from ``flow_options``.
        flow_options: Keyword arguments of ``ProxyConditionedFlow`` (``num_blocks``,
            ``hidden_features``, ...).
        noise_std: Std of the Gaussian noise added to the flow's input in training; None:
            ``default_noise_std(D)``; 0: none.
        guard_radius: Latent norm beyond which the NLL's tail grows linearly; None:
            ``default_guard_radius(D)``; ``math.inf``: no guard.
        centered: The flow models the offset from the class proxy, (x - proxy) * sqrt(D), so
            the density is centred on the own proxy from the start (the likelihood stays exact:
            the scaling's log-det is added); else the embedding itself.
        fit_flow: For an objective that saturates (``"exp_nll"``): the flow is also fit by
            maximum likelihood on the detached embeddings and proxies, so it keeps modelling
            p(x | proxy) after exp(NLL) has vanished (the embeddings and proxies get
            exp(NLL)'s gradient only, and the term's value is unchanged). Off by default:
            the sharper flow makes exp(NLL)'s rare large values larger, and two of five
            PigCVP seeds collapsed with it ([Benchmarks](benchmarks.md)).

    Example:
        >>> options = NIROptions(objective="nll", flow_options={"num_blocks": 2})
        >>> NIRTerm.from_options(8, options).objective
        'nll'
    """

    objective: str = "exp_nll"  # DEFAULT_OBJECTIVE
    detach_proxies: bool = False
    flow: ProxyConditionedFlow | None = None
    flow_options: Mapping[str, Any] = field(default_factory=dict)
    noise_std: float | None = None
    guard_radius: float | None = None
    centered: bool = False
    fit_flow: bool = False

    @staticmethod
    def flow_option_names() -> list[str]:
        """The keywords of ``ProxyConditionedFlow`` that ``flow_options`` may hold, sorted."""
        return sorted(set(inspect.signature(ProxyConditionedFlow).parameters) - {"features"})

    def __post_init__(self) -> None:
        # A copy: changing the caller's dict later changes nothing here. None counts as no options.
        object.__setattr__(self, "flow_options", dict(self.flow_options or {}))
        objective = _objective(self.objective)
        if self.fit_flow and not objective.saturates:
            raise ValueError(
                f"fit_flow=True applies to objectives that saturate only ({self.objective!r} fits the "
                "flow by its own gradient); pass fit_flow=False."
            )
        if self.noise_std is not None and (not self.noise_std >= 0 or math.isinf(self.noise_std)):
            raise ValueError(f"noise_std must be a finite number >= 0 (0: no noise), got {self.noise_std}.")
        if self.guard_radius is not None and not self.guard_radius > 0:
            raise ValueError(f"guard_radius must be > 0 (math.inf: no guard), got {self.guard_radius}.")
        unknown = sorted(set(self.flow_options) - set(self.flow_option_names()))
        if unknown:
            raise TypeError(
                f"unknown flow_options {unknown}; flow_options are ProxyConditionedFlow options: "
                f"{', '.join(self.flow_option_names())}."
            )
        if self.flow is not None and self.flow_options:
            raise ValueError(f"Pass either flow= or flow options, not both (got {sorted(self.flow_options)}).")


class _RecompilingFunction:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` with a cache of its own that never fills.

    torch.compile keeps its cache, and the recompile limit (8 variants), per code object. Each
    instance compiles its own copy of ``fn``'s code, so every term, and every copy of a term,
    has a cache of its own; when that cache is full (a 9th batch size, say) a fresh copy takes
    over, so a new shape compiles again instead of raising ``FailOnRecompileLimitHit``. The
    function is unbound (the term comes as its first argument), so the cache holds no reference
    to the term.
    """

    def __init__(self, fn: Callable, mode: str | None, backend: str | Callable) -> None:
        self._fn, self._mode, self._backend = fn, mode, backend
        self._compiled = self._compile()
        self.generations = 1  # how many code copies were compiled (each holds up to 8 variants)

    def _compile(self) -> Callable:
        fn = self._fn
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        own.__kwdefaults__, own.__qualname__ = fn.__kwdefaults__, fn.__qualname__
        return torch.compile(own, fullgraph=True, dynamic=False, mode=self._mode, backend=self._backend)

    def __call__(self, *args, **kwargs):
        try:
            return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # Raised before the frame runs: nothing was computed. Start a fresh cache.
            self._compiled = self._compile()
            self.generations += 1
            return self._compiled(*args, **kwargs)


class NIRTerm(_SameReleasePickles, nn.Module):
    """Non-isotropy regularization: a proxy-conditioned flow and what is computed with it.

    Knows nothing of the loss that hosts it: every method takes the class ``proxies``, shaped
    (C, D), or (C, K, D) for K centres per class. The flow is conditioned on the L2-normalized
    proxy of the sample's class; with several centres per class, on the centre nearest (by
    cosine) to the sample. All log-likelihoods are float32 (float64 for float64 input) and
    exact, including the -(D/2) log(2 pi) constant.

    The training term (``per_sample_loss``) differs from the exact likelihood in two ways,
    both switchable: in training mode Gaussian noise of std ``noise_std`` is added to the
    flow's input (fresh each call, like dropout; off in ``eval()`` mode), and the quadratic
    part 0.5 ||z||^2 of the NLL grows linearly beyond the latent norm ``guard_radius``
    (``guarded_energy``). ``noise_std=0`` and ``guard_radius=math.inf`` give the plain NLL.

    Args:
        embedding_size: Embedding width D.
        objective: See ``NIROptions``, as are ``detach_proxies``, ``flow``, ``noise_std``,
            ``guard_radius``, ``centered`` and ``fit_flow``.
        **flow_options: Keyword arguments of ``ProxyConditionedFlow`` (``NIROptions.flow_options``).

    Example:
        >>> term = NIRTerm(8, hidden_features=16, num_layers=3)
        >>> proxies, x = torch.randn(5, 8), F.normalize(torch.randn(3, 8), dim=1)
        >>> term.log_likelihood(x, proxies, torch.tensor([0, 4, 4])).shape
        torch.Size([3])
        >>> term.log_likelihood_matrix(x, proxies).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        embedding_size: int,
        objective: str = "exp_nll",  # DEFAULT_OBJECTIVE
        detach_proxies: bool = False,
        flow: ProxyConditionedFlow | None = None,
        *,
        noise_std: float | None = None,
        guard_radius: float | None = None,
        centered: bool = False,
        fit_flow: bool = False,
        **flow_options,
    ) -> None:
        super().__init__()
        options = NIROptions(  # checks them all
            objective=objective,
            detach_proxies=detach_proxies,
            flow=flow,
            flow_options=flow_options,
            noise_std=noise_std,
            guard_radius=guard_radius,
            centered=centered,
            fit_flow=fit_flow,
        )
        if flow is None:
            flow = ProxyConditionedFlow(embedding_size, **options.flow_options)
        if flow.features != embedding_size:
            raise ValueError(f"flow has {flow.features} features but embedding_size is {embedding_size}.")
        self.embedding_size = embedding_size
        self.objective = objective
        self.detach_proxies = detach_proxies
        self.noise_std = default_noise_std(embedding_size) if noise_std is None else float(noise_std)
        self.guard_radius = default_guard_radius(embedding_size) if guard_radius is None else float(guard_radius)
        self.centered = centered
        self.fit_flow = bool(fit_flow)
        self.flow = flow
        self._compile_options: tuple[str | None, str | Callable] | None = None

    @classmethod
    def from_options(cls, embedding_size: int, options: NIROptions) -> NIRTerm:
        """The term of embedding width ``embedding_size`` with ``options`` (as both losses build theirs).

        Example:
            >>> NIRTerm.from_options(8, NIROptions(noise_std=0)).noise_std
            0.0
        """
        keywords = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        return cls(embedding_size, **keywords.pop("flow_options"), **keywords)

    # -- compiled path --------------------------------------------------------------------
    def compile_nir(
        self, enabled: bool = True, *, mode: str | None = "auto", backend: str | Callable = "inductor"
    ) -> NIRTerm:
        """Runs the training term and the B x C matrix passes through ``torch.compile``; returns self.

        Each is compiled whole (``fullgraph=True``) for static shapes (``dynamic=False``): a new
        batch size compiles again, so keep it fixed (``drop_last=True``). Each term, and each
        copy, has a compile cache of its own, without a limit on the number of shapes. ``mode="auto"`` is
        ``"reduce-overhead"`` (CUDA graphs) with inductor on CUDA and the backend's default
        elsewhere; any ``torch.compile`` mode or backend can be given. The first call of each compiles; the
        module, its state dict and its copies are unchanged (a copy compiles its own on first use).
        Calls with ``generator=`` run eagerly. ``compile_nir(False)`` switches back to eager.

        Under CUDA graphs the outputs of one call are overwritten by the next call of the same
        shape: use them within the step (the losses do), or ``.clone()`` what you keep.

        Example:
            >>> term = NIRTerm(8, hidden_features=16, num_layers=3)
            >>> term = term.compile_nir(backend="eager")
            >>> x, proxies = torch.randn(3, 8), torch.randn(5, 8)
            >>> term.per_sample_loss(x, proxies, torch.tensor([0, 4, 4])).shape
            torch.Size([3])
        """
        self._compile_options = (mode, backend) if enabled else None
        _COMPILED.pop(self, None)
        return self

    def _compiled(self, name: str, device: torch.device) -> Callable | None:
        """The compiled ``name`` method for this device (None: run eagerly), called with self first."""
        options = self._compile_options
        if options is None or torch.compiler.is_compiling():
            return None
        fns = _COMPILED.setdefault(self, {})
        key = (name, device.type)
        if key not in fns:
            mode, backend = options
            if mode == "auto":  # CUDA graphs where they exist (an inductor mode)
                mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            fns[key] = _RecompilingFunction(getattr(type(self), name), mode, backend)
        return functools.partial(fns[key], self)

    # -- context ------------------------------------------------------------------------
    # The compute dtype of the last call that could train the flow (grad enabled), if any.
    _trained_dtype: torch.dtype | None = None

    def _match_flow(self, x: Tensor) -> torch.dtype:
        """Casts the flow to the input's compute dtype (as PML recasts its proxies) until it has
        trained; a device mismatch, or a dtype change after training, is an error.

        Moving or recasting the module inside a call would leave the optimizer's state behind
        (and on "meta" lose the weights), so the device is the caller's to choose, once, with
        ``.to(device)``, and so is the dtype once the flow has trained.
        """
        dtype = self._check_dtype(x)
        check_device(x, self.flow)
        p = next(self.flow.parameters(), None)
        if p is not None and p.dtype != dtype:
            self.flow.to(dtype=dtype)
        if p is not None and torch.is_grad_enabled() and p.requires_grad and self._trained_dtype != dtype:
            self._trained_dtype = dtype
        return dtype

    def _check_dtype(self, x: Tensor) -> torch.dtype:
        """The compute dtype for ``x``; a ValueError if the flow trained in another one."""
        dtype = _compute_dtype(x)
        p = next(self.flow.parameters(), None)
        if p is not None and p.dtype != dtype and p.dtype == self._trained_dtype:
            raise ValueError(
                f"embeddings are {x.dtype} but the NIR flow has trained in {p.dtype}: recasting it "
                f"would leave the optimizer's state in {p.dtype}, and mixed-dtype training is not "
                f"supported. Pass {p.dtype} embeddings (embeddings.to({p.dtype})), or cast the "
                f"loss once, before building the optimizer: loss_fn.to({dtype})."
            )
        return dtype

    def _proxies(self, proxies: Tensor, dtype: torch.dtype) -> Tensor:
        proxies = proxies.detach() if self.detach_proxies else proxies
        return F.normalize(proxies.to(dtype), dim=-1)

    def context(self, embeddings: Tensor, proxies: Tensor, labels: Tensor) -> Tensor:
        """The normalized proxy each sample is conditioned on, (B, D)."""
        return self._context(embeddings, proxies, labels, self._match_flow(embeddings))

    def _context(self, embeddings: Tensor, proxies: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        rows = self._proxies(proxies.index_select(0, labels), dtype)
        if rows.dim() == 3:  # (B, K, D): the centre of its class nearest to each sample
            sims = torch.einsum("bkd,bd->bk", rows, embeddings.to(dtype))
            k = sims.argmax(dim=1)
            rows = torch.take_along_dim(rows, k[:, None, None], dim=1).squeeze(1)
        return rows

    def _flow_input(self, x: Tensor, centres: Tensor) -> Tensor:
        """What the flow sees: x, or with ``centered`` the offset (x - centre) * sqrt(D)."""
        if not self.centered:
            return x
        return (x - centres) * math.sqrt(x.shape[-1])

    def _with_input_log_det(self, log_det: Tensor) -> Tensor:
        """``log_det`` plus log|det| of ``_flow_input``'s map: (D/2) log D when centered (a scaling
        by sqrt(D)); else ``log_det`` itself (no op to dispatch)."""
        if not self.centered:
            return log_det
        dim = self.embedding_size
        return log_det + 0.5 * dim * math.log(dim)

    # -- likelihoods ----------------------------------------------------------------------
    def latent(self, embeddings: Tensor, proxies: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)`` of each sample under the flow of its own class."""
        dtype = self._match_flow(embeddings)
        context = self._context(embeddings, proxies, labels, dtype)
        x = embeddings.to(dtype)
        z, log_det = self.flow.inverse_and_log_det(self._flow_input(x, context), context)
        return z, self._with_input_log_det(log_det)

    def log_likelihood(self, embeddings: Tensor, proxies: Tensor, labels: Tensor) -> Tensor:
        """log p(x_i | proxy of y_i), shape (B,)."""
        z, log_det = self.latent(embeddings, proxies, labels)
        return standard_normal_log_prob(z) + log_det

    def log_likelihood_matrix(
        self, embeddings: Tensor, proxies: Tensor, chunk_size: int | None = None, *, requires_grad: bool = False
    ) -> Tensor:
        """log p(x_i | proxy_c) for every sample and class, shape (B, C).

        Runs in passes of ``chunk_size`` samples x C classes (default: about 1024 pairs per pass
        on CPU, 4096 elsewhere). Every pass has the same shape (the last is padded), so compiled
        or CUDA-graph code sees one shape; per-class work (normalization, context projections)
        runs once.

        By default no autograd graph is kept, whatever the grad mode, so memory stays that of one
        pass. ``requires_grad=True`` keeps every pass's graph (memory grows with B x C) for a
        result to differentiate.
        """
        if not requires_grad:
            with torch.no_grad():
                return self.log_likelihood_matrix(embeddings, proxies, chunk_size, requires_grad=True)
        dtype = self._match_flow(embeddings)
        x = embeddings.to(dtype)
        num_classes, batch = proxies.shape[0], x.shape[0]
        centres = self._proxies(proxies, dtype).flatten(0, -2)  # (C or C*K, D)
        encoded = self.flow.encode_context(centres)  # per-class work, once
        if chunk_size is None:
            rows = _MATRIX_ROWS_CPU if x.device.type == "cpu" else _MATRIX_ROWS
            chunk_size = max(1, rows // num_classes)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1 (None: the default), got {chunk_size!r}.")
        chunk_size = min(chunk_size, max(batch, 1))
        num_chunks = -(-batch // chunk_size)
        padded = F.pad(x, (0, 0, 0, num_chunks * chunk_size - batch))
        one_pass = self._compiled("_matrix_pass", x.device) or self._matrix_pass
        out = x.new_empty(num_chunks * chunk_size, num_classes)
        for i, chunk in enumerate(padded.split(chunk_size)):
            # Copied out at once: a CUDA-graph replay of the next pass reuses the output memory.
            out[i * chunk_size : (i + 1) * chunk_size] = one_pass(chunk, centres, encoded, num_classes)
        return out[:batch]

    def _matrix_pass(self, chunk: Tensor, centres: Tensor, encoded: Tensor, num_classes: int) -> Tensor:
        """log p(x_i | proxy_c) of one chunk of samples and every class, (chunk, C)."""
        rows = chunk.repeat_interleave(num_classes, dim=0)  # row = i * C + c
        class_index = torch.arange(num_classes, device=chunk.device)
        if centres.shape[0] != num_classes:  # K centres per class: the nearest one
            k_per_class = centres.shape[0] // num_classes
            sims = (chunk @ centres.t()).unflatten(1, (num_classes, k_per_class))
            index = (class_index * k_per_class + sims.argmax(dim=2)).flatten()
        else:
            index = class_index.repeat(chunk.shape[0])
        if self.centered:
            rows = self._flow_input(rows, centres.index_select(0, index))
        z, log_det = self.flow.inverse_and_log_det(rows, encoded=encoded, context_index=index)
        log_p = standard_normal_log_prob(z) + self._with_input_log_det(log_det)
        return log_p.view(chunk.shape[0], num_classes)

    # -- objective and sampling -----------------------------------------------------------
    def loss_and_nll(
        self, embeddings: Tensor, proxies: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """The training term per sample and the NLL it was computed from, each (B,).

        The NLL (with the (D/2) log(2 pi) constant, no guard) is that of the flow's input, noisy
        in training mode. Noise comes from torch's RNG, or from ``generator`` (on the
        embeddings' device) if given. The term is the objective's (``OBJECTIVES``) of the
        guarded NLL: the guarded NLL itself (``"nll"``) or exp(guarded NLL - (D/2) log(2 pi))
        (``"exp_nll"``, linear above an exponent of 30 so that it stays finite).
        """
        dtype = self._match_flow(embeddings)
        fn = self._compiled("_loss_and_nll", embeddings.device) if generator is None else None
        return (fn or self._loss_and_nll)(embeddings, proxies, labels, dtype, generator)

    def _loss_and_nll(
        self, embeddings: Tensor, proxies: Tensor, labels: Tensor, dtype: torch.dtype, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        context = self._context(embeddings, proxies, labels, dtype)
        x = embeddings.to(dtype)
        if self.training and self.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = torch.add(x, noise, alpha=self.noise_std)
        flow_input = self._flow_input(x, context)
        fit = self.fit_flow and torch.is_grad_enabled()
        if fit:  # one pass of 2B rows; the second half reaches the flow's parameters only
            flow_input = torch.cat([flow_input, flow_input.detach()])
            context = torch.cat([context, context.detach()])
        z, log_det = self.flow.inverse_and_log_det(flow_input, context)
        log_det = self._with_input_log_det(log_det)
        constant = 0.5 * z.shape[-1] * math.log(2 * math.pi)
        sq = z.square().sum(-1)
        energy = _guarded_energy_of_squared_norm(sq, self.guard_radius) - log_det  # NLL without the constant
        if fit:
            batch = x.shape[0]
            fit_energy, energy, sq, log_det = energy[batch:], energy[:batch], sq[:batch], log_det[:batch]
        nll = 0.5 * sq - log_det + constant
        loss = OBJECTIVES[self.objective].term(energy, constant)
        if fit:  # value 0, gradient that of the NLL: maximum likelihood for the flow
            loss = loss + (fit_energy - fit_energy.detach())
        return loss, nll

    def per_sample_loss(
        self, embeddings: Tensor, proxies: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The objective's per-sample training term, (B,): see ``loss_and_nll``.

        Example:
            >>> term = NIRTerm(2, objective="exp_nll", num_blocks=1, num_layers=2)
            >>> term.eval()  # no training noise: exp(0.5 ||x||^2) under the identity flow
            NIRTerm(...)
            >>> x, label = torch.tensor([[0.6, 0.8]]), torch.tensor([1])
            >>> term.per_sample_loss(x, torch.eye(2), label).detach()
            tensor([1.6487])
        """
        return self.loss_and_nll(embeddings, proxies, labels, generator)[0]

    def sample(self, proxies: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draws x ~ p(x | proxy_y) for each label, shape (len(labels), D).

        With K centres per class each draw picks one of its class's centres uniformly.
        """
        dtype = self._match_flow(proxies)
        rows = self._proxies(proxies.index_select(0, labels), dtype)
        if rows.dim() == 3:
            k = torch.randint(rows.shape[1], (rows.shape[0],), generator=generator, device="cpu")
            rows = torch.take_along_dim(rows, k.to(rows.device)[:, None, None], dim=1).squeeze(1)
        x = self.flow.sample(labels.shape[0], rows, generator=generator)[0]
        return rows + x / math.sqrt(x.shape[-1]) if self.centered else x
