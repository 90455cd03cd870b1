"""The fused density pass of an all-affine ProxyConditionedFlow: one hand-written forward and backward."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import normflows as nf
import torch
from torch import Tensor, nn

from . import flow as _flow  # the model it runs; only read at call time (flow.py imports this module)

__all__ = ["AffinePlan", "density", "plan"]


class AffinePlan(NamedTuple):
    """The modules of an all-affine ProxyConditionedFlow in density order, for the fused pass."""

    key: tuple[int, ...]  # ids of flow.flows' layers when the plan was made
    permutes: tuple[nf.flows.Permute, ...]  # one per block
    couplings: tuple[Any, ...]  # ContextAffineCoupling, two per block: transform_first True, then False
    hidden: tuple[tuple[nn.Linear, ...], ...]  # per coupling: the hidden -> hidden layers
    last: tuple[nn.Linear, ...]  # per coupling: the layer giving [shift | raw log-scale]
    spec: tuple[int, int, int, int, tuple[float, ...]]  # blocks, split, hidden width, hidden layers, scales


def plan(flows: Sequence[nn.Module]) -> AffinePlan | None:
    """The fused pass's plan, or None if the layers are not [Permute, coupling, coupling] x blocks.

    A coupling qualifies if it is a conditional ``ContextAffineCoupling`` whose subnet is the
    one it builds (linear layers with biases, ReLUs, one hidden width).
    """
    density_order = list(reversed(flows))
    if not density_order or len(density_order) % 3:
        return None
    permutes, couplings, hidden, last, scales = [], [], [], [], []
    width = num_hidden = -1
    for j in range(0, len(density_order), 3):
        permute, *pair = density_order[j : j + 3]
        if not isinstance(permute, nf.flows.Permute):
            return None
        permutes.append(permute)
        for layer, first in zip(pair, (True, False)):
            if not (isinstance(layer, _flow.ContextAffineCoupling) and layer.transform_first is first):
                return None
            pm = layer.param_map
            net = list(pm.mlp.net)
            linears = net[0::2]
            if not (
                pm.context_layer is not None
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
                or pm.context_layer.out_features != h
            ):
                return None
            width, num_hidden = h, len(linears) - 1
            couplings.append(layer)
            hidden.append(tuple(linears[:-1]))
            last.append(linears[-1])
            scales.append(layer.clamp * _flow._ATAN_SCALE)
    split = couplings[0]._split_sizes[0]
    spec = (len(permutes), split, width, num_hidden, tuple(scales))
    return AffinePlan(tuple(map(id, flows)), tuple(permutes), tuple(couplings), tuple(hidden), tuple(last), spec)


def density(plan: AffinePlan, x: Tensor, enc: Tensor, batched_weight_grads: bool) -> tuple[Tensor, Tensor]:
    """``(z, log|det dz/dx|)`` of rows ``x`` (N, D) whose encoded contexts are ``enc`` (N, couplings x hidden).

    ``enc`` is ``ProxyConditionedFlow.encode_context``'s output gathered per row: every
    coupling's context projection plus its first layer's bias, in density order.
    ``batched_weight_grads``: the backward's weight gradients from batched GEMMs after the loop
    (fewest kernels: accelerators), else per layer inside it (operands still in cache: CPU).
    """
    perms = [b for p in plan.permutes for b in (p.perm, p.inv_perm)]
    params: list[Tensor] = []
    for c, hidden, last in zip(plan.couplings, plan.hidden, plan.last):
        params.append(c.param_map.input_layer.weight)
        params.extend(m.weight for m in hidden)
        params.extend(m.bias for m in hidden)
        params.extend((last.weight, last.bias))
    if torch.is_grad_enabled() and (x.requires_grad or enc.requires_grad or any(p.requires_grad for p in params)):
        return _FusedDensity.apply(plan.spec, batched_weight_grads, x, enc, *perms, *params)
    z, log_det, _, _ = _fused_forward(plan.spec, x, enc, perms, params, keep=False)
    return z, log_det


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
    (``threshold_backward``) per ReLU and one GEMM for the first layer's weight gradient. With
    ``batched`` the weight and bias gradients of all hidden layers of all couplings come from
    one batched GEMM and one sum, those of the last layers likewise; else each layer's come
    right after its mask. Same function as autograd through the layer loop (pinned by tests in
    float64); not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, spec, batched: bool, x: Tensor, enc: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        num_perms = 2 * spec[0]
        z, log_det, hs, saved = _fused_forward(spec, x, enc, tensors[:num_perms], tensors[num_perms:], keep=True)
        ctx.spec, ctx.batched, ctx.num_h = spec, batched, len(hs)
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
        batched = ctx.batched  # weight gradients from batched GEMMs after the loop, else per layer in it
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
        return (None, None, g_y, g_enc.whole(), *[None] * (2 * num_blocks), *grads)


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
