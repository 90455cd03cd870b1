"""Speed and memory of ProxyAnchor + NIR, side by side with plain ProxyAnchor and a FrEIA flow.

    python benchmarks/speed.py            # every section, CPU: about 10 minutes on 2 cores
    python benchmarks/speed.py --quick    # a smaller grid and fewer repeats (about 5 minutes)

Sections (everything in benchmarks/results/<version>/speed[_quick].json, rewritten after each
section; the tables, rendered by benchmarks/report.py, on stdout at the end):
1. loss forward+backward time and peak memory: PML ProxyAnchorLoss alone, nir_loss
   ProxyAnchorNIRLoss, and ProxyAnchorLoss + the same flow written in FrEIA (benchmarks/freia_ref.py),
   at B in {90, 180}, D in {128, 512}, C in {100, 11318}; ratios to PA alone and NIR/FrEIA.
2. ``log_likelihood_matrix`` throughput (sample x class rows per second) vs chunk size.
3. roofline: the flow's achieved FLOP/s (matrix pass, no grad; labelled pass, fwd+bwd) vs this
   machine's measured dense matmul FLOP/s.
4. a full training step of a ResNet50 (torchvision, random init, small images) with ProxyAnchor
   vs ProxyAnchor + NIR: NIR's share of the step.
5. ``torch.compile`` (inductor) vs eager, on any device: the NIR term and the FrEIA flow, each
   eager and compiled, fwd+bwd at B in {90, 180}, D in {128, 512}, C=100; ratios to FrEIA eager;
   and the same GEMMs run alone (the floor that no fusion of the other ops can go below).
6. torch.profiler top ops of the NIR term vs the FrEIA flow (B=90, D=128), eager and (with
   section 5 selected) compiled.
7. kernels per forward+backward at B=90, D=128, C=100 (``--sections kernels``; about 2 minutes on
   2 CPU cores, most of it four cold compiles; ``--no-compile`` for the eager counts in seconds):
   the NIR term (fused, and nir-loss 0.2.0's layer-by-layer path), the FrEIA flow and PML's
   ProxyAnchorLoss; eager (ops dispatched below autograd, about one GPU kernel each; also under
   bf16 autocast) and compiled (``compile_nir()`` / ``torch.compile``: inductor's kernels, GEMMs
   and other ops, from the profiler).

On a CUDA GPU, ``benchmarks/gpu.py`` (``bash benchmarks/gpu_run.sh``) measures what only a GPU
shows: CUDA-graph and compiled times, CUDA kernels, host syncs and a bf16 ResNet50 step.

On CPU, times are the CPU time of the calling thread (``time.thread_time``) with exactly one
intra-op thread (``--threads``, default 1): on a shared machine that is far less noisy than wall
time, which is recorded too. Arms are interleaved within each repeat; medians are reported.
Memory on CPU is the bytes of the tensors autograd saves for backward (the activation memory);
on CUDA the peak above the level at the start of the call (``torch.cuda.max_memory_allocated``).

Layout: ``speed_measure.py`` measures (one function per section, plain records),
``cases.py`` builds the losses and inputs of one shape (shared with ``gpu.py``), ``report.py``
renders the records, and this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nir_loss  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import speed_measure as measure  # noqa: E402
from benchmarks.speed_measure import Grid, Timer  # noqa: E402

__all__ = ["FULL", "QUICK", "SECTIONS", "main", "run"]

RESULTS = Path(__file__).resolve().parent / "results"

FULL = Grid()
QUICK = replace(
    FULL,
    reps=5,
    step_reps=3,
    step_batch=32,
    image_size=32,
    matrix_rows=[500, 1000, 2000, 4000],
    compiled_grid=[(128, 90)],
)

# Section name -> (its key in the results, its measurement). In this order: 5 before 6, so that
# section 5's compile times are cold (6 compiles the B=90 graph again).
Measure = Callable[[Grid, torch.device, Timer, dict, argparse.Namespace], Any]
SECTIONS: dict[str, tuple[str, Measure]] = {
    "loss": ("loss", lambda g, dev, t, out, a: measure.loss(g, dev, t)),
    "matrix": ("matrix", lambda g, dev, t, out, a: measure.matrix(g, dev, t)),
    "roofline": (
        "roofline",
        lambda g, dev, t, out, a: measure.roofline(g, dev, t, out.get("matrix", []), out.get("loss", [])),
    ),
    "resnet": ("resnet_step", lambda g, dev, t, out, a: measure.resnet(g, dev, t)),
    "compiled": ("compiled", lambda g, dev, t, out, a: measure.compiled(g, dev, t)),
    "profile": ("profile", lambda g, dev, t, out, a: measure.profile(dev, "compiled" in a.sections.split(","))),
    "kernels": (
        "kernels",
        lambda g, dev, t, out, a: measure.kernels(dev, with_compiled=not a.no_compile, cache_root=a.cache_root),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the default")
    p.add_argument("--no-compile", action="store_true", help="section 7: eager counts only")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--step-reps",
        dest="step_reps_arg",
        type=int,
        default=None,
        help="repeats of the ResNet50 step (default 5, quick 3)",
    )
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the results, rendered by report.py
    unknown = set(a.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections {a.sections}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return a


def run(a: argparse.Namespace, grid: Grid, path: Path) -> dict:
    """Measures the chosen sections on ``grid``; the results are rewritten to ``path`` after each one."""
    device = torch.device(a.device)
    timer = Timer(device)
    out: dict[str, Any] = {
        "meta": {
            "argv": a.argv,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cuda_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "time_base": "CUDA events" if device.type == "cuda" else "thread CPU time (time.thread_time)",
            "inductor_cache": "fresh" if a.cache_root else os.environ["TORCHINDUCTOR_CACHE_DIR"],
        }
    }
    print(
        f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cpus; times: {out['meta']['time_base']}, medians of {grid.reps} interleaved repeats",
        flush=True,
    )
    t0 = time.perf_counter()
    out["meta"]["total_seconds"] = 0.0
    chosen = a.sections.split(",")
    for number, (name, (key, fn)) in enumerate(SECTIONS.items(), 1):
        if name in chosen:
            w = time.perf_counter()
            out[key] = fn(grid, device, timer, out, a)
            out["meta"]["total_seconds"] = time.perf_counter() - t0
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))
            print(f"section {number} ({name}): {time.perf_counter() - w:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    grid = QUICK if a.quick else FULL
    if a.step_reps_arg is not None:
        grid = replace(grid, step_reps=a.step_reps_arg)
    torch.set_num_threads(a.threads)
    # Compile times as a new machine sees them: a fresh inductor cache unless one is given.
    a.cache_root = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        a.cache_root = tempfile.mkdtemp(prefix="nir_speed_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=a.cache_root)
    path = Path(a.out) if a.out else RESULTS / nir_loss.__version__ / ("speed_quick.json" if a.quick else "speed.json")
    try:
        out = run(a, grid, path)
    finally:
        if a.cache_root:
            shutil.rmtree(a.cache_root, ignore_errors=True)
    print("\n" + report.speed_tables(out) + report.kernels(out) + report.profile(out), end="")
    print(f"\nwrote {path}; total {out['meta']['total_seconds']:.0f}s")
    return out


if __name__ == "__main__":
    main()
