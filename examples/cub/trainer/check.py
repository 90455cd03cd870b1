"""``--check-nir``: does NIR help on this data? Paired runs on a validation split of the training classes.

The training classes are split in half by class id (the first half trains, the second half
validates, as the DML split does with all classes), so the check never sees the test classes.
For each seed the plain loss and the loss + NIR at every weight start from the same model,
proxies, batches and augmentations; MAP@R and R@1 on the validation classes after the last
epoch are compared seed by seed (``held_out.paired_differences``) and ``held_out.recommend_weight``
picks a weight, or 0 (leave NIR off). A control arm, the plain loss at a lower learning rate
(``--check-lr-control``), runs with the same seeds: on the benchmarks a lower learning rate gained
as much as NIR or more wherever NIR gained, so a NIR gain counts only when it beats the
control's (``held_out.recommend_with_lr_control``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import nir_loss

from .data import ImageDataset
from .engine import DistInfo, TrainConfig, check_batch_settings, fit, seed_everything
from .errors import ConfigError
from .losses import build_loss
from .models import build_embedder

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # examples/: the shared paired statistics
import held_out  # noqa: E402

__all__ = [
    "OwnRandomness",
    "control_label",
    "lr_factor",
    "parse_check_weights",
    "positive_int",
    "run_check",
    "validation_split",
]

NAMES = {
    "proxyanchor": "ProxyAnchor",
    "proxynca": "ProxyNCA",
    "softtriple": "SoftTriple",
    "normsoftmax": "NormSoftmax",
    "arcface": "ArcFace",
}
RESULT_FILE = "check_nir.json"


def parse_check_weights(spec: str) -> list[tuple[str, float, bool]]:
    """``"0.5x,1x,0.02"`` -> ``[(label, value, relative)]``; ``relative``: value times the default weight.

    Raises:
        argparse.ArgumentTypeError: Not a comma-separated list of positive numbers or ``Nx``.
    """
    parsed: list[tuple[str, float, bool]] = []
    for item in spec.split(","):
        label = item.strip()
        relative = label.endswith("x")
        try:
            value = float(label[:-1] if relative else label)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(
                f"{label!r} is not a weight: give positive numbers or Nx (N times the default weight), "
                "comma-separated, e.g. --check-nir 0.5x,1x,2x"
            )
        if label in [p[0] for p in parsed]:
            raise argparse.ArgumentTypeError(f"weight {label} is given twice in {spec!r}: give each weight once")
        parsed.append((label, value, relative))
    return parsed


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def lr_factor(text: str) -> float:
    """The learning-rate factor of ``--check-lr-control`` (argparse type): a number in (0, 1), or 0 (off).

    Raises:
        argparse.ArgumentTypeError: Not a number in [0, 1).
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a learning-rate factor: give a number between 0 and 1, e.g. "
            "--check-lr-control 0.5 (the control runs at 0.5x --lr), or --check-lr-control 0 to run no control"
        )
    return value


def control_label(base: str, factor: float) -> str:
    """The learning-rate control's name: the plain loss at ``factor`` times the learning rate."""
    return f"{base} lr x{factor:g}"


def validation_split(items: list, labels: np.ndarray) -> tuple[list, np.ndarray, list, np.ndarray]:
    """The training classes split in half by class id: (train items, labels 0..k-1, validation items, labels).

    Raises:
        ConfigError: Fewer than 4 training classes (each half needs 2).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 4:
        raise ConfigError(
            f"--check-nir splits the training classes in half (one half trains, the other validates), "
            f"which needs at least 4 training classes; the data has {len(classes)}: use a data set with "
            "more classes, or a --split that puts more of them in training"
        )
    fit_classes = classes[: len(classes) // 2]
    is_fit = np.isin(labels, fit_classes)
    remap = {int(c): i for i, c in enumerate(fit_classes)}
    return (
        [items[i] for i in np.flatnonzero(is_fit)],
        np.array([remap[int(c)] for c in labels[is_fit]], dtype=np.int64),
        [items[i] for i in np.flatnonzero(~is_fit)],
        labels[~is_fit].astype(np.int64),
    )


class OwnRandomness:
    """Gives a loss's random draws (NIR's training noise) a seeded stream of their own.

    Torch's global RNG also drives the image augmentations (and dropout or drop-connect in some
    trunks): a loss that drew from it would give the arms of one seed different crops from the
    second step on. With this, the global RNG runs the same sequence in every arm of a seed, so
    the arms differ by their loss alone. Registered as forward hooks on the loss.
    """

    def __init__(self, loss_fn: torch.nn.Module, seed: int, device: torch.device) -> None:
        self.seed, self.calls = seed, 0
        self.devices = [device] if device.type == "cuda" else []
        self.fork: Any = None
        loss_fn.register_forward_pre_hook(self._enter)
        loss_fn.register_forward_hook(self._exit)

    def _enter(self, module: torch.nn.Module, inputs: Any) -> None:
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()
        self.calls += 1
        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.calls]).generate_state(1)[0]))

    def _exit(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.fork.__exit__(None, None, None)  # the global RNG as it was before the call


def _name(args: argparse.Namespace) -> str:
    return NAMES.get(args.loss, args.loss)


def run_check(
    args: argparse.Namespace,
    cfg: TrainConfig,
    train_set: ImageDataset,
    dist: DistInfo,
    log: Callable[..., None] = print,
) -> dict:
    """Runs the check of ``args.check_nir`` / ``args.check_seeds``; prints and writes the paired table.

    ``cfg`` holds the run's settings (epochs, batch, learning rates, ...); each run of the check
    uses them with its own seed and output folder (``<out>/seed<S>/<arm>``: metrics, no checkpoints),
    evaluating once, after the last epoch. With ``args.check_lr_control`` (a factor in (0, 1); 0:
    none) the plain loss also runs at that factor times ``cfg.lr`` (``<out>/seed<S>/lr-x<F>``; the
    proxies' and the flow's learning rates are multiples of it). Writes ``<out>/check_nir.json``.

    Returns:
        The record written (empty on ranks other than 0 under torchrun).

    Raises:
        ConfigError: ``--resume`` given, too few training classes, or a batch the half cannot fill.
    """
    if cfg.resume:
        raise ConfigError("--check-nir trains new runs from scratch and cannot --resume one: drop --resume")
    fit_items, fit_labels, val_items, val_labels = validation_split(train_set.paths, np.asarray(train_set.labels))
    num_classes = int(fit_labels.max()) + 1
    val_classes = len(np.unique(val_labels))
    try:
        check_batch_settings(cfg.batch_size, cfg.m, fit_labels)
    except ConfigError as e:
        raise ConfigError(
            f"--check-nir trains on the first {num_classes} of the {num_classes + val_classes} training "
            f"classes (the other half validates): {e}"
        ) from None
    fit_set = ImageDataset(fit_items, fit_labels, train_set.transform)
    val_set = ImageDataset(val_items, val_labels, train_set.eval_transform or train_set.transform)
    default = nir_loss.default_nir_weight(args.dim, args.nir_objective)
    weights = {label: value * default if relative else value for label, value, relative in args.check_nir}
    if len(set(weights.values())) < len(weights):
        raise ConfigError(f"--check-nir {','.join(weights)} names one weight twice (1x = {default:.4g}): drop one")
    base = _name(args)
    factor = args.check_lr_control
    seeds = list(range(args.seed, args.seed + args.check_seeds))
    flow_options = dict(num_blocks=args.flow_blocks, hidden_features=args.flow_hidden, num_layers=args.flow_layers)
    out = Path(cfg.out_dir)
    log(
        f"--check-nir: {base} vs {base}+NIR ({args.nir_objective}) at "
        + ", ".join(f"{label} = {w:.4g}" for label, w in weights.items())
        + (f"; control: {base} at {factor:g}x --lr" if factor else "")
        + f"; {len(seeds)} paired seeds; trains on {num_classes} classes ({len(fit_items)} images), "
        f"validates on {val_classes} ({len(val_items)} images)"
    )
    # (arm, NIR weight or None, learning-rate factor, run folder)
    arms = [(base, None, 1.0, "baseline"), *((label, w, 1.0, f"nir-{label}") for label, w in weights.items())]
    if factor:
        arms.append((control_label(base, factor), None, factor, f"lr-x{factor:g}"))
    runs: dict[str, list[dict]] = {arm[0]: [] for arm in arms}
    for seed in seeds:
        for arm, weight, lr_mult, folder in arms:
            seed_everything(seed)  # model, then proxies, then flow: the same draws in every arm
            model = build_embedder(args.arch, args.dim, args.weights, args.max_pool)
            loss_fn = build_loss(
                args.loss,
                num_classes,
                args.dim,
                weight is not None,
                weight,
                args.nir_objective,
                args.margin,
                args.alpha,
                flow_options,
            )
            run_dir = out / f"seed{seed}" / folder
            run_cfg = replace(
                cfg,
                out_dir=str(run_dir),
                lr=cfg.lr * lr_mult,  # proxies and flow: multiples of lr (proxy_lr_mult, flow_lr_mult)
                seed=seed,
                eval_every=cfg.epochs,
                plots=False,
                checkpoints=False,
                run_name=f"check seed {seed} {arm if weight is None else f'{base}+NIR {arm}'}",
            )
            OwnRandomness(loss_fn, seed, dist.device)
            try:
                final = fit(run_cfg, model, loss_fn, fit_set, fit_labels, val_set, dist, log)["final"]
                mapr, r1 = final.get("mean_average_precision_at_r", math.nan), final.get("recall_at_1", math.nan)
            except FloatingPointError as e:  # a diverged run is a result (a collapse), not the end of the check
                log(f"[{run_cfg.run_name}] {e}: counted as a collapse")
                mapr = r1 = math.nan
            runs[arm].append({"seed": seed, "mapr": mapr, "r1": r1})
    if not dist.is_main:
        return {}
    record = summarize(args, runs, weights, base, num_classes, val_classes)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log(format_check(record))
    log(f"written: {out / RESULT_FILE}")
    return record


def summarize(
    args: argparse.Namespace,
    runs: dict[str, list[dict]],
    weights: dict[str, float],
    base: str,
    fit_classes: int,
    val_classes: int,
) -> dict:
    """The check's record: settings, per-seed results, paired statistics and the recommendation.

    ``runs`` holds the control arm (``control_label``) when ``args.check_lr_control`` is not 0.
    """
    factor = args.check_lr_control
    control = control_label(base, factor) if factor else None

    def diffs(arm: str, metric: str) -> list[float]:
        return [r[metric] - b[metric] for r, b in zip(runs[arm], runs[base])]

    pick = held_out.recommend_with_lr_control(
        [r["mapr"] for r in runs[base]],
        {weights[label]: [r["mapr"] for r in runs[label]] for label in weights},
        [r["mapr"] for r in runs[control]] if control else None,
        factor,
        baseline_name=base,
    )
    paired = {
        "mapr": {label: pick["table"][w] for label, w in weights.items()},
        "r1": {label: held_out.paired_differences(diffs(label, "r1")) for label in weights},
    }
    lr_control = None
    if control:
        lr_control = {
            "factor": factor,
            "label": control,
            "lr": args.lr * factor,
            "paired": {"mapr": pick["control"], "r1": held_out.paired_differences(diffs(control, "r1"))},
        }
    label = next((k for k, w in weights.items() if w == pick["weight"]), None)
    return {
        "data": str(args.data),
        "loss": args.loss,
        "objective": args.nir_objective,
        "arch": args.arch,
        "dim": args.dim,
        "epochs": args.epochs,
        "lr": args.lr,
        "seeds": [r["seed"] for r in runs[base]],
        "classes": {"train": fit_classes, "validation": val_classes},
        "baseline": base,
        "weights": weights,
        "runs": {arm: [{k: (None if _nan(v) else v) for k, v in r.items()} for r in rs] for arm, rs in runs.items()},
        "paired": paired,
        "lr_control": lr_control,
        "recommendation": {
            "weight": pick["weight"],
            "label": label,
            "lr_factor": pick["lr_factor"],
            "reason": pick["reason"],
        },
    }


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def format_check(record: dict) -> str:
    """The printed report: per-seed MAP@R, the paired table per weight and of the learning-rate
    control (MAP@R and R@1), the advice."""
    base, weights, control = record["baseline"], record["weights"], record["lr_control"]
    arms, headers = [base, *weights], [base, *weights]
    rows = [(f"{label} ({w:.3g})", label) for label, w in weights.items()]
    if control:
        short = f"lr x{control['factor']:g}"
        arms.append(control["label"])
        headers.append(short)
        rows.append((f"{short}, no NIR", None))
    width = max(9, *(len(a) for a in headers))
    lines = [f"MAP@R on the {record['classes']['validation']} validation classes, per seed:"]
    lines.append("  seed " + "".join(f"{a:>{width + 1}}" for a in headers))
    for i, seed in enumerate(record["seeds"]):
        values = [record["runs"][a][i]["mapr"] for a in arms]
        shown = ["nan" if v is None else f"{v:.4f}" for v in values]
        lines.append(f"  {seed:>4} " + "".join(f"{v:>{width + 1}}" for v in shown))
    for metric, title in (("mapr", "MAP@R"), ("r1", "R@1")):
        lines.append(f"{title}, NIR minus {base}, paired by seed:")
        lines.append(f"  {'weight':<16}{'median':>8}{'mean':>9}{'wins/losses':>13}{'worst':>9}{'collapses':>11}")
        for arm, label in rows:
            p = record["paired"][metric][label] if label is not None else control["paired"][metric]
            score = f"{p['wins']}/{p['losses']}"
            lines.append(
                f"  {arm:<16}{p['median']:>+8.4f}{p['mean']:>+9.4f}{score:>13}{p['worst']:>+9.4f}{p['collapses']:>11}"
            )
    if control:
        legend = (
            f"{rows[-1][0]}: the learning-rate control, {base} without NIR at {control['factor']:g}x --lr "
            f"({control['lr']:.4g}), minus {base}."
        )
        lines.append(textwrap.fill(legend, 78, subsequent_indent="  "))
    advice = record["recommendation"]
    lines.append(textwrap.fill(advice["reason"], 78, initial_indent="recommendation: ", subsequent_indent="  "))
    weight, factor = advice["weight"], advice["lr_factor"]
    if weight:
        lines.append(f"this trainer: --nir on --nir-weight {weight:.4g}")
    elif factor != 1.0:
        lines.append(f"this trainer: --nir off --lr {record['lr'] * factor:.4g}")
    else:
        lines.append("this trainer: --nir off")
    return "\n".join(lines)
