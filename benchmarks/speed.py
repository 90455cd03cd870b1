# ruff: noqa: B023, E501  (closures are called within their loop iteration; wide tables)
"""Speed and memory of ProxyAnchor + NIR, side by side with plain ProxyAnchor and a FrEIA flow.

    python benchmarks/speed.py            # every section, CPU: about 10 minutes on 2 cores
    python benchmarks/speed.py --quick    # a smaller grid and fewer repeats (about 5 minutes)

Sections (each a table on stdout; everything also in benchmarks/results/<version>/speed[_quick].json):
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
Peak memory on CPU comes from the torch profiler's allocation events (bytes allocated by torch
above the level at the start of the call); on CUDA from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ProxyAnchorLoss
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nir_loss  # noqa: E402
from benchmarks.freia_ref import build_freia_flow, freia_log_likelihood  # noqa: E402
from nir_loss import ProxyAnchorNIRLoss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- timing helpers -------------------------------------------------------------------------
class Timer:
    """CPU: thread CPU time and wall time. CUDA: CUDA events (and wall)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> tuple[float, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            w = time.perf_counter()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, time.perf_counter() - w
        c, w = time.thread_time(), time.perf_counter()
        fn()
        return time.thread_time() - c, time.perf_counter() - w


def interleaved(fns: dict, reps: int, timer: Timer, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    walls = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t, w = timer(fn)
            times[k].append(t)
            walls[k].append(w)
    return {
        k: {
            "median_s": statistics.median(times[k]),
            "wall_median_s": statistics.median(walls[k]),
            "min_s": min(times[k]),
            "reps": reps,
        }
        for k in fns
    }


def peak_memory(fn, device: torch.device) -> int:
    """CUDA: peak bytes allocated during fn() above the level at its start (max_memory_allocated).

    CPU has no allocator statistics (and the profiler's per-op memory events miss temporaries
    freed inside an op), so on CPU this returns the bytes of the distinct tensors autograd saves
    for backward during fn(): the activation memory, deterministic and the part that grows with
    B, C and the flow. It excludes parameters, gradients and freed temporaries.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# -- models ---------------------------------------------------------------------------------
def flow_flops_per_row(D: int, hidden: int = 128, layers: int = 8, blocks: int = 5, context: bool = True) -> float:
    """Multiply-adds x 2 of one forward pass of the flow for one (sample, context) row.

    ``context=False`` leaves out the context projection (D x hidden per coupling), which the
    B x C matrix computes once per class rather than once per row.
    """
    total = 0
    for n_t in (round(D / 2), D - round(D / 2)):
        n_c = D - n_t
        total += (n_c + (D if context else 0)) * hidden + (layers - 2) * hidden * hidden + hidden * 2 * n_t
    return 2.0 * blocks * total


def make_losses(B: int, D: int, C: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    pa = ProxyAnchorLoss(C, D, margin=0.1, alpha=32).to(device)
    nir = ProxyAnchorNIRLoss(
        C, D, margin=0.1, alpha=32, nir_weight=0.01, validate=False, flow_options={"identity_init": False}
    ).to(device)
    pa_fr = ProxyAnchorLoss(C, D, margin=0.1, alpha=32).to(device)
    inn = build_freia_flow(D).to(device)

    def freia_loss(emb, labels):
        # ProxyAnchor first, then the flow: the order ProxyAnchorNIRLoss runs them in.
        proxy_loss = pa_fr(emb, labels)
        nll = -freia_log_likelihood(inn, emb, pa_fr.proxies, labels)
        return proxy_loss + 0.01 * nll.mean()

    x0 = torch.randn(B, D, device=device, requires_grad=True)
    labels = torch.randint(0, C, (B,), device=device)
    return pa, nir, freia_loss, x0, labels, [pa, nir, pa_fr, inn]


def zero_grads(mods, x0):
    for m in mods:
        for p in m.parameters():
            p.grad = None
    x0.grad = None


def term_variants(nir, inn, compiled: bool) -> dict:
    """Per-sample NLLs ``(emb, proxies, labels) -> (B,)``: the NIR term and the FrEIA flow, eager and,
    if asked, compiled (dynamic=False: one static-shape graph per (B, D), as a training loop with a
    fixed batch size gets; automatic dynamic shapes would switch on after the second shape)."""

    def freia_nll(emb, proxies, labels):
        return -freia_log_likelihood(inn, emb, proxies, labels)

    out = {"nir": nir.nir.per_sample_loss, "freia": freia_nll}
    if compiled:
        out["nir_compiled"] = torch.compile(nir.nir.per_sample_loss, dynamic=False)
        out["freia_compiled"] = torch.compile(freia_nll, dynamic=False)
    return out


def term_step(fn, mods, x0, proxies, labels):
    """One forward+backward of a per-sample NLL, gradients set to None first (as zero_grad() leaves them)."""

    def f():
        zero_grads(mods, x0)
        fn(F.normalize(x0, dim=1), proxies, labels).mean().backward()

    return f


def section_loss(args, device, timer, out):
    print("\n== 1. loss forward+backward: ProxyAnchor (PA) vs PA+NIR (nir_loss) vs PA+FrEIA flow ==")
    print(
        f"{'B':>4} {'D':>4} {'C':>6} | {'PA ms':>8} {'NIR ms':>8} {'FrEIA ms':>8} | {'NIR/PA':>7} {'FrEIA/PA':>8} "
        f"{'NIR/FrEIA':>9} | {'PA MB':>7} {'NIR MB':>7} {'FrEIA MB':>8}  (MB: "
        + ("peak allocated" if device.type == "cuda" else "saved for backward")
        + ")"
    )
    rows = []
    for C in args.classes:
        for D in args.dims:
            for B in args.batches:
                pa, nir, freia_loss, x0, labels, mods = make_losses(B, D, C, device)

                def run(loss_fn):
                    def f():
                        zero_grads(mods, x0)
                        loss_fn(F.normalize(x0, dim=1), labels).backward()

                    return f

                fns = {"pa": run(pa), "nir": run(nir), "freia": run(freia_loss)}
                t = interleaved(fns, args.reps, timer)
                mem = {k: peak_memory(f, device) for k, f in fns.items()}
                r = {
                    "B": B,
                    "D": D,
                    "C": C,
                    **{f"{k}_s": v["median_s"] for k, v in t.items()},
                    **{f"{k}_wall_s": v["wall_median_s"] for k, v in t.items()},
                    **{f"{k}_peak_bytes": v for k, v in mem.items()},
                }
                r["nir_over_pa"] = r["nir_s"] / r["pa_s"]
                r["freia_over_pa"] = r["freia_s"] / r["pa_s"]
                r["nir_over_freia"] = r["nir_s"] / r["freia_s"]
                r["nir_term_over_freia_term"] = (r["nir_s"] - r["pa_s"]) / max(r["freia_s"] - r["pa_s"], 1e-12)
                rows.append(r)
                print(
                    f"{B:>4} {D:>4} {C:>6} | {r['pa_s'] * 1e3:8.2f} {r['nir_s'] * 1e3:8.2f} {r['freia_s'] * 1e3:8.2f} | "
                    f"{r['nir_over_pa']:7.2f} {r['freia_over_pa']:8.2f} {r['nir_over_freia']:9.3f} | "
                    f"{mem['pa'] / 2**20:7.1f} {mem['nir'] / 2**20:7.1f} {mem['freia'] / 2**20:8.1f}",
                    flush=True,
                )
    out["loss"] = rows


def section_matrix(args, device, timer, out):
    print("\n== 2. log_likelihood_matrix throughput (no grad) vs chunk size ==")
    print(f"{'D':>4} {'B':>4} {'C':>5} {'chunk':>6} {'rows/pass':>9} | {'ms':>8} {'rows/s':>10} {'GFLOP/s':>8}")
    rows = []
    B, C = args.matrix_batch, args.matrix_classes
    for D in args.dims:
        torch.manual_seed(0)
        loss_fn = ProxyAnchorNIRLoss(C, D, validate=False, flow_options={"identity_init": False}).to(device)
        x = F.normalize(torch.randn(B, D, device=device), dim=1)
        chunks = sorted({max(1, r // C) for r in args.matrix_rows})
        fns = {}
        for ch in chunks:

            def f(ch=ch):
                with torch.no_grad():
                    loss_fn.log_likelihood_matrix(x, chunk_size=ch)

            fns[ch] = f
        t = interleaved(fns, max(3, args.reps // 2), timer, warmup=1)
        for ch in chunks:
            s = t[ch]["median_s"]
            r = {
                "D": D,
                "B": B,
                "C": C,
                "chunk": ch,
                "rows_per_pass": ch * C,
                "s": s,
                "rows_per_s": B * C / s,
                "flop_per_s": B * C * flow_flops_per_row(D, context=False) / s,
            }
            rows.append(r)
            print(
                f"{D:>4} {B:>4} {C:>5} {ch:>6} {ch * C:>9} | {s * 1e3:8.1f} {r['rows_per_s']:10.0f} {r['flop_per_s'] / 1e9:8.1f}",
                flush=True,
            )
    out["matrix"] = rows


def section_roofline(args, device, timer, out):
    print("\n== 3. roofline: achieved flow FLOP/s vs measured dense matmul FLOP/s ==")
    peaks = {}
    for m, k, n in [(4096, 128, 128), (4096, 512, 128), (90, 128, 128), (4096, 1024, 1024)]:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        t = interleaved({"mm": lambda: a @ b}, max(5, args.reps), timer, warmup=3)["mm"]["median_s"]
        peaks[f"{m}x{k}x{n}"] = 2 * m * k * n / t
        print(f"matmul {m}x{k} @ {k}x{n}: {2 * m * k * n / t / 1e9:8.1f} GFLOP/s")
    peak = max(peaks.values())
    best = {}
    for r in out.get("matrix", []):
        if r["flop_per_s"] > best.get(r["D"], {"flop_per_s": 0})["flop_per_s"]:
            best[r["D"]] = r
    rows = []
    for D, r in best.items():
        frac = r["flop_per_s"] / peak
        rows.append({"pass": "matrix (no grad)", "D": D, "flop_per_s": r["flop_per_s"], "fraction_of_peak": frac})
        print(
            f"B x C matrix, D={D}, chunk {r['chunk']}: {r['flop_per_s'] / 1e9:6.1f} GFLOP/s = {frac:.0%} of peak matmul"
        )
    for r in out.get("loss", []):
        if r["C"] == min(args.classes):
            flops = 3 * r["B"] * flow_flops_per_row(r["D"])  # forward + backward ~ 3x forward
            s = max(r["nir_s"] - r["pa_s"], 1e-12)
            rows.append(
                {
                    "pass": "labelled fwd+bwd",
                    "D": r["D"],
                    "B": r["B"],
                    "flop_per_s": flops / s,
                    "fraction_of_peak": flops / s / peak,
                }
            )
            print(
                f"labelled NIR term fwd+bwd, B={r['B']} D={r['D']}: {flops / s / 1e9:6.1f} GFLOP/s = {flops / s / peak:.0%} of peak"
            )
    out["roofline"] = {"matmul_flop_per_s": peaks, "peak_flop_per_s": peak, "rows": rows}


def section_resnet(args, device, timer, out):
    print(f"\n== 4. ResNet50 training step, B={args.step_batch}, {args.image_size}px, D=128, C=100 ==")
    import torchvision

    rows = []
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, 128)
    model = model.to(device).train()
    C = 100
    pa = ProxyAnchorLoss(C, 128).to(device)
    nir = ProxyAnchorNIRLoss(C, 128, validate=False, flow_options={"identity_init": False}).to(device)
    images = torch.randn(args.step_batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, C, (args.step_batch,), device=device)
    params = list(model.parameters())
    opt_pa = torch.optim.Adam([{"params": params}, {"params": pa.parameters(), "lr": 1e-2}], lr=1e-4)
    opt_nir = torch.optim.Adam([{"params": params}, *nir.param_groups(1e-4)], lr=1e-4)

    def step(loss_fn, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            loss_fn(F.normalize(model(images), dim=1), labels).backward()
            opt.step()

        return f

    emb = F.normalize(torch.randn(args.step_batch, 128, device=device), dim=1).requires_grad_()

    def nir_term_only():
        nir.nir.per_sample_loss(emb, nir.proxies, labels).mean().backward()

    t = interleaved(
        {"pa_step": step(pa, opt_pa), "nir_step": step(nir, opt_nir), "nir_term": nir_term_only},
        args.step_reps,
        timer,
        warmup=1,
    )
    r = {k: v["median_s"] for k, v in t.items()}
    r["nir_share_of_step"] = (r["nir_step"] - r["pa_step"]) / r["nir_step"]
    r["nir_term_share"] = r["nir_term"] / r["nir_step"]
    r.update(batch=args.step_batch, image_size=args.image_size)
    rows.append(r)
    print(
        f"PA step {r['pa_step'] * 1e3:.0f} ms, PA+NIR step {r['nir_step'] * 1e3:.0f} ms, NIR term alone "
        f"{r['nir_term'] * 1e3:.1f} ms: NIR share {r['nir_share_of_step']:.1%} (step difference), "
        f"{r['nir_term_share']:.1%} (term alone / step)"
    )
    out["resnet_step"] = rows


def gemm_floor_fn(B: int, D: int, device: torch.device, hidden: int = 128, layers: int = 8, blocks: int = 5):
    """Only the GEMMs of the NIR term's forward+backward, same shapes, nothing else.

    Per linear layer: the forward product and the two backward ones (input and weight gradient),
    for every layer of every coupling, the context projections included.
    """
    shapes = []
    for _ in range(blocks):
        for n_t in (round(D / 2), D - round(D / 2)):
            shapes += [(D - n_t, hidden), (D, hidden)] + [(hidden, hidden)] * (layers - 2) + [(hidden, 2 * n_t)]
    mats = [
        (torch.randn(o, i, device=device), torch.randn(B, i, device=device), torch.randn(B, o, device=device))
        for i, o in shapes
    ]

    def f():
        for w, x, g in mats:
            torch.mm(x, w.t())
            torch.mm(g, w)
            torch.mm(g.t(), x)

    return f


def section_compiled(args, device, timer, out):
    print("\n== 5. torch.compile (inductor) vs eager: NIR term and FrEIA flow, fwd+bwd, C=100 ==")
    print(
        f"{'B':>4} {'D':>4} | {'NIR':>8} {'NIR cmp':>8} {'FrEIA':>8} {'FrEIA cmp':>9} | "
        f"{'NIR/FrEIA':>9} {'NIRcmp/FrEIA':>12} {'FrEIAcmp/FrEIA':>14} {'NIRcmp/FrEIAcmp':>15} | compile s (NIR, FrEIA)"
    )
    rows = []
    C = 100
    for D, B in args.compiled_grid:
        _, nir, _, x0, labels, mods = make_losses(B, D, C, device)
        inn = build_freia_flow(D).to(device)
        mods = [*mods, inn]
        fns = {k: term_step(v, mods, x0, nir.proxies, labels) for k, v in term_variants(nir, inn, True).items()}
        fns["gemm_floor"] = gemm_floor_fn(B, D, device)
        compile_s = {}
        for k in ("nir_compiled", "freia_compiled"):
            w = time.perf_counter()
            fns[k]()  # compiles (forward and backward graphs)
            compile_s[k] = time.perf_counter() - w
        t = interleaved(fns, args.reps, timer, warmup=3)
        r = {
            "B": B,
            "D": D,
            "C": C,
            **{f"{k}_s": v["median_s"] for k, v in t.items()},
            **{f"{k}_wall_s": v["wall_median_s"] for k, v in t.items()},
            **{f"{k}_compile_s": v for k, v in compile_s.items()},
        }
        r["nir_over_freia"] = r["nir_s"] / r["freia_s"]
        r["gemm_floor_over_freia"] = r["gemm_floor_s"] / r["freia_s"]
        r["nir_compiled_over_freia"] = r["nir_compiled_s"] / r["freia_s"]
        r["freia_compiled_over_freia"] = r["freia_compiled_s"] / r["freia_s"]
        r["nir_compiled_over_freia_compiled"] = r["nir_compiled_s"] / r["freia_compiled_s"]
        rows.append(r)
        print(
            f"{B:>4} {D:>4} | {r['nir_s'] * 1e3:8.2f} {r['nir_compiled_s'] * 1e3:8.2f} {r['freia_s'] * 1e3:8.2f} "
            f"{r['freia_compiled_s'] * 1e3:9.2f} | {r['nir_over_freia']:9.3f} {r['nir_compiled_over_freia']:12.3f} "
            f"{r['freia_compiled_over_freia']:14.3f} {r['nir_compiled_over_freia_compiled']:15.3f} | "
            f"{compile_s['nir_compiled']:.0f}, {compile_s['freia_compiled']:.0f} | GEMMs alone "
            f"{r['gemm_floor_s'] * 1e3:.2f} ms = {r['gemm_floor_over_freia']:.3f} of FrEIA",
            flush=True,
        )
    # What a user writes: torch.compile(loss_fn) of the whole PML loss (PML's reducers break the
    # graph into several pieces; the flow stays in one).
    D, B = args.compiled_grid[0]
    _, nir, _, x0, labels, mods = make_losses(B, D, C, device)
    compiled_loss = torch.compile(nir)

    def full(fn):
        def f():
            zero_grads(mods, x0)
            fn(F.normalize(x0, dim=1), labels).backward()

        return f

    w = time.perf_counter()
    full(compiled_loss)()
    compile_s = time.perf_counter() - w
    t = interleaved({"loss": full(nir), "loss_compiled": full(compiled_loss)}, args.reps, timer, warmup=3)
    whole = {
        "B": B,
        "D": D,
        "C": C,
        "loss_s": t["loss"]["median_s"],
        "loss_compiled_s": t["loss_compiled"]["median_s"],
        "compile_s": compile_s,
    }
    whole["compiled_over_eager"] = whole["loss_compiled_s"] / whole["loss_s"]
    print(
        f"whole ProxyAnchorNIRLoss, B={B} D={D}: eager {whole['loss_s'] * 1e3:.2f} ms, torch.compile(loss) "
        f"{whole['loss_compiled_s'] * 1e3:.2f} ms ({whole['compiled_over_eager']:.3f}x; compile {compile_s:.0f} s)"
    )
    out["compiled"] = {"term": rows, "whole_loss": whole}


def section_profile(args, device, timer, out):
    print("\n== 6. torch.profiler top ops: NIR term vs FrEIA flow, fwd+bwd, B=90 D=128 C=100 ==")
    _, nir, _, x0, labels, _ = make_losses(90, 128, 100, device)
    inn = build_freia_flow(128).to(device)
    variants = term_variants(nir, inn, compiled="compiled" in args.sections.split(","))
    fns = {k: term_step(v, [nir, inn], x0, nir.proxies, labels) for k, v in variants.items()}
    res = {}
    acc: dict[str, dict[str, list[float]]] = {k: {} for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    iters = 10
    for _ in range(iters):  # alternate one profiled iteration of each: machine noise hits both
        for name, fn in fns.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                t = acc[name].setdefault(e.key, [0.0, 0])
                t[0] += e.self_cpu_time_total
                t[1] += e.count
    for name in fns:
        items = sorted(acc[name].items(), key=lambda kv: -kv[1][0])
        total = sum(v[0] for _, v in items)
        rows = [
            {"op": k, "self_ms_per_iter": v[0] / 1e3 / iters, "calls_per_iter": v[1] / iters, "share": v[0] / total}
            for k, v in items[:12]
        ]
        gemm = sum(v[0] for k, v in items if k in ("aten::mm", "aten::addmm"))
        res[name] = {
            "self_ms_per_iter": total / 1e3 / iters,
            "top": rows,
            "ops_per_iter": sum(v[1] for _, v in items) / iters,
            "gemm_share": gemm / total,
        }
        print(
            f"{name}: {total / 1e3 / iters:.1f} ms/iter self CPU (profiled), {res[name]['ops_per_iter']:.0f} op calls/iter, "
            f"GEMMs {gemm / total:.0%}"
        )
        for r in rows:
            print(
                f"   {r['op'][:48]:48} {r['self_ms_per_iter']:7.2f} ms {r['share']:6.1%} {r['calls_per_iter']:6.0f} calls"
            )
    out["profile"] = res


# -- kernel counts (section 7) ---------------------------------------------------------------
# Not kernels: views, allocations, no-op conversions and autograd bookkeeping.
_NO_KERNEL = {
    "detach",
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "_local_scalar_dense",
    "resize_",
    "set_",
    "alias",
    "resolve_conj",
    "resolve_neg",
    "to",
}
_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_addmm_activation", "addmv", "mv"}


class _OpCount(TorchDispatchMode):
    """Counts the aten ops an eager step dispatches below autograd: on a GPU each is about one kernel."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def eager_kernel_count(step) -> dict:
    """Ops of one eager call of ``step`` (after a warm-up call): total, GEMMs, and by op."""
    step()
    with _OpCount() as c:
        step()
    return {
        "total": sum(c.ops.values()),
        "gemm": sum(v for k, v in c.ops.items() if k in _GEMMS),
        "by_op": dict(sorted(c.ops.items(), key=lambda kv: -kv[1])),
    }


def compiled_kernel_count(step) -> dict:
    """Launches of one call of a compiled ``step`` from the CPU profiler (needs
    ``torch._inductor.config.cpp.enable_kernel_profile`` set before compiling): inductor's kernels,
    GEMMs (extern or fallback calls), and any other aten op that runs, inside the graphs or around them."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    counts = {"fused": 0, "gemm": 0, "other": 0}
    other: dict[str, int] = {}

    def walk(e):
        name = e.name
        if "cpp_fused" in name or name.startswith("triton_"):
            counts["fused"] += 1
            return
        if name.startswith("aten::"):
            op = name[len("aten::") :]
            if op in _GEMMS:
                counts["gemm"] += 1
                return
            if not any(k.name.startswith("aten::") or "cpp_fused" in k.name for k in e.cpu_children):
                if op not in _NO_KERNEL and op not in _PROFILER_VIEWS:
                    counts["other"] += 1
                    other[op] = other.get(op, 0) + 1
                return
        for k in e.cpu_children:
            walk(k)

    for e in prof.events():
        if e.cpu_parent is None:
            walk(e)
    return {
        **counts,
        "graph_launches": counts["fused"] + counts["gemm"],
        "total": counts["fused"] + counts["gemm"] + counts["other"],
        "other_ops": other,
    }


_PROFILER_VIEWS = {
    "view",
    "t",
    "transpose",
    "expand",
    "as_strided",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "chunk",
    "unsqueeze",
    "squeeze",
    "permute",
    "reshape",
    "_reshape_alias",
    "unflatten",
    "flatten",
    "_unsafe_view",
    "unbind",
    "narrow",
    "expand_as",
    "view_as",
    "contiguous",
    "result_type",
    "is_nonzero",
    "numpy_T",
    "detach_",
}


def section_kernels(args, device, timer, out):
    B, D, C = 90, 128, 100
    print(f"\n== 7. kernels per forward+backward, B={B} D={D} C={C}: NIR term vs FrEIA flow vs ProxyAnchorLoss ==")
    print(
        "eager: aten ops dispatched below autograd (views and allocations left out; on a GPU about one kernel "
        "each). compiled (inductor, from the profiler): the graphs' fused kernels and GEMMs, and apart the ops "
        "that ran outside them (the step's normalize and mean, autograd's gradient bookkeeping, random seeds). "
        "The NIR term is counted on the accelerators' code path (batched weight gradients)."
    )
    import torch._inductor.config as inductor_config

    if args.fresh_cache:  # its compile times are cold too, after section 5's compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nir_speed_kernels_", dir=args.cache_root)
        torch._dynamo.reset()
    inductor_config.cpp.enable_kernel_profile = True  # (a different kernel source than section 5's)
    pa, nir, _, x0, labels, mods = make_losses(B, D, C, device)
    # The accelerators' code path, on any device: the fused pass with batched weight gradients.
    nir.nir.flow.fused, nir.nir.flow.batched_weight_grads = True, True
    inn = build_freia_flow(D).to(device)
    layers = copy.deepcopy(nir)
    layers.nir.flow.fused = False  # the layers one by one under autograd (nir-loss 0.2.0's path)
    mods = [*mods, inn, layers]

    def freia_nll(emb, proxies, labels):
        return -freia_log_likelihood(inn, emb, proxies, labels)

    def step(fn, autocast=False):
        def f():
            zero_grads(mods, x0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = fn(F.normalize(x0, dim=1))
            loss.backward()

        return f

    arms = {
        "nir": lambda e: nir.nir.per_sample_loss(e, nir.proxies, labels).mean(),
        "nir_layers": lambda e: layers.nir.per_sample_loss(e, layers.proxies, labels).mean(),
        "freia": lambda e: freia_nll(e, nir.proxies, labels).mean(),
        "proxy_anchor": lambda e: pa(e, labels),
    }
    res: dict = {"eager": {}, "eager_bf16": {}, "compiled": {}, "compile_s": {}}
    for name, fn in arms.items():
        res["eager"][name] = eager_kernel_count(step(fn))
        if name != "proxy_anchor":
            res["eager_bf16"][name] = eager_kernel_count(step(fn, autocast=True))
    compiled_nir = copy.deepcopy(nir)
    compiled_nir.nir.compile_nir()  # what a user switches on: fullgraph, static shape
    mods.append(compiled_nir)
    compiled = {
        "nir": lambda e: compiled_nir.nir.per_sample_loss(e, compiled_nir.proxies, labels).mean(),
        "nir_layers": torch.compile(
            lambda e: layers.nir.per_sample_loss(e, layers.proxies, labels).mean(), dynamic=False
        ),
        "freia": torch.compile(lambda e: freia_nll(e, nir.proxies, labels).mean(), dynamic=False),
        "proxy_anchor": torch.compile(lambda e: pa(e, labels), dynamic=False),
    }
    if args.no_compile:
        compiled = {}
    for name, fn in compiled.items():
        w = time.perf_counter()
        step(fn)()
        res["compile_s"][name] = time.perf_counter() - w
        res["compiled"][name] = compiled_kernel_count(step(fn))
    print(
        f"{'':14} {'eager':>6} {'(GEMMs)':>8} {'bf16 autocast':>14} | {'compiled':>8} {'(fused + GEMMs)':>16} "
        f"{'+ ops outside':>13} {'compile s':>9}"
    )
    for name in arms:
        e, b, c = res["eager"][name], res["eager_bf16"].get(name), res["compiled"].get(name)
        comp = (
            f"{c['graph_launches']:>8} {c['fused']:>8} + {c['gemm']:>5} {c['other']:>13}"
            if c
            else f"{'-':>8} {'':16} {'':13}"
        )
        cs = f"{res['compile_s'][name]:9.0f}" if name in res["compile_s"] else ""
        print(f"{name:14} {e['total']:>6} {e['gemm']:>8} {(b['total'] if b else '-'):>14} | {comp} {cs}")
    out["kernels"] = {"B": B, "D": D, "C": C, **res}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sections",
        default="loss,matrix,roofline,resnet,compiled,profile,kernels",
        help="comma-separated subset of the default",
    )
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
    a.batches, a.dims, a.classes = [90, 180], [128, 512], [100, 11318]
    a.reps, a.step_reps, a.step_batch, a.image_size = 11, 5, 90, 64
    a.matrix_batch, a.matrix_classes = 90, 100
    a.matrix_rows = [100, 300, 500, 1000, 2000, 4000, 9000]
    a.compiled_grid = [(D, B) for D in a.dims for B in a.batches]
    if a.quick:
        a.classes, a.reps, a.step_reps, a.step_batch, a.image_size = [100, 11318], 5, 3, 32, 32
        a.matrix_rows = [500, 1000, 2000, 4000]
        a.compiled_grid = [(128, 90)]
    if a.step_reps_arg is not None:
        a.step_reps = a.step_reps_arg
    torch.set_num_threads(a.threads)
    # Compile times as a new machine sees them: a fresh inductor cache unless one is given.
    a.fresh_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if a.fresh_cache:
        a.cache_root = tempfile.mkdtemp(prefix="nir_speed_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=a.cache_root)
    device = torch.device(a.device)
    timer = Timer(device)
    meta = {
        "argv": sys.argv[1:],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "time_base": "CUDA events" if device.type == "cuda" else "thread CPU time (time.thread_time)",
        "inductor_cache": "fresh" if a.fresh_cache else os.environ["TORCHINDUCTOR_CACHE_DIR"],
    }
    print(
        f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cpus; times: {meta['time_base']}, medians of {a.reps} interleaved repeats"
    )
    out = {"meta": meta}
    t0 = time.perf_counter()
    sections = a.sections.split(",")
    for name, fn in [
        ("loss", section_loss),
        ("matrix", section_matrix),
        ("roofline", section_roofline),
        ("resnet", section_resnet),
        # 5 before 6: its compile times are then cold (6 compiles the B=90 graph again)
        ("compiled", section_compiled),
        ("profile", section_profile),
        ("kernels", section_kernels),
    ]:
        if name in sections:
            fn(a, device, timer, out)
    out["meta"]["total_seconds"] = time.perf_counter() - t0
    path = Path(a.out) if a.out else RESULTS / nir_loss.__version__ / ("speed_quick.json" if a.quick else "speed.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}; total {out['meta']['total_seconds']:.0f}s")
    if a.fresh_cache:
        shutil.rmtree(a.cache_root, ignore_errors=True)


if __name__ == "__main__":
    main()
