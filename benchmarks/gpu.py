# ruff: noqa: E501  (wide tables)
"""What the NIR term costs on a CUDA GPU, measured in one run of about 4 minutes.

    bash benchmarks/gpu_run.sh                     # the one command (checks for a GPU first)
    python benchmarks/gpu.py --out results/gpu.json

Needs a CUDA GPU (it stops at once without one), nir-loss's dependencies and torchvision (for
the ResNet50 step); FrEIA adds the reference flow's eager time if installed. No network, at
most 4 compiles (the NIR term at 4 shapes, ``compile_nir()``). The JSON is rewritten after
every section, so an interrupted run keeps what it measured. Sections:

1. the machine: GPU, driver, torch, CUDA and triton versions.
2. host syncs, with ``torch.cuda.set_sync_debug_mode("error")``: nir-loss's part of a default
   ``ProxyAnchorNIRLoss`` call after its first call (validation, the NIR term forward and
   backward, its reduction), and the whole default call (PML's ProxyAnchorLoss and reducer sync:
   the first sync is reported).
3. the NIR term forward+backward (training mode, C = 100) at B in {90, 180}, D in {128, 512}:
   eager, eager captured in a CUDA graph by hand, and FrEIA's flow eager; per step the CUDA
   kernels, the GPU busy time (union of kernel intervals) and the peak memory.
4. a ResNet50 training step (224 px, bf16 autocast, channels_last, SGD, B = 90, D = 128,
   C = 100): ProxyAnchorLoss vs ProxyAnchorNIRLoss with the term eager and compiled; the NIR
   share of the step. (Compiles the term at B = 90, D = 128.)
5. the NIR term compiled (``compile_nir()``: CUDA graphs, fullgraph, static shape) at the four
   shapes of section 3 (three more compiles), with its kernels, busy time, memory and a sync
   check.

Layout: ``measure_*`` functions measure a section (plain records; a row section yields one row per
shape), ``render_*`` functions format them, ``SECTIONS`` pairs them and ``main`` is the command
line; ``cases.py`` builds the losses and inputs of one shape (shared with ``speed.py``).

Times are CUDA-event medians over interleaved repeats. ``--dry-run`` runs every section on CPU
with tiny shapes (no CUDA-only measurement), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cases import Case, build_case  # noqa: E402
from nir_loss import ProxyAnchorNIRLoss  # noqa: E402

C = 100
SHAPES = [(90, 128), (180, 128), (90, 512), (180, 512)]  # (B, D)


class Run:
    """Device-specific measurement; on CPU (``--dry-run``) wall-clock stand-ins."""

    def __init__(self, device: torch.device, reps: int, out: Path):
        self.device, self.reps, self.out = device, reps, out
        self.cuda = device.type == "cuda"
        self.results: dict = {}
        self.compiled: dict = {}  # (B, D) -> [loss with compile_nir(), compile seconds]: one compile per shape

    def save(self, key: str, value) -> None:
        self.results[key] = value
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1, default=str))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def times(self, fns: dict, warmup: int = 3) -> dict:
        """Median seconds per call of each fn, interleaved."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        acc: dict = {k: [] for k in fns}
        for _ in range(self.reps):
            for k, fn in fns.items():
                self.sync()
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    acc[k].append(start.elapsed_time(end) / 1e3)
                else:
                    t = time.perf_counter()
                    fn()
                    acc[k].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in acc.items()}

    def kernels(self, fn, steps: int = 3) -> dict:
        """Per step: device kernels (and memcpy/memset), their busy time, host-side launch calls."""
        fn()
        self.sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            self.sync()
        device_events, launches = [], 0
        for e in prof.events():
            if self.cuda and e.device_type == torch.autograd.DeviceType.CUDA:
                device_events.append((e.time_range.start, e.time_range.end))
            elif e.name in (
                "cudaLaunchKernel",
                "cuLaunchKernel",
                "cudaLaunchKernelExC",
                "cuLaunchKernelEx",
                "cudaGraphLaunch",
                "cudaMemcpyAsync",
                "cudaMemsetAsync",
            ):
                launches += 1
        busy, end = 0.0, -1.0
        for a, b in sorted(device_events):
            if b > end:
                busy += b - max(a, end)
                end = b
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::")) if not self.cuda else None
        return {
            "device_kernels": len(device_events) / steps,
            "busy_ms": busy / 1e3 / steps,
            "host_launch_calls": launches / steps,
            **({"cpu_aten_events": ops / steps} if ops else {}),
        }

    def peak_bytes(self, fn) -> int | None:
        if not self.cuda:
            return None
        self.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - base

    def sync_check(self, fn) -> str:
        """'no sync', or the first synchronizing call's error; fn runs once outside the check first."""
        if not self.cuda:
            return "skipped (no CUDA)"
        fn()
        self.sync()
        try:
            torch.cuda.set_sync_debug_mode("error")
            fn()
            result = "no sync"
        except RuntimeError as e:
            result = "sync: " + str(e).strip().splitlines()[0][:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        self.sync()
        return result


def term_setup(run: Run, args, B: int, D: int, freia: bool = False, proxy_anchor: bool = False) -> Case:
    """The shared case of one shape with ``ProxyAnchorNIRLoss``'s defaults (validation on, training
    mode); the flow and FrEIA's as ``args`` sizes them (tiny in a dry run)."""
    return build_case(
        B,
        D,
        C,
        run.device,
        flow_options=args.flow,
        freia_options=args.freia,
        proxy_anchor=proxy_anchor,
        freia=freia,
    )


def term_step(case: Case, loss: ProxyAnchorNIRLoss | None = None):
    """Forward+backward of the NIR term of ``loss`` (default the case's) on the leaf embeddings."""
    loss = case.nir if loss is None else loss
    if loss is not case.nir and all(m is not loss for m in case.extra):
        case.extra.append(loss)  # its gradients are cleared with the case's
    return case.term_step(loss.nir.per_sample_loss, proxies=loss.proxies, normalize=False)


def compiled_loss(run: Run, args, case: Case):
    """The case's loss copied with ``compile_nir()``, compiled by a first step: once per shape."""
    key = (case.B, case.D)
    if key not in run.compiled:
        loss = copy.deepcopy(case.nir).compile_nir(**args.compile)
        w = time.perf_counter()
        term_step(case, loss)()
        run.compiled[key] = [loss, time.perf_counter() - w]
    return run.compiled[key]


def cuda_graph_of(fn, run: Run):
    """fn (static inputs) captured in a CUDA graph by hand: returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# -- measuring: one function per section, plain records (rows come one shape at a time) -------
def measure_machine(run: Run, args) -> dict:
    info = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(run.device),
        "argv": sys.argv[1:],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if run.cuda:
        p = torch.cuda.get_device_properties(run.device)
        info.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            sm_count=p.multi_processor_count,
        )
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def measure_syncs(run: Run, args) -> dict:
    B, D = args.shapes[0]
    case = term_setup(run, args, B, D)
    loss_fn, emb, labels = case.nir, case.emb, case.labels

    def nir_part():  # what ProxyAnchorNIRLoss.compute_loss adds to PML's ProxyAnchor, then its reduction
        case.zero_grad()
        loss_fn._checked_proxies(emb, labels)
        entry = loss_fn._nir_loss_entry(emb, labels, None)
        loss_fn.reducer({"nir_loss": entry}, emb, labels).backward()

    def whole_call():
        case.zero_grad()
        loss_fn(emb, labels).backward()

    loss_fn(emb, labels)  # the first call's value checks read values (one sync), by design
    return {
        "nir_loss_part_of_default_call": run.sync_check(nir_part),
        "nir_term_eager": run.sync_check(term_step(case)),
        "whole_default_call_with_pml": run.sync_check(whole_call),
    }


def measure_term(run: Run, args) -> Iterator[dict]:
    have_freia = importlib.util.find_spec("FrEIA") is not None
    for B, D in args.shapes:
        case = term_setup(run, args, B, D, freia=have_freia)
        fns = {"eager": term_step(case)}
        if run.cuda:
            fns["graph"] = cuda_graph_of(term_step(case), run)
        if have_freia:
            fns["freia"] = case.term_step(case.freia_nll, normalize=False)
        t = run.times(fns)
        r = {
            "B": B,
            "D": D,
            **{f"{n}_s": v for n, v in t.items()},
            "eager_kernels": run.kernels(fns["eager"]),
            "graph_kernels": run.kernels(fns["graph"]) if "graph" in fns else {},
            "eager_peak_bytes": run.peak_bytes(fns["eager"]),
        }
        if "freia_s" in r:
            r["eager_over_freia"] = r["eager_s"] / r["freia_s"]
        yield r


def measure_resnet(run: Run, args) -> dict | str:
    try:
        import torchvision
    except ImportError:
        return "skipped: torchvision is not installed"
    B, D = args.shapes[0]
    px = args.image_size
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, D)
    model = model.to(run.device, memory_format=torch.channels_last).train()
    images = torch.randn(B, 3, px, px, device=run.device).to(memory_format=torch.channels_last)
    case = term_setup(run, args, B, D, proxy_anchor=True)
    pa, nir, labels = case.pa, case.nir, case.labels
    if run.cuda:
        torch.backends.cudnn.benchmark = True

    def step(loss_fn):
        opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=1e-4, momentum=0.9)

        def f():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(run.device.type, dtype=torch.bfloat16):
                out = model(images)
            loss_fn(F.normalize(out.float(), dim=1), labels).backward()
            opt.step()

        return f

    # The term compiles here (first call), for the shape section 5 starts with.
    nir_compiled, compile_s = compiled_loss(run, args, case)
    fns = {"pa": step(pa), "nir_eager": step(nir), "nir_compiled": step(nir_compiled)}
    t = run.times(fns, warmup=3)
    r = {
        "B": B,
        "D": D,
        "image_size": px,
        **{f"{k}_s": v for k, v in t.items()},
        "compile_s": compile_s,
        "peak_bytes": {k: run.peak_bytes(f) for k, f in fns.items()},
    }
    for k in ("nir_eager", "nir_compiled"):
        r[f"{k}_share"] = (r[f"{k}_s"] - r["pa_s"]) / r[f"{k}_s"]
    return r


def measure_compiled(run: Run, args) -> Iterator[dict]:
    for B, D in args.shapes:
        case = term_setup(run, args, B, D)
        compiled, compile_s = compiled_loss(run, args, case)
        fns = {"eager": term_step(case), "compiled": term_step(case, compiled)}
        t = run.times(fns)
        r = {
            "B": B,
            "D": D,
            **{f"{n}_s": v for n, v in t.items()},
            "compile_s": compile_s,
            "kernels": run.kernels(fns["compiled"]),
            "peak_bytes": run.peak_bytes(fns["compiled"]),
            "sync": run.sync_check(fns["compiled"]),
        }
        r["compiled_over_eager"] = r["compiled_s"] / r["eager_s"]
        yield r


# -- rendering: a title, and the lines of one record ------------------------------------------
def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1e3


def render_items(record: dict | str) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in record.items()) if isinstance(record, dict) else f"  {record}"


TERM_HEADER = (
    f"{'B':>4} {'D':>4} | {'eager ms':>9} {'graph ms':>9} {'FrEIA ms':>9} | {'kernels':>7} {'busy ms':>8} "
    f"{'launch calls':>12} | {'graph kernels':>13} {'graph busy ms':>13} | {'peak MB':>7}"
)


def render_term_row(r: dict) -> str:
    k, kg = r["eager_kernels"], r["graph_kernels"]
    return (
        f"{r['B']:>4} {r['D']:>4} | {_ms(r['eager_s']):9.3f} {_ms(r.get('graph_s')):9.3f} "
        f"{_ms(r.get('freia_s')):9.3f} | {k['device_kernels']:7.0f} {k['busy_ms']:8.3f} "
        f"{k['host_launch_calls']:12.0f} | {kg.get('device_kernels', float('nan')):13.0f} "
        f"{kg.get('busy_ms', float('nan')):13.3f} | {(r['eager_peak_bytes'] or 0) / 2**20:7.1f}"
    )


def render_resnet(r: dict | str) -> str:
    if isinstance(r, str):
        return f"  {r}"
    return (
        f"  B={r['B']}, {r['image_size']} px, D={r['D']}: ProxyAnchor step {_ms(r['pa_s']):.2f} ms; "
        f"with NIR eager {_ms(r['nir_eager_s']):.2f} ms (NIR share {r['nir_eager_share']:.1%}); "
        f"with NIR compiled {_ms(r['nir_compiled_s']):.2f} ms (NIR share {r['nir_compiled_share']:.1%}); "
        f"compile {r['compile_s']:.0f} s"
    )


COMPILED_HEADER = (
    f"{'B':>4} {'D':>4} | {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} | {'kernels':>7} "
    f"{'busy ms':>8} {'launch calls':>12} | {'peak MB':>7} | {'compile s':>9} | sync"
)


def render_compiled_row(r: dict) -> str:
    k = r["kernels"]
    return (
        f"{r['B']:>4} {r['D']:>4} | {_ms(r['eager_s']):9.3f} {_ms(r['compiled_s']):11.3f} "
        f"{r['compiled_over_eager']:14.3f} | {k['device_kernels']:7.0f} {k['busy_ms']:8.3f} "
        f"{k['host_launch_calls']:12.0f} | {(r['peak_bytes'] or 0) / 2**20:7.1f} | {r['compile_s']:9.0f} | {r['sync']}"
    )


@dataclass(frozen=True)
class Section:
    """One section: its results key, title, measurement and rendering (``header`` for row sections)."""

    key: str
    title: str
    measure: Callable
    render: Callable
    header: str | None = None


SECTIONS = {
    "machine": Section("machine", "1. machine", measure_machine, render_items),
    "syncs": Section(
        "syncs",
        "2. host syncs (torch.cuda.set_sync_debug_mode('error'), after a first call)",
        measure_syncs,
        render_items,
    ),
    "term": Section(
        "term",
        f"3. NIR term forward+backward, C={C}: eager, CUDA graph (by hand), FrEIA eager (if installed)",
        measure_term,
        render_term_row,
        TERM_HEADER,
    ),
    "resnet": Section(
        "resnet_step",
        f"4. ResNet50 training step, bf16 autocast, channels_last, C={C}",
        measure_resnet,
        render_resnet,
    ),
    "compiled": Section(
        "compiled",
        "5. NIR term compiled (compile_nir(): CUDA graphs, fullgraph, static shape)",
        measure_compiled,
        render_compiled_row,
        COMPILED_HEADER,
    ),
}


def run_section(run: Run, args, section: Section) -> None:
    """Measures, prints and saves one section; a row section is printed and saved row by row."""
    print(f"\n== {section.title} ==")
    if section.header is None:
        record = section.measure(run, args)
        print(section.render(record))
        run.save(section.key, record)
        return
    print(section.header)
    rows: list[dict] = []
    for row in section.measure(run, args):
        rows.append(row)
        print(section.render(row), flush=True)
        run.save(section.key, rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sections", default="machine,syncs,term,resnet,compiled")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script without a GPU")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "--dry-run checks the script on CPU."
        )
    device = torch.device("cpu" if a.dry_run else "cuda")
    a.shapes, a.image_size, a.flow, a.freia, a.compile = SHAPES, 224, {}, {}, {}
    if a.dry_run:
        a.shapes, a.image_size, a.reps = [(6, 8), (10, 8)], 32, 2
        a.flow = {"num_blocks": 2, "hidden_features": 16, "num_layers": 3}
        a.freia = {"num_blocks": 2, "hidden": 16, "num_layers": 3}
        a.compile = {"backend": "aot_eager"}
    run = Run(device, a.reps, Path(a.out))
    from torch._dynamo.utils import counters

    counters.clear()  # compiles of this run only
    t0 = time.perf_counter()
    for name in a.sections.split(","):
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; the sections are {', '.join(SECTIONS)}")
        run_section(run, a, SECTIONS[name])
    run.save("compiled_graphs", dict(counters["stats"]))  # unique_graphs: forward graphs compiled
    run.save("total_seconds", time.perf_counter() - t0)
    print(
        f"\ncompiled graphs: {counters['stats'].get('unique_graphs', 0)}; wrote {a.out}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
