"""Proxy-conditioned normalizing flow built from normflows parts."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import normflows as nf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContextAffineCoupling", "ProxyConditionedFlow", "soft_clamp", "standard_normal_log_prob"]

# FrEIA's "ATAN" clamp activation, as the reference run used it (0.636 ~ 2/pi).
_ATAN_SCALE = 0.636
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
# The fused backward's weight gradients: batched GEMMs after the loop (fewest kernels) on
# accelerators; on CPU per-layer GEMMs inside the loop ran faster (operands still in cache).
# True makes CPU take the accelerator's path (tests, kernel counts).
_BATCHED_WEIGHT_GRADS_ON_CPU = False


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


def soft_clamp(s: Tensor, clamp: float) -> Tensor:
    """Soft-clamps log-scales to about (-clamp, clamp), as FrEIA's GLOW coupling does.

    Example:
        >>> soft_clamp(torch.tensor([0.0, 1e6]), 2.0)
        tensor([0.0000, 1.9981])
    """
    return clamp * _ATAN_SCALE * torch.atan(s)


# The key under which a pickled nir-loss module records the release that saved it.
_RELEASE_KEY = "_nir_loss_release"


class _SameReleasePickles:
    """Whole-module pickles (``torch.save(loss_fn)``, ``pickle``) load only in the release that saved them.

    Pickling records the release; unpickling another release's module (or one saved before
    releases were recorded) raises a RuntimeError saying to rebuild the loss and load its state
    dict, which loads in any release. ``copy.deepcopy`` works as before.
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
        self,
        in_features: int,
        out_features: int,
        hidden: int,
        num_layers: int,
        clamp: float,
        identity_init: bool,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}.")
        self.input_layer = nn.Linear(in_features, hidden)
        # normflows MLP puts an activation between its layers but not before the first one,
        # so the first (split) layer is ours and the remaining num_layers - 1 are normflows'.
        self.mlp = nf.nets.MLP([hidden] * (num_layers - 1) + [2 * out_features], init_zeros=identity_init)
        self.clamp = clamp

    def shift_and_log_scale(
        self, x_cond: Tensor, encoded: Tensor | None, index: Tensor | None
    ) -> tuple[Tensor, Tensor]:
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

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Density direction x -> z; returns ``(z, log|det dz/dx|)``."""
        if encoded is None:
            encoded = self.encode_context(context)
        return self._transform(z, encoded, context_index, density=True)

    def forward(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sampling direction z -> x; returns ``(x, log|det dx/dz|)``."""
        if encoded is None:
            encoded = self.encode_context(context)
        return self._transform(z, encoded, context_index, density=False)


class _AffinePlan(NamedTuple):
    """The modules of an all-affine ProxyConditionedFlow in density order, for the fused path."""

    key: tuple[int, ...]  # ids of flow.flows' layers when the plan was made
    permutes: tuple[nf.flows.Permute, ...]  # one per block
    couplings: tuple[ContextAffineCoupling, ...]  # two per block: transform_first True, then False
    hidden: tuple[tuple[nn.Linear, ...], ...]  # per coupling: the hidden -> hidden layers
    last: tuple[nn.Linear, ...]  # per coupling: the layer giving [shift | raw log-scale]
    spec: tuple[int, int, int, int, tuple[float, ...]]  # blocks, split, hidden width, hidden layers, scales


def _affine_plan(flows: Sequence[nn.Module]) -> _AffinePlan | None:
    """The fused path's plan, or None if the layers are not [Permute, coupling, coupling] x blocks."""
    density = list(reversed(flows))
    if not density or len(density) % 3:
        return None
    permutes, couplings, hidden, last, scales = [], [], [], [], []
    width = num_hidden = -1
    for j in range(0, len(density), 3):
        permute, *pair = density[j : j + 3]
        if not isinstance(permute, nf.flows.Permute):
            return None
        permutes.append(permute)
        for layer, first in zip(pair, (True, False)):
            if not (
                isinstance(layer, ContextAffineCoupling)
                and layer.transform_first is first
                and layer.context_layer is not None
            ):
                return None
            pm = layer.coupling.param_map
            net = list(pm.mlp.net)
            linears = net[0::2]
            if not (
                isinstance(pm, _ConditionedParamMap)
                and pm.input_layer.bias is not None
                and all(isinstance(m, nn.Linear) and m.bias is not None for m in linears)
                and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.0 for m in net[1::2])
                and len(net) == 2 * len(linears) - 1
            ):
                return None
            h = pm.input_layer.out_features
            if (
                width not in (-1, h)
                or num_hidden not in (-1, len(linears) - 1)
                or any((m.in_features, m.out_features) != (h, h) for m in linears[:-1])
                or layer.context_layer.out_features != h
            ):
                return None
            width, num_hidden = h, len(linears) - 1
            couplings.append(layer)
            hidden.append(tuple(linears[:-1]))
            last.append(linears[-1])
            scales.append(pm.clamp * _ATAN_SCALE)
    split = couplings[0]._split_sizes[0]
    spec = (len(permutes), split, width, num_hidden, tuple(scales))
    return _AffinePlan(tuple(map(id, flows)), tuple(permutes), tuple(couplings), tuple(hidden), tuple(last), spec)


class _Slots:
    """Results of the same role that a later op reads as one tensor (``whole()``).

    Eager: views of one tensor allocated up front, each written by its op's ``out=``: no copies.
    Traced by torch.compile: the results themselves, joined when read whole; inductor writes
    each straight into the join with one kernel shared by all (``out=`` into views of a buffer
    would compile one kernel per view: minutes of cold compile, and dynamo rejects strided ``out=``).
    """

    def __init__(self, items: list[Tensor], whole: Tensor | None, join: Callable[[list[Tensor]], Tensor]) -> None:
        self.items, self._whole, self._join = items, whole, join

    @classmethod
    def stacked(cls, like: Tensor, traced: bool, count: int, shape: tuple[int, ...]) -> _Slots:
        """``count`` slots of ``shape``; whole: (count, *shape)."""
        if traced:
            return cls([like] * count, None, torch.stack)
        buf = like.new_empty(count, *shape)
        return cls(list(buf.unbind(0)), buf, torch.stack)

    @classmethod
    def columns(cls, like: Tensor, traced: bool, rows: int, widths: Sequence[int]) -> _Slots:
        """Slots of (rows, width) side by side; whole: (rows, sum(widths))."""
        if traced:
            return cls([like] * len(widths), None, functools.partial(torch.cat, dim=1))
        buf = like.new_empty(rows, sum(widths))
        return cls(list(buf.split(list(widths), dim=1)), buf, functools.partial(torch.cat, dim=1))

    def __getitem__(self, i: int) -> Tensor:
        return self.items[i]

    def write(self, i: int, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """Slot i := fn(*args); returns the slot."""
        if self._whole is None:
            self.items[i] = fn(*args)
            return self.items[i]
        return fn(*args, out=self.items[i])

    def addmm_(self, i: int, a: Tensor, b: Tensor) -> None:
        """Slot i += a @ b."""
        if self._whole is None:
            self.items[i] = torch.addmm(self.items[i], a, b)
        else:
            self.items[i].addmm_(a, b)

    def whole(self) -> Tensor:
        return self._join(self.items) if self._whole is None else self._whole


def _relu_backward(grad: Tensor, relu_out: Tensor, *, out: Tensor | None = None) -> Tensor:
    """The ReLU's input gradient: ``grad`` where ``relu_out > 0``, else 0 (autograd's formula)."""
    if out is None:
        return torch.ops.aten.threshold_backward(grad, relu_out, 0)
    return torch.ops.aten.threshold_backward.grad_input(grad, relu_out, 0, grad_input=out)


def _fused_forward(spec, x: Tensor, enc: Tensor, perms: Sequence[Tensor], params: Sequence[Tensor], keep: bool):
    """Density pass x -> (z, log|det dz/dx|) of all blocks; ``keep``: also what the backward needs.

    ``enc`` (N, K * hidden) holds every coupling's context projection plus its first layer's bias.
    Block j permutes its input into X, transforms X[:, :split] (coupling 2j) and then
    X[:, split:] (coupling 2j + 1), writing both into Y: no concatenation, one gather per block.
    The ReLU outputs of all couplings go into H (layer, coupling, N, hidden), so the backward
    can compute the weight gradients of all hidden layers in one batched GEMM; the soft-clamped
    log-scales go side by side into one (N, blocks * D) tensor whose row sums are the log-dets.
    Views come from ``split``/``unbind`` (one call for many): on a GPU the host-side cost of each
    tensor call is what bounds this pass.
    """
    num_blocks, split, width, num_hidden, scales = spec
    n, d = x.shape
    sizes = (split, d - split)
    stride = 2 * num_hidden + 3  # params per coupling: W0, W_1..W_L, b_1..b_L, W_last, b_last
    traced = torch.compiler.is_compiling()
    num_slots = 2 * num_blocks if keep else 1
    hs = _Slots.stacked(x, traced, (num_hidden + 1) * num_slots, (n, width))  # [layer * slots + slot]
    log_scales = _Slots.columns(x, traced, n, sizes * num_blocks)  # [coupling]
    encs = enc.split(width, dim=1)
    saved: list[Tensor] = []
    y = x
    for j in range(num_blocks):
        big_x = y.index_select(1, perms[2 * j + 1])  # Permute.inverse: x[:, inv_perm]
        x_parts = big_x.split(sizes, dim=1)
        ys = _Slots.columns(x, traced, n, sizes)
        for t in (0, 1):
            k = 2 * j + t
            slot = t * num_blocks + j if keep else 0
            w = params[k * stride : (k + 1) * stride]
            x_c = x_parts[1] if t == 0 else ys[0]
            h = hs.write(slot, torch.addmm, encs[k], x_c, w[0].t()).relu_()
            for layer in range(1, num_hidden + 1):
                h = hs.write(layer * num_slots + slot, torch._addmm_activation, w[num_hidden + layer], h, w[layer].t())
            out = torch.addmm(w[-1], h, w[-2].t())
            shift, raw = out.chunk(2, dim=1)
            e = torch.exp(log_scales.write(k, torch.mul, torch.atan(raw), scales[k]))
            ys.write(t, torch.addcmul, shift, x_parts[t], e)
            if keep:
                saved += (out, e)
        y = ys.whole()
        if keep:
            saved += (big_x, y)
    # Traced, the activations stay separate: the backward's masks then read whole tensors and
    # share one kernel (a stack would give each mask its own offset, and kernel, into it).
    return y, log_scales.whole().sum(1), (hs.items if traced else [hs.whole()]), saved


class _FusedDensity(torch.autograd.Function):
    """The fused density pass with a hand-written backward (see ``_fused_forward``).

    Per coupling the backward runs one GEMM per layer for the input gradient, one mask
    (``threshold_backward``) per ReLU and one GEMM for the first layer's weight gradient. On an
    accelerator the weight and bias gradients of all hidden layers of all couplings come from
    one batched GEMM and one sum, those of the last layers likewise; on CPU each layer's come
    right after its mask. Same function as autograd through the normflows layers (pinned by
    tests in float64); not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, spec, x: Tensor, enc: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        num_perms = 2 * spec[0]
        z, log_det, hs, saved = _fused_forward(spec, x, enc, tensors[:num_perms], tensors[num_perms:], keep=True)
        ctx.spec, ctx.num_h = spec, len(hs)
        ctx.save_for_backward(*hs, *saved, *tensors)
        return z, log_det

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_z: Tensor | None, g_log_det: Tensor | None):
        num_blocks, split, width, num_hidden, scales = spec = ctx.spec
        num_couplings = 2 * num_blocks
        hs, rest = ctx.saved_tensors[: ctx.num_h], ctx.saved_tensors[ctx.num_h :]  # activations [layer * K + slot]
        per_block = rest[: 6 * num_blocks]  # per block: out, e (coupling 2j), out, e (2j + 1), X, Y
        perms, params = rest[6 * num_blocks : 8 * num_blocks], rest[8 * num_blocks :]
        stride = 2 * num_hidden + 3
        n, d = per_block[4].shape
        sizes = (split, d - split)
        like = per_block[4]
        traced = torch.compiler.is_compiling()
        # Weight gradients: on an accelerator one batched GEMM per layer shape after the loop
        # (fewer kernels); on CPU a GEMM per layer inside it, while its operands are in cache.
        batched = like.device.type != "cpu" or _BATCHED_WEIGHT_GRADS_ON_CPU
        if len(hs) == 1:  # eager: one (layers * K, N, hidden) buffer
            h_all: Tensor | None = hs[0]
            hs = hs[0].unbind(0)
        else:
            h_all = None
        g_enc = _Slots.columns(like, traced, n, [width] * num_couplings)  # [coupling]
        g_hidden = _Slots.stacked(like, traced, num_hidden * num_couplings, (n, width))  # [(layer - 1) * K + slot]
        same = sizes[0] == sizes[1]
        g_last = [
            _Slots.stacked(like, traced, num_couplings if same else num_blocks, (n, 2 * m))
            for m in (sizes[:1] if same else sizes)
        ]  # [0][slot], or [t][j]
        g_w: list[list[Tensor]] = [[like] * num_couplings for _ in range(stride)]  # [param][slot]
        inv_scale = {c: like.new_full((), 1 / c) for c in set(scales)}
        g_s_base = None if g_log_det is None else g_log_det[:, None]
        g_y = torch.zeros_like(per_block[-1]) if g_z is None else g_z
        for j in reversed(range(num_blocks)):
            big_x, y = per_block[6 * j + 4], per_block[6 * j + 5]
            x_parts = big_x.split(sizes, dim=1)
            y_first = y.split(sizes, dim=1)[0]
            g_x = _Slots.columns(like, traced, n, sizes)
            g_y_parts = g_y.split(sizes, dim=1)
            g_y_first = g_y_parts[0]
            for t in (1, 0):
                k = 2 * j + t
                slot = t * num_blocks + j
                w = params[k * stride : (k + 1) * stride]
                out, e = per_block[6 * j + 2 * t], per_block[6 * j + 2 * t + 1]
                x_t, x_c = x_parts[t], (x_parts[1] if t == 0 else y_first)
                g_y_t = g_y_parts[1] if t == 1 else g_y_first
                # y_t = x_t * e + shift, e = exp(s), s = scale * atan(raw): [g_shift | g_raw]
                g_xt = g_x.write(t, torch.mul, g_y_t, e)
                g_s = g_xt * x_t if g_s_base is None else torch.addcmul(g_s_base, g_xt, x_t)
                raw = out.chunk(2, dim=1)[1]
                den = torch.addcmul(inv_scale[scales[k]], raw, raw, value=1 / scales[k])  # (1 + raw^2) / scale
                last, i = (g_last[0], slot) if same else (g_last[t], j)
                if traced:
                    g_out = last.write(i, torch.cat, [g_y_t, torch.div(g_s, den)], 1)
                else:
                    g_out = last[i]
                    g_shift, g_raw = g_out.chunk(2, dim=1)
                    g_shift.copy_(g_y_t)
                    torch.div(g_s, den, out=g_raw)
                g_h = torch.mm(g_out, w[-2])
                if not batched:
                    g_w[-2][slot], g_w[-1][slot] = (
                        torch.mm(g_out.t(), hs[num_hidden * num_couplings + slot]),
                        g_out.sum(0),
                    )
                for layer in range(num_hidden, 0, -1):
                    g_pre = g_hidden.write(
                        (layer - 1) * num_couplings + slot, _relu_backward, g_h, hs[layer * num_couplings + slot]
                    )
                    g_h = torch.mm(g_pre, w[layer])
                    if not batched:
                        g_w[layer][slot] = torch.mm(g_pre.t(), hs[(layer - 1) * num_couplings + slot])
                        g_w[num_hidden + layer][slot] = g_pre.sum(0)
                g_pre = g_enc.write(k, _relu_backward, g_h, hs[slot])
                g_w[0][slot] = torch.mm(g_pre.t(), x_c)
                if t == 1:  # x_c = Y[:, :split] also leaves the block: add the gradient from outside
                    g_y_first = torch.addmm(g_y_first, g_pre, w[0])
                else:  # x_c = X[:, split:] is x_t of coupling 2j + 1, whose gradient is there already
                    g_x.addmm_(1, g_pre, w[0])
            g_y = g_x.whole().index_select(1, perms[2 * j])  # Permute.inverse backward: g[:, perm]
        if batched:
            if h_all is None:
                h_all = torch.stack(hs)
            _batched_weight_grads(
                spec, h_all, g_hidden.whole() if num_hidden else None, [g.whole() for g in g_last], g_w
            )
        grads = [g_w[i][(k % 2) * num_blocks + k // 2] for k in range(num_couplings) for i in range(stride)]
        return (None, g_y, g_enc.whole(), *[None] * (2 * num_blocks), *grads)


def _batched_weight_grads(
    spec, h_all: Tensor, g_hidden: Tensor | None, g_last: list[Tensor], g_w: list[list[Tensor]]
) -> None:
    """Fills ``g_w[param][slot]`` (all but the first layers') from batched GEMMs over all couplings.

    ``h_all`` and ``g_hidden`` are (layer * K + slot, N, hidden); ``g_last`` is one (K, N, 2m)
    tensor when both halves of D have width m, else one (blocks, N, 2m_t) per half.
    """
    num_blocks, _, width, num_hidden, _ = spec
    num_couplings = 2 * num_blocks
    h_in = h_all[num_hidden * num_couplings :]  # (K, N, hidden): the last layers' input, slot order
    groups = [(g_last[0], h_in)] if len(g_last) == 1 else list(zip(g_last, h_in.split(num_blocks)))
    g_w[-2], g_w[-1] = [], []
    for g, h in groups:
        g_w[-2] += torch.bmm(g.transpose(1, 2), h).unbind(0)
        g_w[-1] += g.sum(1).unbind(0)
    if g_hidden is not None:
        w = torch.bmm(g_hidden.transpose(1, 2), h_all[: num_hidden * num_couplings]).unbind(0)
        b = g_hidden.sum(1).unbind(0)
        for layer in range(1, num_hidden + 1):
            g_w[layer] = list(w[(layer - 1) * num_couplings : layer * num_couplings])
            g_w[num_hidden + layer] = list(b[(layer - 1) * num_couplings : layer * num_couplings])


class ProxyConditionedFlow(_SameReleasePickles, nf.ConditionalNormalizingFlow):
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
        fused: Run the density direction of an affine flow as one fused pass with a hand-written
            backward (fewer kernels, no double backward); False runs the normflows layers one by
            one under autograd. Both compute the same function; a test pins them equal.

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
                    density_order.append(
                        ContextAffineCoupling(
                            features,
                            context_features,
                            hidden_features,
                            num_layers,
                            clamp,
                            transform_first=transform_first,
                            identity_init=identity_init,
                        )
                    )
                else:
                    density_order.append(
                        nf.flows.CoupledRationalQuadraticSpline(
                            features,
                            num_blocks=max(1, (num_layers - 2) // 2),
                            num_hidden_channels=hidden_features,
                            num_context_channels=context_features,
                            num_bins=spline_bins,
                            tail_bound=spline_tail_bound,
                            reverse_mask=not transform_first,
                        )
                    )
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
        self._plan_cache: _AffinePlan | None = None

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

    def _affine_plan(self, x: Tensor) -> _AffinePlan | None:
        """The fused path's plan if it applies to this flow and input, else None."""
        if (
            not self.fused
            or self.coupling_type != "affine"
            or type(self).encode_context is not ProxyConditionedFlow.encode_context
        ):
            return None  # (a subclass that changes encode_context gets the per-layer path)
        if torch.compiler.is_compiling():  # no cache: setting it would invalidate the compiled graph
            plan = _affine_plan(self.flows)
        else:
            plan = self._plan_cache
            if plan is None or plan.key != tuple(map(id, self.flows)):
                plan = self._plan_cache = _affine_plan(self.flows)
        if plan is None:
            return None
        weight = plan.last[0].weight
        return plan if weight.dtype == x.dtype and weight.device == x.device else None

    def _encode(self, context: Tensor, x: Tensor) -> Tensor | list[Tensor | None]:
        """Encodings of R contexts for ``inverse_and_log_det(x, encoded=..., context_index=...)``.

        For the fused path one (R, couplings x hidden) tensor from one GEMM: every coupling's
        context projection plus its first layer's bias; else ``encode_context``'s list.
        """
        with _autocast_off(x):
            plan = self._affine_plan(x)
            if plan is None:
                return self.encode_context(context)
            weight = torch.cat([c.context_layer.weight for c in plan.couplings])  # type: ignore[union-attr]
            bias = torch.cat([c.coupling.param_map.input_layer.bias for c in plan.couplings])
            return torch.addmm(bias, self.context_net(context).to(weight.dtype), weight.t())

    def _fused_density(
        self, x: Tensor, encoded: Tensor, context_index: Tensor | None, plan: _AffinePlan
    ) -> tuple[Tensor, Tensor]:
        enc = _gather_rows(encoded, context_index)
        perms = [b for p in plan.permutes for b in (p.perm, p.inv_perm)]
        params: list[Tensor] = []
        for c, hidden, last in zip(plan.couplings, plan.hidden, plan.last):
            params.append(c.coupling.param_map.input_layer.weight)
            params.extend(m.weight for m in hidden)
            params.extend(m.bias for m in hidden)
            params.extend((last.weight, last.bias))
        if torch.is_grad_enabled() and (x.requires_grad or enc.requires_grad or any(p.requires_grad for p in params)):
            return _FusedDensity.apply(plan.spec, x, enc, *perms, *params)
        z, log_det, _, _ = _fused_forward(plan.spec, x, enc, perms, params, keep=False)
        return z, log_det

    def _run(
        self,
        x: Tensor,
        context: Tensor | None,
        encoded: Sequence[Tensor | None] | Tensor | None,
        context_index: Tensor | None,
        density: bool,
    ) -> tuple[Tensor, Tensor]:
        with _autocast_off(x):
            return self._run_layers(x, context, encoded, context_index, density)

    def _run_layers(
        self,
        x: Tensor,
        context: Tensor | None,
        encoded: Sequence[Tensor | None] | Tensor | None,
        context_index: Tensor | None,
        density: bool,
    ) -> tuple[Tensor, Tensor]:
        if encoded is None and context is None:
            raise ValueError("ProxyConditionedFlow is conditional: pass context=(N, context_features).")
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        if density and (encoded is None or isinstance(encoded, Tensor)):
            plan = self._affine_plan(x)
            if plan is not None:
                if encoded is None:
                    assert context is not None
                    encoded = self._encode(context, x)
                if isinstance(encoded, Tensor):
                    return self._fused_density(x, encoded, context_index, plan)
        assert not isinstance(encoded, Tensor), "a fused encoding (_encode) needs the fused density path"
        if encoded is None:
            assert context is not None
            encoded = self.encode_context(context)
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
    def inverse_and_log_det(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Sequence[Tensor | None] | Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Maps embeddings x (N, D) to latents z; returns ``(z, log|det dz/dx|)``."""
        return self._run(x, context, encoded, context_index, density=True)

    def forward_and_log_det(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        encoded: Sequence[Tensor | None] | None = None,
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


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per row, with the -(D/2) log(2 pi) constant.

    Example:
        >>> standard_normal_log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
