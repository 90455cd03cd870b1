"""One benchmark case: the losses, the FrEIA reference flow and the inputs of one (B, D, C, device)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ProxyAnchorLoss
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nir_loss import ProxyAnchorNIRLoss  # noqa: E402

__all__ = ["SPEED_LOSS", "Case", "build_case", "zero_grads"]

# speed.py's ProxyAnchorNIRLoss: a fixed weight (the FrEIA arm adds its NLL with the same one) and
# no value checks, so that every arm times the same arithmetic. gpu.py keeps the defaults instead.
SPEED_LOSS: dict[str, Any] = {"margin": 0.1, "alpha": 32, "nir_weight": 0.01, "validate": False}
FREIA_WEIGHT = 0.01

PerSample = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def zero_grads(*items: nn.Module | torch.Tensor) -> None:
    """Gradients set to None, as ``zero_grad()`` leaves them."""
    for m in items:
        for p in [m] if isinstance(m, torch.Tensor) else m.parameters():
            p.grad = None


@dataclass
class Case:
    """What every section of ``speed.py`` and ``gpu.py`` measures at one shape.

    ``x0`` is a raw embedding leaf (a step normalizes it, as a model's head output would be);
    ``emb`` is the same embeddings normalized, as a leaf (for steps that time the term alone).
    """

    B: int
    D: int
    C: int
    nir: ProxyAnchorNIRLoss
    x0: torch.Tensor
    emb: torch.Tensor
    labels: torch.Tensor
    pa: ProxyAnchorLoss | None = None  # PML's ProxyAnchorLoss alone
    pa_freia: ProxyAnchorLoss | None = None  # the proxies of the FrEIA arm's ProxyAnchor
    freia: nn.Module | None = None  # the FrEIA flow of the same shape
    extra: list[nn.Module] = field(default_factory=list)  # copies whose gradients a step clears too

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.pa, self.nir, self.pa_freia, self.freia, *self.extra) if m is not None]

    def zero_grad(self) -> None:
        zero_grads(*self.modules(), self.x0, self.emb)

    def freia_nll(self, emb: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample NLL under the FrEIA flow, conditioned like the NIR term."""
        from benchmarks.freia_ref import freia_log_likelihood

        assert self.freia is not None, "build_case(..., freia=None) builds no FrEIA flow"
        return -freia_log_likelihood(self.freia, emb, proxies, labels)

    def freia_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ProxyAnchor plus the FrEIA flow's NLL, in the order ProxyAnchorNIRLoss runs them."""
        assert self.pa_freia is not None
        proxy_loss = self.pa_freia(emb, labels)
        return proxy_loss + FREIA_WEIGHT * self.freia_nll(emb, self.pa_freia.proxies, labels).mean()

    def term_variants(self, compiled: bool) -> dict[str, PerSample]:
        """Per-sample NLLs ``(emb, proxies, labels) -> (B,)``: the NIR term and the FrEIA flow, eager
        and, if asked, compiled (dynamic=False: one static-shape graph per (B, D), as a training loop
        with a fixed batch size gets; automatic dynamic shapes would switch on after the second shape)."""
        out: dict[str, PerSample] = {"nir": self.nir.nir.per_sample_loss, "freia": self.freia_nll}
        if compiled:
            out["nir_compiled"] = torch.compile(self.nir.nir.per_sample_loss, dynamic=False)
            out["freia_compiled"] = torch.compile(self.freia_nll, dynamic=False)
        return out

    def loss_step(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        """One forward+backward of a whole loss of the normalized ``x0``."""

        def f() -> None:
            self.zero_grad()
            loss_fn(F.normalize(self.x0, dim=1), self.labels).backward()

        return f

    def term_step(
        self, per_sample: PerSample, proxies: torch.Tensor | None = None, normalize: bool = True
    ) -> Callable[[], None]:
        """One forward+backward of the mean of a per-sample NLL: of the normalized ``x0`` (the
        normalization timed too) or, with ``normalize=False``, of the leaf ``emb``."""
        proxies = self.nir.proxies if proxies is None else proxies

        def f() -> None:
            self.zero_grad()
            emb = F.normalize(self.x0, dim=1) if normalize else self.emb
            per_sample(emb, proxies, self.labels).mean().backward()

        return f


def build_case(
    B: int,
    D: int,
    C: int,
    device: torch.device | str,
    *,
    loss_options: dict[str, Any] | None = None,
    flow_options: dict[str, Any] | None = None,
    freia_options: dict[str, Any] | None = None,
    proxy_anchor: bool = True,
    freia: bool = True,
    seed: int = 0,
) -> Case:
    """The case of one shape: ``ProxyAnchorNIRLoss`` (``loss_options``, default its own defaults;
    the flow randomly initialized, not the identity, so that no arm skips work), the inputs, and
    optionally PML's ProxyAnchorLoss alone, and the FrEIA flow with its own ProxyAnchor.

    Every random draw follows ``seed`` in a fixed order, so each arm sees the same inputs.
    """
    torch.manual_seed(seed)
    nir = ProxyAnchorNIRLoss(
        C, D, **(loss_options or {}), flow_options={"identity_init": False, **(flow_options or {})}
    ).to(device)
    x0 = torch.randn(B, D, device=device, requires_grad=True)
    emb = F.normalize(x0.detach(), dim=1).requires_grad_()
    labels = torch.randint(0, C, (B,), device=device)
    case = Case(B, D, C, nir, x0, emb, labels)
    if proxy_anchor:
        case.pa = ProxyAnchorLoss(C, D, margin=0.1, alpha=32).to(device)
    if freia:
        from benchmarks.freia_ref import build_freia_flow

        case.pa_freia = ProxyAnchorLoss(C, D, margin=0.1, alpha=32).to(device)
        case.freia = build_freia_flow(D, **(freia_options or {})).to(device)
    return case
