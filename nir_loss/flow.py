"""Proxy-conditioned normalizing flow built from normflows parts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import normflows as nf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _fused

__all__ = [
    "COUPLINGS",
    "ContextAffineCoupling",
    "CouplingOptions",
    "ProxyConditionedFlow",
    "soft_clamp",
    "standard_normal_log_prob",
]

# FrEIA's "ATAN" clamp activation, as the reference run used it (0.636 ~ 2/pi).
_ATAN_SCALE = 0.636
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def soft_clamp(s: Tensor, clamp: float) -> Tensor:
    """Soft-clamps log-scales to about (-clamp, clamp), as FrEIA's GLOW coupling does.

    Example:
        >>> soft_clamp(torch.tensor([0.0, 1e6]), 2.0)
        tensor([0.0000, 1.9981])
    """
    return clamp * _ATAN_SCALE * torch.atan(s)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per row, with the -(D/2) log(2 pi) constant.

    Example:
        >>> standard_normal_log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Switches autocast off for the flow: its GEMMs then run in the input's precision, without casts."""
    kind = x.device.type
    if kind not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_cpu_enabled() if kind == "cpu" else kind == "cuda" and torch.is_autocast_enabled()
    return torch.autocast(kind, enabled=False) if enabled else contextlib.nullcontext()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The precision of the flow's math for input ``x``: float64 stays float64, all else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather_rows(t: Tensor, index: Tensor | None) -> Tensor:
    return t if index is None else t.index_select(0, index)


# The key under which a pickled nir-loss module records the release that saved it.
_RELEASE_KEY = "_nir_loss_release"


class _SameReleasePickles:
    """Whole-module pickles (``torch.save(loss_fn)``, ``pickle``) load only in the release that saved them.

    Pickling records the release; unpickling another release's module (or one saved before
    releases were recorded) raises a RuntimeError saying to rebuild the loss and load its state
    dict, which loads in any release. ``copy.deepcopy`` works as before. Also the root of a
    state-dict load: it carries older releases' metadata to the modules' current paths.
    """

    def __getstate__(self) -> dict[str, Any]:
        from . import __version__

        state = cast("dict[str, Any]", super().__getstate__())
        return {**state, _RELEASE_KEY: __version__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from . import __version__

        state = dict(state)
        saved = state.pop(_RELEASE_KEY, None)
        if saved != __version__:
            raise RuntimeError(
                f"The {type(self).__name__} in this file was saved whole (torch.save(loss_fn) or pickle) by "
                f"nir-loss {saved or '0.3.0 or earlier'}; this is nir-loss {__version__}. A whole module "
                "loads only in the release that saved it; state dicts load in any release. Rebuild the loss "
                "with the same arguments and load its state dict: loss_fn = ProxyAnchorNIRLoss(...); "
                "loss_fn.load_state_dict(state_dict). To get the state dict of this file, load it with the "
                "release that saved it and torch.save(loss_fn.state_dict(), path) (docs/how-to/save-load.md)."
            )
        super().__setstate__(state)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Only the loaded module at the top sees the metadata (PyTorch hands submodules plain dicts).
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            ContextAffineCoupling._move_legacy_metadata(metadata)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


# -- couplings -----------------------------------------------------------------------------


class _ContextMLP(nn.Module):
    """A coupling's subnet: normflows' MLP on the conditioning half, the context through its own layer.

    The first layer's pre-activation is ``input_layer(x_c)`` plus the encoded context
    (``encode_context``: ``context_layer(context)`` plus the first layer's bias), so a flow can
    encode each distinct context (class) once and gather it per row. After a ReLU, normflows'
    ``MLP`` (``num_layers - 1`` layers) gives ``[shift | raw log-scale]`` halves: contiguous halves
    let ``torch.compile`` vectorize the affine map (docs/benchmarks.md). State dicts of version 1
    (nir-loss 0.1.0, interleaved like normflows' ``AffineCoupling``) are converted when loaded.
    """

    _version = 2

    def __init__(
        self,
        in_features: int,
        context_features: int | None,
        out_features: int,
        hidden: int,
        num_layers: int,
        identity_init: bool,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}.")
        self.input_layer = nn.Linear(in_features, hidden)
        self.context_layer = None if context_features is None else nn.Linear(context_features, hidden, bias=False)
        self.mlp = nf.nets.MLP([hidden] * (num_layers - 1) + [out_features], init_zeros=identity_init)
        for layer in self.mlp.net:
            if isinstance(layer, nn.LeakyReLU):  # slope 0: a ReLU, in place like FrEIA's subnets' memory use
                layer.inplace = True

    def encode_context(self, context: Tensor) -> Tensor:
        """(R, context_features) -> (R, hidden): the context's part of the first pre-activation, with its bias."""
        if self.context_layer is None:
            raise ValueError("This coupling was built without a context (context_features=None): nothing to encode.")
        return F.linear(context, self.context_layer.weight, self.input_layer.bias)

    def forward(self, x: Tensor, encoded: Tensor | None = None) -> Tensor:
        """``[shift | raw log-scale]`` (N, out_features) of the conditioning half ``x`` and its encoded context rows."""
        h = self.input_layer(x) if encoded is None else torch.addmm(encoded, x, self.input_layer.weight.t())
        return self.mlp(h.relu_())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Version 1 interleaved (shift, log-scale) rows in the last layer; reorder to halves.
        # A state dict without metadata is taken as current (version 2).
        if local_metadata.get("version", self._version) < 2:
            last = f"{prefix}mlp.net.{len(self.mlp.net) - 1}."
            for key in (last + "weight", last + "bias"):
                if key in state_dict:
                    state_dict[key] = torch.cat([state_dict[key][0::2], state_dict[key][1::2]])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


# The subnet's name in whole-module pickles of nir-loss 0.3.0 and earlier: they then unpickle far
# enough to raise _SameReleasePickles' message, which says how to load their state dicts.
_ConditionedParamMap = _ContextMLP


class ContextAffineCoupling(nf.flows.Flow):
    """GLOW-style affine half coupling whose subnet also sees a context vector.

    One half of the features (``transformed``) is scaled and shifted by a subnet
    (``param_map``) of the other half and the context, as in normflows' ``AffineCoupling``
    (``param = self.param_map(x_c, encoded)``, then the affine map); the log-scale is
    soft-clamped to ``clamp`` (FrEIA's atan clamp). In the density direction (``inverse``,
    x -> z) it computes ``x_t * exp(s) + t`` like FrEIA's GLOW block.

    The context enters the subnet's first layer through its own linear layer, so its projection
    (``encode_context``) can be computed once per distinct context (per class) and gathered by
    ``context_index`` for every row that uses it.

    Args:
        features: Number of features D.
        context_features: Width of the context vector, or None for no context.
        hidden_features: Width of the subnet.
        num_layers: Number of linear layers in the subnet.
        clamp: Soft clamp of the log-scale.
        transform_first: Transform the first ``round(D / 2)`` features (else the rest).
        identity_init: Zero the subnet's last layer, so the coupling starts as the identity.

    Example:
        >>> layer = ContextAffineCoupling(4, context_features=3)
        >>> x, c = torch.randn(5, 4), torch.randn(5, 3)
        >>> z, log_det = layer.inverse(x, context=c)
        >>> x_back, log_det_back = layer(z, context=c)
        >>> torch.allclose(x, x_back, atol=1e-6), z.shape, log_det.shape
        (True, torch.Size([5, 4]), torch.Size([5]))
    """

    # 2: the subnet is ``param_map`` and holds its context layer. 1 (nir-loss 0.3.0 and earlier):
    # it sat at ``coupling.param_map`` (inside a stock AffineCoupling), the context layer beside it.
    _version = 2

    def __init__(
        self,
        features: int,
        context_features: int | None = None,
        hidden_features: int = 128,
        num_layers: int = 8,
        clamp: float = 2.0,
        transform_first: bool = True,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        if features < 2:
            raise ValueError(f"A coupling needs at least 2 features, got {features}.")
        split = round(features / 2)
        self.features, self.context_features, self.clamp = features, context_features, clamp
        self.transform_first = transform_first
        self.transformed = slice(0, split) if transform_first else slice(split, features)
        self.conditioner = slice(split, features) if transform_first else slice(0, split)
        self._split_sizes = (split, features - split)
        n_t = split if transform_first else features - split
        self.param_map = _ContextMLP(
            features - n_t, context_features, 2 * n_t, hidden_features, num_layers, identity_init
        )
        self.context_width = 0 if context_features is None else hidden_features

    def encode_context(self, context: Tensor) -> Tensor:
        """Encodes contexts (R, context_features) for ``encoded=``: (R, hidden_features)."""
        return self.param_map.encode_context(context)

    def _transform(self, x: Tensor, encoded: Tensor | None, density: bool) -> tuple[Tensor, Tensor]:
        # One split, not two slices: its backward is one cat instead of two zero-filled copies.
        first, second = x.split(self._split_sizes, dim=1)
        x_t, x_c = (first, second) if self.transform_first else (second, first)
        # Keep the affine map in the input's precision (float32 under autocast).
        shift, raw = self.param_map(x_c, encoded).to(x.dtype).chunk(2, dim=1)
        log_scale = soft_clamp(raw, self.clamp)
        if density:
            y_t, log_det = torch.addcmul(shift, x_t, torch.exp(log_scale)), log_scale.sum(1)
        else:
            y_t, log_det = (x_t - shift) * torch.exp(-log_scale), -log_scale.sum(1)
        parts = (y_t, x_c) if self.transform_first else (x_c, y_t)
        return torch.cat(parts, dim=1), log_det

    def _encoded_rows(self, context: Tensor | None, encoded: Tensor | None, index: Tensor | None) -> Tensor | None:
        if encoded is not None:
            return _gather_rows(encoded, index)
        if self.context_features is None:
            return None
        if context is None:
            raise ValueError("This coupling is conditional: pass context=(N, context_features).")
        return self.encode_context(context)

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Density direction x -> z; returns ``(z, log|det dz/dx|)``."""
        return self._transform(z, self._encoded_rows(context, encoded, context_index), density=True)

    def forward(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sampling direction z -> x; returns ``(x, log|det dx/dz|)``."""
        return self._transform(z, self._encoded_rows(context, encoded, context_index), density=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Version 1's keys (told by the keys, so also without metadata) move to their current paths.
        for old, new in (("coupling.param_map.", "param_map."), ("context_layer.", "param_map.context_layer.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _move_legacy_metadata(metadata: dict[str, dict]) -> None:
        """Adds each version-1 coupling's subnet metadata (its layout version) at the subnet's current path."""
        for path in [p for p in metadata if p == "coupling.param_map" or p.endswith(".coupling.param_map")]:
            metadata.setdefault(path[: -len("coupling.param_map")] + "param_map", metadata[path])


class _SplineCoupling(nf.flows.CoupledRationalQuadraticSpline):
    """normflows' rational-quadratic spline coupling, taking the flow's ``encoded=`` context rows."""

    def __init__(self, features: int, context_features: int, **kwargs: Any) -> None:
        super().__init__(features, num_context_channels=context_features, **kwargs)
        self.features, self.context_features, self.context_width = features, context_features, context_features

    def encode_context(self, context: Tensor) -> Tensor:
        return context  # the spline's own subnet takes the context as is

    def inverse(self, z, context=None, *, encoded=None, context_index=None):
        return super().inverse(z, context=context if encoded is None else _gather_rows(encoded, context_index))

    def forward(self, z, context=None, *, encoded=None, context_index=None):
        return super().forward(z, context=context if encoded is None else _gather_rows(encoded, context_index))


class CouplingOptions(NamedTuple):
    """What a coupling builder in ``COUPLINGS`` gets: ``ProxyConditionedFlow``'s layer arguments."""

    hidden_features: int
    num_layers: int
    clamp: float
    identity_init: bool
    spline_bins: int
    spline_tail_bound: float


def _affine(features: int, context_features: int, transform_first: bool, o: CouplingOptions) -> nf.flows.Flow:
    return ContextAffineCoupling(
        features, context_features, o.hidden_features, o.num_layers, o.clamp, transform_first, o.identity_init
    )


def _spline(features: int, context_features: int, transform_first: bool, o: CouplingOptions) -> nf.flows.Flow:
    return _SplineCoupling(
        features,
        context_features,
        num_blocks=max(1, (o.num_layers - 2) // 2),
        num_hidden_channels=o.hidden_features,
        num_bins=o.spline_bins,
        tail_bound=o.spline_tail_bound,
        reverse_mask=not transform_first,
    )


COUPLINGS: dict[str, Callable[[int, int, bool, CouplingOptions], nf.flows.Flow]] = {
    "affine": _affine,
    "spline": _spline,
}
"""The coupling kinds of ``ProxyConditionedFlow(coupling=name)``: name -> builder.

A builder ``(features, context_features, transform_first, options) -> layer`` makes one half
coupling. A layer has ``features``, ``context_features`` and ``context_width`` attributes,
``encode_context(context) -> (R, context_width)``, and normflows' ``inverse`` (x -> z) and
``forward`` (z -> x), each returning ``(output, log|det|)`` and taking ``context=`` or the encoded
rows as ``encoded=`` (with an optional ``context_index``). A new kind is one entry.
"""


# -- the flow ------------------------------------------------------------------------------


class ProxyConditionedFlow(_SameReleasePickles, nf.ConditionalNormalizingFlow):
    """Conditional normalizing flow p(x | context) for NIR, on normflows' conditional flow.

    In the density direction each of ``num_blocks`` blocks applies a fixed random ``Permute``
    then a GLOW coupling (two ``ContextAffineCoupling`` halves), as in the reference NIR code
    (FrEIA ``PermuteRandom`` + ``GLOWCouplingBlock``); the context (the L2-normalized class proxy,
    optionally through a small MLP) is fed to every coupling. The base distribution is a fixed
    standard normal (normflows ``DiagGaussian``). With ``coupling="spline"`` the halves are
    normflows' ``CoupledRationalQuadraticSpline`` instead; ``COUPLINGS`` lists the kinds.

    normflows conventions hold: ``inverse(x, context)`` maps embeddings to latents,
    ``forward(z, context)`` maps back, ``log_prob(x, context)`` is the exact log-density.
    Log-dets are accumulated in the input's precision (float32, or float64 for float64 input),
    also under autocast.

    Args:
        features: Embedding width D.
        context_features: Context width (default D, the proxy width).
        num_blocks: Number of permutation + GLOW coupling blocks.
        hidden_features: Subnet width.
        num_layers: Linear layers per subnet.
        clamp: Soft clamp of the affine log-scales.
        coupling: A key of ``COUPLINGS``: ``"affine"`` (reference) or ``"spline"`` (normflows'
            rational-quadratic spline).
        context_mlp_width: If set, a 2-layer MLP (context -> width -> context) conditions the
            flow instead of the raw proxy, like the reference's ``dense_embed`` option.
        identity_init: Start every affine coupling as the identity.
        seed: Seed of a local generator for the fixed permutations: they depend on ``seed`` only.
            The subnets' weights come from the global RNG, like any torch layer's.
        spline_bins: Bins of the spline coupling.
        spline_tail_bound: Spline interval [-B, B]; identity outside (embeddings are unit norm).
        fused: Run the density direction of an affine flow as one fused pass with a hand-written
            backward (``nir_loss/_fused.py``: fewer kernels, and faster on CPU too; not twice
            differentiable); False runs the layers one by one under autograd. Both compute the
            same function; tests pin them equal.

    Attributes:
        batched_weight_grads: In the fused backward, compute the weight gradients of all
            couplings in batched GEMMs after the loop (fewest kernels) instead of per layer
            inside it (operands still in cache). None (default): batched off the CPU.

    Example:
        >>> flow = ProxyConditionedFlow(8, num_blocks=2, hidden_features=16)
        >>> x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> rho = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> z, log_det = flow.inverse_and_log_det(x, rho)
        >>> torch.allclose(flow.forward(z, rho), x, atol=1e-5)
        True
        >>> flow.log_prob(x, rho).shape
        torch.Size([4])

    References:
        Roth, Vinyals, Akata. Non-isotropy Regularization for Proxy-based Deep Metric
        Learning. CVPR 2022 (arXiv:2203.08547).
    """

    def __init__(
        self,
        features: int,
        context_features: int | None = None,
        num_blocks: int = 5,
        hidden_features: int = 128,
        num_layers: int = 8,
        clamp: float = 2.0,
        coupling: str = "affine",
        context_mlp_width: int | None = None,
        identity_init: bool = True,
        seed: int = 0,
        spline_bins: int = 8,
        spline_tail_bound: float = 3.0,
        fused: bool = True,
    ) -> None:
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {sorted(COUPLINGS)}, got {coupling!r}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        context_features = features if context_features is None else context_features
        build = COUPLINGS[coupling]
        options = CouplingOptions(hidden_features, num_layers, clamp, identity_init, spline_bins, spline_tail_bound)
        generator = torch.Generator().manual_seed(seed)
        density_order: list[nn.Module] = []
        for _ in range(num_blocks):
            permute = nf.flows.Permute(features, mode="shuffle")
            perm = torch.randperm(features, generator=generator)
            permute.perm.copy_(perm)
            permute.inv_perm.copy_(torch.argsort(perm))
            density_order += [permute, *(build(features, context_features, first, options) for first in (True, False))]
        q0 = nf.distributions.DiagGaussian(features, trainable=False)
        # normflows stores layers in sampling order (z -> x); density is the reverse.
        super().__init__(q0, list(reversed(density_order)))
        self.features = features
        self.context_features = context_features
        self.coupling_type = coupling
        self.context_net = (
            nn.Identity()
            if context_mlp_width is None
            else nn.Sequential(
                nn.Linear(context_features, context_mlp_width),
                nn.ReLU(),
                nn.Linear(context_mlp_width, context_features),
            )
        )
        self.fused = fused
        self.batched_weight_grads: bool | None = None
        self._plan_cache: _fused.AffinePlan | None = None

    def _couplings(self) -> list[Any]:
        """The couplings in density order: the order of ``encode_context``'s column blocks."""
        return [layer for layer in reversed(self.flows) if not isinstance(layer, nf.flows.Permute)]

    def encode_context(self, context: Tensor) -> Tensor:
        """Encodings of R distinct contexts for every coupling, (R, sum of widths), computed once.

        Pass the result as ``encoded=`` with a ``context_index`` (N,) that says which of the R
        contexts each of N rows uses: per-class work then happens once per class.

        Example:
            >>> flow = ProxyConditionedFlow(4, num_blocks=1, hidden_features=8)
            >>> classes, labels = torch.randn(3, 4), torch.tensor([2, 0, 2])
            >>> x = torch.randn(3, 4)
            >>> encoded = flow.encode_context(classes)
            >>> lp = flow.log_prob(x, encoded=encoded, context_index=labels)
            >>> torch.allclose(lp, flow.log_prob(x, classes[labels]))
            True
        """
        with _autocast_off(context):
            c = self.context_net(context)
            couplings = self._couplings()
            if all(isinstance(layer, ContextAffineCoupling) for layer in couplings):
                # Each encoding is a linear map: all of them in one GEMM, the first layers' biases folded in.
                maps = [cast(ContextAffineCoupling, layer).param_map for layer in couplings]
                weight = torch.cat([cast(nn.Linear, m.context_layer).weight for m in maps])
                bias = torch.cat([m.input_layer.bias for m in maps])
                return torch.addmm(bias, c.to(weight.dtype), weight.t())
            return torch.cat([layer.encode_context(c) for layer in couplings], dim=1)

    def _fused_plan(self, x: Tensor) -> _fused.AffinePlan | None:
        """The fused pass's plan where this flow takes it for ``x``, else None (the layer loop)."""
        if not self.fused:
            return None
        if torch.compiler.is_compiling():  # no cache: setting it would invalidate the compiled graph
            plan = _fused.plan(self.flows)
        else:
            plan = self._plan_cache
            if plan is None or plan.key != tuple(map(id, self.flows)):
                plan = self._plan_cache = _fused.plan(self.flows)
        if plan is None:
            return None
        weight = plan.last[0].weight
        return plan if weight.dtype == x.dtype and weight.device == x.device else None

    def _run(
        self,
        x: Tensor,
        context: Tensor | None,
        encoded: Tensor | None,
        context_index: Tensor | None,
        density: bool,
    ) -> tuple[Tensor, Tensor]:
        with _autocast_off(x):
            x = x.to(_compute_dtype(x))
            if encoded is None:
                if context is None:
                    raise ValueError("ProxyConditionedFlow is conditional: pass context=(N, context_features).")
                encoded = self.encode_context(context)
            rows = _gather_rows(encoded, context_index).to(x.dtype)
            plan = self._fused_plan(x) if density else None
            if plan is not None:  # fast path: one fused pass, the same function as the loop below
                batched = x.device.type != "cpu" if self.batched_weight_grads is None else self.batched_weight_grads
                return _fused.density(plan, x, rows, batched)
            encs = rows.split([layer.context_width for layer in self._couplings()], dim=1)  # density order
            couplings = iter(encs if density else encs[::-1])
            log_det = x.new_zeros(x.shape[0])
            for layer in reversed(self.flows) if density else self.flows:
                if isinstance(layer, nf.flows.Permute):  # volume preserving: its log-det is exactly 0
                    x = x.index_select(1, layer.inv_perm if density else layer.perm)
                    continue
                x, ld = (layer.inverse if density else layer.forward)(x, encoded=next(couplings))
                log_det = log_det + ld.to(x.dtype)
            return x, log_det

    # -- normflows API --------------------------------------------------------------------
    def inverse_and_log_det(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Maps embeddings x (N, D) to latents z; returns ``(z, log|det dz/dx|)``."""
        return self._run(x, context, encoded, context_index, density=True)

    def forward_and_log_det(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Maps latents z (N, D) to embeddings x; returns ``(x, log|det dx/dz|)``."""
        return self._run(z, context, encoded, context_index, density=False)

    def inverse(self, x: Tensor, context: Tensor | None = None, **kwargs) -> Tensor:
        return self.inverse_and_log_det(x, context, **kwargs)[0]

    def forward(self, z: Tensor, context: Tensor | None = None, **kwargs) -> Tensor:
        return self.forward_and_log_det(z, context, **kwargs)[0]

    def log_prob(self, x: Tensor, context: Tensor | None = None, **kwargs) -> Tensor:
        """Exact log p(x | context), including the -(D/2) log(2 pi) constant.

        Example:
            >>> flow = ProxyConditionedFlow(2, num_blocks=1, hidden_features=8)
            >>> flow.log_prob(torch.zeros(1, 2), torch.ones(1, 2))  # N(0, I) at first
            tensor([-1.8379], grad_fn=<AddBackward0>)
        """
        z, log_det = self.inverse_and_log_det(x, context, **kwargs)
        return standard_normal_log_prob(z) + log_det

    def sample(
        self, num_samples: int = 1, context: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws x ~ p(x | context); returns ``(x, log p(x | context))``.

        Example:
            >>> flow = ProxyConditionedFlow(4, num_blocks=1, hidden_features=8)
            >>> generator = torch.Generator().manual_seed(0)
            >>> x, log_p = flow.sample(5, torch.randn(5, 4), generator=generator)
            >>> x.shape, log_p.shape
            (torch.Size([5, 4]), torch.Size([5]))
        """
        if context is None:
            raise ValueError("ProxyConditionedFlow is conditional: pass context=(num_samples, context_features).")
        dtype = _compute_dtype(context)
        z = torch.randn(num_samples, self.features, generator=generator, device=context.device, dtype=dtype)
        x, log_det = self.forward_and_log_det(z, context)
        return x, standard_normal_log_prob(z) - log_det
