"""The held-out-class experiment of `make demo` and the quality benchmark: models and one run.

One run trains an embedding model with ProxyAnchor, or with ProxyAnchor + NIR, on the training
classes of a real data set (``real_datasets``) and measures retrieval on the held-out classes
with PML's ``AccuracyCalculator`` (cosine kNN, ``k="max_bin_count"``) after the last epoch.

Runs of one seed are paired: the model, the proxies and the batches come from the same seeds in
both arms (the flow is built after the proxies), so per-seed differences measure the loss alone.
``examples/demo.py`` runs the two arms at nir-loss's defaults; ``benchmarks/quality.py`` runs many
arms and seeds and summarizes them with ``paired_differences``. ``recommend_weight`` turns paired
results at several NIR weights into one recommendation; ``recommend_with_lr_control`` also weighs
a control, the baseline at a lower learning rate (the CUB trainer's ``--check-nir`` and the
benchmarks share both).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import real_datasets
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import nn

import nir_loss

__all__ = [
    "COLLAPSE",
    "MIN_GAIN",
    "SETUPS",
    "MLP",
    "CNN1d",
    "run",
    "paired_differences",
    "sign_flip_p",
    "recommend_weight",
    "recommend_with_lr_control",
]

COLLAPSE = 0.1  # a drop against the paired baseline seed that counts as a collapse
# The median paired MAP@R gain a weight needs before ``recommend_weight`` picks it. A meaningless
# change (the proxies' initialization jittered by 1e-2, same seeds) measured a median of +0.003
# with every seed "better"; a check runs few seeds and picks the best of several weights, so a
# pick must clear that noise floor with room to spare.
MIN_GAIN = 0.005


class MLP(nn.Module):
    """ReLU hidden layers (default two of 256), unit-norm embeddings."""

    def __init__(self, d_in: int, dim: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(d_in, width), nn.ReLU()]
            d_in = width
        self.net = nn.Sequential(*layers, nn.Linear(d_in, dim))

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


class CNN1d(nn.Module):
    """Four strided convolutions, mean and max pooling over time, unit-norm embeddings."""

    def __init__(self, dim: int):
        super().__init__()
        chans, layers = [1, 32, 64, 128, 128], []
        for i, k in enumerate([7, 5, 5, 3]):
            layers += [
                nn.Conv1d(chans[i], chans[i + 1], k, stride=2, padding=k // 2),
                nn.BatchNorm1d(chans[i + 1]),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], dim)

    def forward(self, x):
        h = self.features(x[:, None])
        h = torch.cat([h.mean(-1), h.amax(-1)], dim=1)
        return F.normalize(self.head(h), dim=1)


# Per data set: model factory (input width, D), batch size, epochs, train-time crop of a series.
SETUPS: dict[str, dict[str, Any]] = {
    "digits": dict(model=lambda d_in, dim: MLP(d_in, dim), batch=90, epochs=20, crop=None),
    "pigcvp": dict(model=lambda d_in, dim: CNN1d(dim), batch=32, epochs=60, crop=400),
    "leaves": dict(model=lambda d_in, dim: MLP(d_in, dim), batch=64, epochs=20, crop=None),
    "vowels": dict(model=lambda d_in, dim: MLP(d_in, dim), batch=32, epochs=25, crop=None),
}


# Data sets that other modules add (``register``): name -> loader of (x_train, y_train, x_test, y_test).
_LOADERS: dict[str, Callable[[], tuple]] = {}


def register(name: str, loader: Callable[[], tuple], **setup: Any) -> None:
    """Adds a data set to ``run``: its loader and its ``SETUPS`` entry (model, batch, epochs, crop)."""
    _LOADERS[name] = loader
    SETUPS[name] = {"crop": None, **setup}


@functools.cache
def _data(dataset: str):
    return _LOADERS[dataset]() if dataset in _LOADERS else real_datasets.load(dataset)


def _evaluate(model: nn.Module, x, y, calc: AccuracyCalculator) -> tuple[float, float]:
    """(R@1, MAP@R) of the held-out classes; draws no random numbers."""
    model.eval()
    with torch.no_grad():
        emb = model(x)
    model.train()
    acc = calc.get_accuracy(emb, y)
    return acc["precision_at_1"], acc["mean_average_precision_at_r"]


def _identification(model: nn.Module, loss_fn: nn.Module, x, y) -> dict[str, float]:
    """How often a sample's class is its nearest proxy, and (NIR) its class of highest density."""
    model.eval()
    loss_fn.eval()  # no training noise
    with torch.no_grad():
        emb = model(x)
        proxies = F.normalize(loss_fn.proxies, dim=1)
        out = {"id_proxy": float((emb @ proxies.t()).argmax(1).eq(y).float().mean())}
        if isinstance(loss_fn, nir_loss.ProxyAnchorNIRLoss):
            out["id_density"] = float(loss_fn.log_likelihood_matrix(emb).argmax(1).eq(y).float().mean())
    model.train()
    loss_fn.train()
    return out


def run(
    dataset: str,
    seed: int,
    dim: int,
    nir: dict[str, Any] | None = None,
    *,
    flow_lr_mult: float = nir_loss.DEFAULT_FLOW_LR_MULT,
    lr: float = 1e-3,
    epochs: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    proxy_jitter: float = 0.0,
    conditioning_holdout: float = 0.0,
    adam_moments: str | None = None,
) -> dict:
    """Trains one arm of one seed and measures held-out retrieval after the last epoch.

    Args:
        dataset: A name of ``real_datasets.LOADERS``.
        seed: Seeds the model and proxies (``torch.manual_seed``) and the batches.
        dim: Embedding width D.
        nir: ``None`` for ``ProxyAnchorLoss``; else keyword arguments of
            ``ProxyAnchorNIRLoss`` (``{}`` for its defaults).
        flow_lr_mult: The flow's learning-rate multiplier (NIR arm only).
        lr: Adam's learning rate of the model; proxies at nir-loss's default multiplier.
        epochs: Default: the data set's (``SETUPS``).
        on_epoch: Called after each epoch with ``{"epoch", "r1", "mapr", "nll_mean",
            "nll_max"}`` (held-out metrics of that epoch); evaluating draws no random numbers,
            so the run's result does not depend on it.
        proxy_jitter: Std of Gaussian noise added to the proxies' initialization (from a
            generator of its own): a null arm, whose paired differences measure the noise floor.
        conditioning_holdout: Hold out this fraction of the training classes' samples and
            report how often their class is the nearest proxy (``id_proxy``) and the class of
            highest density, argmax_c log p(x | proxy_c) (``id_density``, NIR arms).
        adam_moments: A diagnostic of how the NIR term acts through Adam (NIR arms). The model's
            and the proxies' Adam steps are split between ProxyAnchor's gradient and the whole
            loss's: ``"pa_scale"`` takes the step's scale (Adam's second moment) from
            ProxyAnchor's gradient alone and its direction (first moment) from the whole loss,
            so the term's gradient enters the steps unscaled by its own size; ``"pa_direction"``
            the reverse, so NIR changes only the step sizes. ``"both"`` feeds the whole loss to both
            moments: plain Adam, computed the same way (a check of the split). The flow trains
            with plain Adam in every case.

    Returns:
        ``r1`` and ``mapr`` (NaN if the loss became non-finite), ``nll_mean_max`` (per epoch:
        the mean of the batches' mean NLL and the max of their max), ``weight`` (the NIR weight
        used), ``seconds``, ``nonfinite`` and the arguments.
    """
    cfg = SETUPS[dataset]
    xtr, ytr, xte, yte = _data(dataset)
    num_classes = int(ytr.max()) + 1
    if conditioning_holdout:
        held = torch.rand(len(ytr), generator=torch.Generator().manual_seed(3000 + seed)) < conditioning_holdout
        xval, yval, xtr, ytr = xtr[held], ytr[held], xtr[~held], ytr[~held]
    torch.manual_seed(seed)
    model = cfg["model"](xtr.shape[1], dim)
    # The proxies are drawn right after the model in both arms; the flow comes after them.
    if nir is None:
        loss_fn = ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32)
        proxy_lr = lr * nir_loss.DEFAULT_PROXY_LR_MULT
        groups = [{"params": list(loss_fn.parameters()), "lr": proxy_lr}]
    else:
        loss_fn = nir_loss.ProxyAnchorNIRLoss(num_classes, dim, margin=0.1, alpha=32, **nir)
        groups = loss_fn.param_groups(lr, flow_lr_mult=flow_lr_mult)
    if proxy_jitter:
        jitter_gen = torch.Generator().manual_seed(2000 + seed)
        with torch.no_grad():
            loss_fn.proxies.add_(proxy_jitter * torch.randn(loss_fn.proxies.shape, generator=jitter_gen))
    opt = torch.optim.Adam([{"params": list(model.parameters()), "lr": lr}, *groups])
    split = None
    if adam_moments is not None:
        if nir is None or adam_moments not in _ADAM_MOMENTS:
            raise ValueError(f"adam_moments takes {sorted(_ADAM_MOMENTS)} with a NIR arm, got {adam_moments!r}")
        # param_groups names the flow's group: it keeps plain Adam, the model and proxies split.
        split = _SplitAdam([g for g in opt.param_groups if g.get("name") != "flow"], adam_moments)
        opt = torch.optim.Adam([g for g in opt.param_groups if g.get("name") == "flow"])
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    # Batches and crops come from their own generator: every arm of a seed sees the same ones.
    gen = torch.Generator().manual_seed(1000 + seed)
    epochs = cfg["epochs"] if epochs is None else epochs
    t0, nonfinite, nll = time.perf_counter(), False, []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(ytr), generator=gen)
        means, maxes = [], []
        for idx in perm.split(cfg["batch"]):
            if len(idx) < 2:
                continue
            xb = xtr[idx]
            if cfg["crop"] is not None:
                start = int(torch.randint(0, xb.shape[1] - cfg["crop"] + 1, (1,), generator=gen))
                xb = xb[:, start : start + cfg["crop"]]
            emb = model(xb)
            loss = loss_fn(emb, ytr[idx])
            if not torch.isfinite(loss):
                nonfinite = True
                break
            if nir is not None:
                means.append(loss_fn.nir_nll_mean)
                maxes.append(loss_fn.nir_nll_max)
            opt.zero_grad(set_to_none=True)
            alone = None if split is None else split.gradients(_proxy_loss_only(loss_fn, emb, ytr[idx]))
            loss.backward()
            opt.step()
            if split is not None:
                split.step(alone)
        if nonfinite:
            break
        if means:  # one host read per epoch
            nll.append((float(torch.stack(means).mean()), float(torch.stack(maxes).max())))
        if on_epoch is not None:
            r1, mapr = _evaluate(model, xte, yte, calc)
            mean, peak = nll[-1] if means else (None, None)
            on_epoch({"epoch": epoch, "r1": r1, "mapr": mapr, "nll_mean": mean, "nll_max": peak})
    r1, mapr = (math.nan, math.nan) if nonfinite else _evaluate(model, xte, yte, calc)
    ids = _identification(model, loss_fn, xval, yval) if conditioning_holdout and not nonfinite else {}
    return {
        **ids,
        "dataset": dataset,
        "seed": seed,
        "dim": dim,
        "lr": lr,
        "epochs": epochs,
        "weight": None if nir is None else loss_fn.nir_weight,
        "r1": r1,
        "mapr": mapr,
        "nll_mean_max": nll,
        "seconds": time.perf_counter() - t0,
        "nonfinite": nonfinite,
    }


_ADAM_MOMENTS = ("both", "pa_scale", "pa_direction")


def _proxy_loss_only(loss_fn: nn.Module, emb, labels):
    """ProxyAnchor's part of a ProxyAnchorNIRLoss (its NIR weight set to 0 for one call)."""
    weight, loss_fn.nir_weight = loss_fn.nir_weight, 0.0
    try:
        return loss_fn(emb, labels)
    finally:
        loss_fn.nir_weight = weight


class _SplitAdam:
    """Adam (torch's defaults) whose two moments may see different gradients (``run``'s ``adam_moments``)."""

    def __init__(self, groups: list[dict], mode: str, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups, self.mode, self.betas, self.eps, self.t = groups, mode, betas, eps, 0
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for g in groups for p in g["params"]}

    def gradients(self, proxy_loss) -> list:
        """ProxyAnchor's gradient of the parameters, keeping the graph for the whole loss's backward."""
        params = [p for g in self.groups for p in g["params"]]
        return list(torch.autograd.grad(proxy_loss, params, retain_graph=True, allow_unused=True))

    @torch.no_grad()
    def step(self, alone: list) -> None:
        """One step from the whole loss's gradient (``.grad``, then cleared) and ProxyAnchor's."""
        self.t += 1
        (b1, b2), i = self.betas, 0
        for group in self.groups:
            for p in group["params"]:
                g_all = torch.zeros_like(p) if p.grad is None else p.grad
                g_pa = torch.zeros_like(p) if alone[i] is None else alone[i]
                g_m = g_pa if self.mode == "pa_direction" else g_all
                g_v = g_pa if self.mode == "pa_scale" else g_all
                m, v = self.state[id(p)]
                m.lerp_(g_m, 1 - b1)  # as torch.optim.Adam updates it
                v.mul_(b2).addcmul_(g_v, g_v, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**self.t))
                p.grad = None
                i += 1


_EXACT_SIGN_FLIPS = 16  # up to this many seeds the test enumerates every sign pattern (2^16)


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired sign-flip (permutation) test that the mean difference is 0.

    Under "the arm makes no difference" each seed's difference is as likely to have either sign,
    so the p-value is the share of sign patterns whose mean is at least as far from 0 as the
    observed one. Exact (every pattern) up to 16 seeds; beyond, 2^16 patterns drawn from a fixed
    seed, so the answer is reproducible. It assumes nothing about the differences' distribution;
    with n seeds it cannot go below 2 / 2^n (0.25 for 3 seeds, 0.0625 for 5).

    Example:
        >>> sign_flip_p([0.01, 0.02, 0.03, 0.04, 0.05])
        0.0625
        >>> sign_flip_p([0.01, -0.01])
        1.0
    """
    d = torch.tensor([float(x) for x in diffs], dtype=torch.float64)
    n = len(d)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one difference.")
    if n <= _EXACT_SIGN_FLIPS:
        bits = torch.arange(2**n)[:, None].bitwise_right_shift(torch.arange(n)).bitwise_and(1)
    else:
        bits = torch.randint(0, 2, (2**_EXACT_SIGN_FLIPS, n), generator=torch.Generator().manual_seed(0))
    sums = ((1 - 2 * bits).to(d.dtype) @ d).abs()
    observed = float(d.sum().abs())
    extreme = int((sums >= observed * (1 - 1e-9) - 1e-15).sum())
    return extreme / len(sums) if n <= _EXACT_SIGN_FLIPS else (extreme + 1) / (len(sums) + 1)


def paired_differences(diffs: list[float]) -> dict[str, Any]:
    """Median, mean, wins, losses, worst, collapses and p of per-seed differences (NIR - baseline).

    A NaN difference (a run that became non-finite) counts as -1, a loss of everything; a
    collapse is a difference below ``-COLLAPSE``; ``p`` is ``sign_flip_p`` of the differences:
    a difference counts as beyond the noise of the seeds where p < 0.05.
    """
    diffs = [-1.0 if math.isnan(d) else d for d in diffs]
    worst = min(range(len(diffs)), key=diffs.__getitem__)
    return {
        "median": statistics.median(diffs),
        "mean": statistics.fmean(diffs),
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "worst": diffs[worst],
        "worst_index": worst,
        "collapses": sum(d < -COLLAPSE for d in diffs),
        "p": sign_flip_p(diffs),
    }


def recommend_weight(
    baseline: Sequence[float],
    arms: Mapping[float, Sequence[float]],
    *,
    min_gain: float = MIN_GAIN,
    baseline_name: str = "ProxyAnchor",
    metric: str = "MAP@R",
) -> dict[str, Any]:
    """The NIR weight to use, from paired per-seed results of the baseline and of NIR arms.

    A weight is eligible when its paired differences (arm minus baseline, seed by seed) have a
    median above ``min_gain``, a positive mean, more wins than losses and no collapse (see
    ``paired_differences``: a non-finite run counts as a collapse). Of the eligible weights the
    one with the highest median wins (ties: the higher mean, then the smaller weight). With none
    eligible the answer is 0.0: leave NIR off.

    The rule is conservative on purpose. A check runs few seeds (3 by default) and several
    weights, so one weight can look better by chance alone; the ``min_gain`` margin (``MIN_GAIN``
    = 0.005 MAP@R, above the +0.003 a meaningless change of the proxies' initialization gave)
    and the demand that the mean, the majority of seeds and the worst seed agree make such a
    false pick less likely. Wrongly leaving NIR off costs a possible small gain; wrongly turning
    it on costs accuracy on the user's data.

    Args:
        baseline: The baseline's metric per seed.
        arms: ``{nir_weight: metric per seed}``, seeds in the baseline's order; weights > 0.
        min_gain: The median gain a weight needs (in the metric's units).
        baseline_name: How the reason names the baseline.
        metric: How the reason names the metric.

    Returns:
        ``{"weight": float, "reason": str, "table": {weight: paired_differences(...)}}``;
        ``weight`` 0.0 means "leave NIR off here"; ``reason`` is one sentence for the user.

    Raises:
        ValueError: No seeds, an arm with another number of seeds than the baseline, or a
            weight that is not a positive number.

    Example:
        >>> recommend_weight([0.50, 0.52, 0.51], {0.01: [0.52, 0.53, 0.53]})["weight"]
        0.01
        >>> recommend_weight([0.50, 0.52, 0.51], {0.01: [0.49, 0.53, 0.50]})["weight"]
        0.0
    """
    if not baseline:
        raise ValueError("recommend_weight needs the baseline's result of at least one seed")
    for weight, values in arms.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"NIR weights must be positive numbers, got {weight!r}")
        if len(values) != len(baseline):
            raise ValueError(
                f"weight {weight:g} has results of {len(values)} seeds, the baseline of {len(baseline)}: "
                "pass both in the same seed order"
            )
    table = {w: paired_differences([a - b for a, b in zip(values, baseline)]) for w, values in arms.items()}
    n = len(baseline)

    def eligible(p: dict[str, Any]) -> bool:
        return p["median"] > min_gain and p["mean"] > 0 and p["wins"] > p["losses"] and p["collapses"] == 0

    def rank(w: float) -> tuple[float, float, float]:
        return (table[w]["median"], table[w]["mean"], -w)

    def result(w: float) -> str:
        return _result(f"weight {w:.4g}", table[w], n, metric)

    picks = [w for w in table if eligible(table[w])]
    if picks:
        best = max(picks, key=rank)
        reason = f"NIR beat {baseline_name} on the validation classes at {result(best)}: use nir_weight={best:.4g}."
        return {"weight": float(best), "reason": reason, "table": table}
    if not table:
        reason = f"no NIR weight was tried, so there is no evidence that NIR beats {baseline_name}: leave NIR off."
        return {"weight": 0.0, "reason": reason, "table": table}
    best = max(table, key=rank)
    reason = (
        f"NIR did not beat {baseline_name} on the validation classes at any weight tried (best: {result(best)}; "
        f"a pick needs a median above {min_gain:+.4f}, a positive mean, more wins than losses and no collapse): "
        "leave NIR off here."
    )
    return {"weight": 0.0, "reason": reason, "table": table}


def _result(name: str, p: Mapping[str, Any], n: int, metric: str) -> str:
    return (
        f"{name}: median {metric} {p['median']:+.4f}, mean {p['mean']:+.4f}, "
        f"better in {p['wins']} of {n} seeds, {p['collapses']} collapses"
    )


def recommend_with_lr_control(
    baseline: Sequence[float],
    arms: Mapping[float, Sequence[float]],
    control: Sequence[float] | None,
    factor: float | None = None,
    *,
    min_gain: float = MIN_GAIN,
    baseline_name: str = "ProxyAnchor",
    metric: str = "MAP@R",
) -> dict[str, Any]:
    """``recommend_weight``, checked against a control: the baseline alone at a lower learning rate.

    On the benchmarks the baseline alone at a lower learning rate gained as much as NIR or more
    wherever NIR gained (in the pretrained regime NIR's gain came from how its large early
    gradient changes Adam's step sizes). So a NIR gain counts only when it beats the baseline
    run at ``factor`` times the learning rate (same seeds, paired the same way):

    - ``recommend_weight`` picks a weight and the control's median gain is below that
      weight's: the pick stands (``lr_factor`` 1.0).
    - It picks a weight and the control's median gain is at least as high: leave NIR off
      (weight 0.0) and lower the learning rate (``lr_factor`` = ``factor``) when the control
      itself is eligible by ``recommend_weight``'s rule, else keep it (1.0).
    - It picks no weight: leave NIR off, and lower the learning rate when the control is
      eligible by that rule.

    Args:
        baseline: The baseline's metric per seed.
        arms: ``{nir_weight: metric per seed}``, seeds in the baseline's order; weights > 0.
        control: The baseline's metric per seed at ``factor`` times the learning rate, in the
            same seed order; ``None``: no control was run (``recommend_weight``'s answer).
        factor: The control's learning-rate factor, in (0, 1); needed with a control only.
        min_gain: The median gain a weight, or the control, needs (in the metric's units).
        baseline_name: How the reason names the baseline.
        metric: How the reason names the metric.

    Returns:
        ``recommend_weight``'s ``{"weight", "reason", "table"}`` (``reason`` rewritten as
        above) with ``"lr_factor"``: the factor to apply to the learning rate (1.0: keep it),
        and ``"control"``: the control's ``paired_differences`` (control minus baseline), or
        ``None`` without a control.

    Raises:
        ValueError: As ``recommend_weight``; a control with another number of seeds than the
            baseline, or a factor outside (0, 1).

    Example:
        >>> advice = recommend_with_lr_control(
        ...     [0.50, 0.52, 0.51], {0.01: [0.52, 0.53, 0.53]}, [0.53, 0.54, 0.54], 0.5
        ... )
        >>> advice["weight"], advice["lr_factor"]
        (0.0, 0.5)
    """
    pick = recommend_weight(baseline, arms, min_gain=min_gain, baseline_name=baseline_name, metric=metric)
    if control is None:
        return {**pick, "lr_factor": 1.0, "control": None}
    if not (isinstance(factor, (int, float)) and 0 < factor < 1):
        raise ValueError(f"the learning-rate control's factor must be in (0, 1), got {factor!r}")
    if len(control) != len(baseline):
        raise ValueError(
            f"the learning-rate control has results of {len(control)} seeds, the baseline of {len(baseline)}: "
            "pass both in the same seed order"
        )
    # The control as a single arm of recommend_weight: the same eligibility rule as a NIR weight.
    control_pick = recommend_weight(baseline, {factor: control}, min_gain=min_gain)
    paired = control_pick["table"][factor]
    lower = control_pick["weight"] > 0
    name = f"{baseline_name} at {factor:g}x the learning rate"
    w = pick["weight"]
    if w > 0 and paired["median"] < pick["table"][w]["median"]:
        reason = (
            f"{pick['reason'].removesuffix(f': use nir_weight={w:.4g}.')}, more than {name} gained "
            f"(median {metric} {paired['median']:+.4f}): use nir_weight={w:.4g}."
        )
        return {**pick, "reason": reason, "lr_factor": 1.0, "control": paired}
    if w > 0:
        matched = (
            f"{name} gained as much ({paired['median']:+.4f} median {metric}) as NIR at weight {w:.4g} "
            f"({pick['table'][w]['median']:+.4f})"
        )
        if lower:
            reason = f"{matched}: lower the learning rate rather than add NIR."
        else:
            reason = (
                f"{matched}, but not reliably ({_result(name, paired, len(baseline), metric)}; it needs what a "
                "weight needs): leave NIR off and the learning rate as it is."
            )
    elif lower:
        reason = (
            f"{pick['reason'].removesuffix('.')}; a lower learning rate helped "
            f"({_result(name, paired, len(baseline), metric)}): lower it to {factor:g}x."
        )
    else:
        reason = pick["reason"]
    return {**pick, "weight": 0.0, "reason": reason, "lr_factor": factor if lower else 1.0, "control": paired}
