# ruff: noqa: E501  (wide tables)
"""The paper's regime end to end: the example trainer fine-tunes a whole pretrained network.

Each image set of ``image_sets`` is written once as a class-folder tree (RGB over white, classes
numbered in the set's order) and trained with ``examples/cub/train.py``: EfficientNet-Lite0 with
ImageNet weights, a one-epoch warm-up with the trunk frozen, then the whole network at the
trainer's learning rates (backbone 1e-4, proxies x100, flow x1), batch 64 of 2 images per class,
small images to fit a CPU. Arms of a seed share the model's and the proxies' initialization and
the batch order (the trainer seeds them alike), so differences are paired. Metrics of the last
epoch on the held-out classes.

    python benchmarks/finetune.py                                    # 2 sets x 3 seeds x (pa, nir)
    python benchmarks/finetune.py --sets wesnoth --seeds 1 --epochs 2  # a smoke run

Arms: ``pa`` (the trainer's ``--nir off``) or ``nir[:FLAG=VALUE...]`` with trainer flags, e.g.
``nir:nir-weight=0.03``. Results go to ``benchmarks/results/<version>/finetune.json`` and are
summarized like ``quality.py``'s (paired differences against ``pa``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import image_sets
import quality
import torch

import nir_loss

ROOT = Path(__file__).resolve().parents[1]


def class_tree(name: str) -> tuple[Path, int]:
    """The set as ``<tree>/<index>_<class>/<n>.png`` (RGB over white); returns (tree, training classes)."""
    from PIL import Image

    paths, names, num_train = image_sets.image_list(name)
    index = {c: i for i, c in enumerate(sorted(set(names)))}
    tree = image_sets.data_root() / "trees" / name
    done = tree / ".complete"
    if not done.is_file():
        for i, (path, cls) in enumerate(zip(paths, names)):
            folder = tree / f"{index[cls]:04d}_{cls.replace('/', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                Image.alpha_composite(white, rgba).convert("RGB").save(folder / f"{i:05d}.png")
        done.touch()
    return tree, num_train


def run_one(name: str, arm: str, seed: int, args) -> dict:
    tree, num_train = class_tree(name)
    out = ROOT / "runs" / "finetune" / name / arm.replace(":", "_") / str(seed)
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "cub" / "train.py"),
        "--data", str(tree), "--split", f"classes:{num_train}",
        "--arch", "efficientnet_lite0", "--image-size", str(args.image_size), "--dim", str(args.dim),
        "--batch-size", "64", "--samples-per-class", "2", "--epochs", str(args.epochs),
        "--warmup-epochs", "1", "--lr", str(args.lr), "--seed", str(seed),
        "--eval-every", str(args.epochs), "--workers", "0", "--threads", "1",
        "--no-image-check", "--no-progress", "--no-plots", "--out", str(out),
    ]  # fmt: skip
    if arm == "pa":
        cmd += ["--nir", "off"]
    else:
        for opt in arm.split(":")[1:]:
            flag, value = opt.split("=")
            cmd += [f"--{flag}", value]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "dataset": name,
        "arm": arm,
        "seed": seed,
        "dim": args.dim,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "weight": last.get("nir_weight"),
        "r1": last["precision_at_1"],
        "mapr": last["mean_average_precision_at_r"],
        "nll_mean_max": [],
        "seconds": time.perf_counter() - t0,
        "nonfinite": False,
        "command": cmd[1:],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="wesnoth,emoji")
    p.add_argument("--arms", default="pa,nir")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", default=None, help="these seeds instead, e.g. 2 or 0,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --out and run only the (set, arm, seed) runs it lacks",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<version>/finetune.json)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else quality.RESULTS / nir_loss.__version__ / "finetune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seed_list.split(",")] if a.seed_list else range(a.seeds)
    jobs = [(s, arm, seed) for seed in seeds for s in a.sets.split(",") for arm in a.arms.split(",")]
    meta = {
        "script": "finetune.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "version": nir_loss.__version__,
        "torch": torch.__version__,
        "jobs": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    runs, history = quality.previous_runs(out) if a.resume else ([], [])
    done = {(r["dataset"], r["arm"], r["seed"]) for r in runs}
    jobs = [j for j in jobs if j not in done]
    if history:
        meta["history"] = history
    t0 = time.perf_counter()
    for job in jobs:
        r = run_one(*job, a)
        runs.append(r)
        meta["total_seconds"] = time.perf_counter() - t0
        print(
            f"  {r['dataset']} seed {r['seed']} {r['arm']:24} R@1 {r['r1']:.4f} MAP@R {r['mapr']:.4f}  {r['seconds']:.0f}s",
            flush=True,
        )
        out.write_text(json.dumps({"meta": meta, "summary": quality.summarize(runs), "runs": runs}, indent=1))
    quality.print_table(quality.summarize(runs))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
