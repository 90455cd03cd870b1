"""Proxy-conditioned normalizing flow built from normflows parts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import normflows as nf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContextAffineCoupling", "ProxyConditionedFlow", "soft_clamp", "standard_normal_log_prob"]

# FrEIA's "ATAN" clamp activation, as the reference run used it (0.636 ~ 2/pi).
_ATAN_SCALE = 0.636


def soft_clamp(s: Tensor, clamp: float) -> Tensor:
    """Soft-clamps log-scales to about (-clamp, clamp), as FrEIA's GLOW coupling does.

    Example:
        >>> soft_clamp(torch.tensor([0.0, 1e6]), 2.0)
        tensor([0.0000, 1.9981])
    """
    return clamp * _ATAN_SCALE * torch.atan(s)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The precision of the flow's math for input ``x``: float64 stays float64, all else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather_rows(t: Tensor, index: Tensor | None) -> Tensor:
    return t if index is None else t.index_select(0, index)


class _ConditionedParamMap(nn.Module):
    """Subnet of a coupling: (x_cond, encoded context) -> (shift, log-scale).

    The last layer's outputs are ``[shift | raw log-scale]`` halves. Contiguous halves let
    ``torch.compile`` vectorize the affine map (interleaved columns kept the compiled NIR term
    slower; docs/benchmarks.md). State dicts of version 1 (nir-loss
    0.1.0, interleaved like normflows' ``AffineCoupling``) are converted when loaded.
    """

    _version = 2

    def __init__(
        self, in_features: int, out_features: int, hidden: int, num_layers: int,
        clamp: float, identity_init: bool,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}.")
        self.input_layer = nn.Linear(in_features, hidden)
        # normflows MLP puts an activation between its layers but not before the first one,
        # so the first (split) layer is ours and the remaining num_layers - 1 are normflows'.
        self.mlp = nf.nets.MLP([hidden] * (num_layers - 1) + [2 * out_features], init_zeros=identity_init)
        self.clamp = clamp

    def shift_and_log_scale(self, x_cond: Tensor, encoded: Tensor | None,
                            index: Tensor | None) -> tuple[Tensor, Tensor]:
        """The affine parameters ``(shift, soft-clamped log-scale)``, each (N, out_features)."""
        h = F.linear(x_cond, self.input_layer.weight, self.input_layer.bias)
        if encoded is not None:
            h = h.add_(_gather_rows(encoded, index).to(h.dtype))
        h = torch.relu_(h)
        # The normflows MLP, run layer by layer so its (leaky slope 0) ReLUs work in place.
        for layer in self.mlp.net:
            if isinstance(layer, nn.Linear):
                h = F.linear(h, layer.weight, layer.bias)
            elif isinstance(layer, nn.LeakyReLU) and layer.negative_slope == 0.0:
                h = torch.relu_(h)
            else:
                h = layer(h)
        # Keep the affine map in the input's precision (float32 under autocast).
        shift, raw = h.to(x_cond.dtype).chunk(2, dim=1)
        return shift, soft_clamp(raw, self.clamp)

    def forward(self, inputs: tuple[Tensor, Tensor | None, Tensor | None]) -> Tensor:
        """Interleaved ``(shift, log-scale)`` channels, as normflows' ``AffineCoupling`` reads them."""
        shift, log_scale = self.shift_and_log_scale(*inputs)
        return torch.stack([shift, log_scale], dim=-1).flatten(-2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Version 1 interleaved (shift, log-scale) rows in the last layer; reorder to halves.
        # A state dict without metadata is taken as current (version 2).
        if local_metadata.get("version", self._version) < 2:
            last = f"{prefix}mlp.net.{len(self.mlp.net) - 1}."
            for key in (last + "weight", last + "bias"):
                if key in state_dict:
                    state_dict[key] = torch.cat([state_dict[key][0::2], state_dict[key][1::2]])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class ContextAffineCoupling(nf.flows.Flow):
    """GLOW-style affine half coupling whose subnet also sees a context vector.

    One half of the features (``transformed``) is scaled and shifted by a subnet of the other
    half and the context; the log-scale is soft-clamped to ``clamp`` (FrEIA's atan clamp). The
    affine map is that of normflows' stock ``AffineCoupling`` (kept as ``self.coupling``, whose
    ``param_map`` is the subnet); the hot path computes it directly, without interleaving the
    parameters, and a test pins the two equal. In the density direction (``inverse``, x -> z)
    it computes ``x_t * exp(s) + t`` like FrEIA's GLOW block.

    The subnet's first layer is split into an input part and a context part, so the context
    projection (``encode_context``) can be computed once per distinct context (per class) and
    gathered by ``context_index`` for every row that uses it.

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
        self.features = features
        self.transformed = slice(0, split) if transform_first else slice(split, features)
        self.conditioner = slice(split, features) if transform_first else slice(0, split)
        self.transform_first = transform_first
        self._split_sizes = (split, features - split)
        n_t = split if transform_first else features - split
        self.context_layer = (
            None if context_features is None else nn.Linear(context_features, hidden_features, bias=False)
        )
        param_map = _ConditionedParamMap(features - n_t, n_t, hidden_features, num_layers, clamp, identity_init)
        self.coupling = nf.flows.AffineCoupling(param_map, scale=True, scale_map="exp")

    def encode_context(self, context: Tensor | None) -> Tensor | None:
        """Projects contexts (R, C_ctx) to the subnet's hidden width (R, hidden)."""
        if self.context_layer is None or context is None:
            return None
        return self.context_layer(context)

    def _transform(self, x: Tensor, encoded: Tensor | None, index: Tensor | None, density: bool):
        if self.context_layer is not None and encoded is None:
            raise ValueError("This coupling is conditional: pass context=(N, context_features).")
        # One split, not two slices: its backward is one cat instead of two zero-filled copies.
        first, second = x.split(self._split_sizes, dim=1)
        x_t, x_c = (first, second) if self.transform_first else (second, first)
        # What the stock AffineCoupling(scale_map="exp") computes from the interleaved param map
        # (self.coupling.forward / .inverse), without interleaving and re-slicing the parameters.
        shift, log_scale = self.coupling.param_map.shift_and_log_scale(x_c, encoded, index)
        if density:
            y_t, log_det = torch.addcmul(shift, x_t, torch.exp(log_scale)), log_scale.sum(1)
        else:
            y_t, log_det = (x_t - shift) * torch.exp(-log_scale), -log_scale.sum(1)
        parts = (y_t, x_c) if self.transform_first else (x_c, y_t)
        return torch.cat(parts, dim=1), log_det

    def inverse(self, z: Tensor, context: Tensor | None = None, *, encoded: Tensor | None = None,
                context_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction x -> z; returns ``(z, log|det dz/dx|)``."""
        if encoded is None:
            encoded = self.encode_context(context)
        return self._transform(z, encoded, context_index, density=True)

    def forward(self, z: Tensor, context: Tensor | None = None, *, encoded: Tensor | None = None,
                context_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sampling direction z -> x; returns ``(x, log|det dx/dz|)``."""
        if encoded is None:
            encoded = self.encode_context(context)
        return self._transform(z, encoded, context_index, density=False)


class ProxyConditionedFlow(nf.ConditionalNormalizingFlow):
    """Conditional normalizing flow p(x | context) for NIR, on normflows' conditional flow.

    In the density direction each of ``num_blocks`` blocks applies a fixed random ``Permute``
    then a GLOW coupling (two ``ContextAffineCoupling`` halves), as in the reference NIR code
    (FrEIA ``PermuteRandom`` + ``GLOWCouplingBlock``); the context (the L2-normalized class proxy,
    optionally through a small MLP) is fed to every coupling. The base distribution is a fixed
    standard normal (normflows ``DiagGaussian``). With ``coupling="spline"`` the halves are
    normflows' ``CoupledRationalQuadraticSpline`` instead.

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
        coupling: ``"affine"`` (reference) or ``"spline"`` (normflows' rational-quadratic spline).
        context_mlp_width: If set, a 2-layer MLP (context -> width -> context) conditions the
            flow instead of the raw proxy, like the reference's ``dense_embed`` option.
        identity_init: Start every affine coupling as the identity.
        seed: Seed of a local generator for the fixed permutations: they depend on ``seed`` only.
            The subnets' weights come from the global RNG, like any torch layer's.
        spline_bins: Bins of the spline coupling.
        spline_tail_bound: Spline interval [-B, B]; identity outside (embeddings are unit norm).

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
    ) -> None:
        if coupling not in ("affine", "spline"):
            raise ValueError(f"coupling must be 'affine' or 'spline', got {coupling!r}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        context_features = features if context_features is None else context_features
        generator = torch.Generator().manual_seed(seed)
        density_order: list[nn.Module] = []
        for _ in range(num_blocks):
            permute = nf.flows.Permute(features, mode="shuffle")
            perm = torch.randperm(features, generator=generator)
            permute.perm.copy_(perm)
            permute.inv_perm.copy_(torch.argsort(perm))
            density_order.append(permute)
            for transform_first in (True, False):
                if coupling == "affine":
                    density_order.append(ContextAffineCoupling(
                        features, context_features, hidden_features, num_layers, clamp,
                        transform_first=transform_first, identity_init=identity_init))
                else:
                    density_order.append(nf.flows.CoupledRationalQuadraticSpline(
                        features, num_blocks=max(1, (num_layers - 2) // 2),
                        num_hidden_channels=hidden_features, num_context_channels=context_features,
                        num_bins=spline_bins, tail_bound=spline_tail_bound,
                        reverse_mask=not transform_first))
        q0 = nf.distributions.DiagGaussian(features, trainable=False)
        # normflows stores layers in sampling order (z -> x); density is the reverse.
        super().__init__(q0, list(reversed(density_order)))
        self.features = features
        self.context_features = context_features
        self.coupling_type = coupling
        self.context_net = (
            nn.Identity() if context_mlp_width is None else nn.Sequential(
                nn.Linear(context_features, context_mlp_width), nn.ReLU(),
                nn.Linear(context_mlp_width, context_features))
        )

    # -- context --------------------------------------------------------------------------
    def encode_context(self, context: Tensor) -> list[Tensor | None]:
        """Per-layer encodings of R distinct contexts, computed once and reusable.

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
        c = self.context_net(context)
        out: list[Tensor | None] = []
        for layer in self.flows:
            if isinstance(layer, ContextAffineCoupling):
                out.append(layer.encode_context(c))
            elif isinstance(layer, nf.flows.CoupledRationalQuadraticSpline):
                out.append(c)
            else:
                out.append(None)
        return out

    def _run(self, x: Tensor, context: Tensor | None, encoded: Sequence[Tensor | None] | None,
             context_index: Tensor | None, density: bool) -> tuple[Tensor, Tensor]:
        if encoded is None:
            if context is None:
                raise ValueError("ProxyConditionedFlow is conditional: pass context=(N, context_features).")
            encoded = self.encode_context(context)
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        log_det = x.new_zeros(x.shape[0])
        order = range(len(self.flows) - 1, -1, -1) if density else range(len(self.flows))
        for i in order:
            layer, enc = self.flows[i], encoded[i]
            if isinstance(layer, ContextAffineCoupling):
                step = layer.inverse if density else layer.forward
                x, ld = step(x, encoded=enc, context_index=context_index)
            elif isinstance(layer, nf.flows.Permute):
                # Volume preserving: its log-det is exactly 0.
                x = x.index_select(1, layer.inv_perm if density else layer.perm)
                continue
            else:
                assert enc is not None  # encode_context gives every spline layer its context
                ctx = _gather_rows(enc, context_index).to(dtype)
                x, ld = (layer.inverse if density else layer.forward)(x, context=ctx)
            log_det = log_det + ld.to(dtype)
        return x, log_det

    # -- normflows API --------------------------------------------------------------------
    def inverse_and_log_det(self, x: Tensor, context: Tensor | None = None, *,
                            encoded: Sequence[Tensor | None] | None = None,
                            context_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps embeddings x (N, D) to latents z; returns ``(z, log|det dz/dx|)``."""
        return self._run(x, context, encoded, context_index, density=True)

    def forward_and_log_det(self, z: Tensor, context: Tensor | None = None, *,
                            encoded: Sequence[Tensor | None] | None = None,
                            context_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
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

    def sample(self, num_samples: int = 1, context: Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
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


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per row, with the -(D/2) log(2 pi) constant.

    Example:
        >>> standard_normal_log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
