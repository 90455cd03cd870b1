# ruff: noqa: B023  (closures are called within their loop iteration)
"""What ``speed.py`` measures: one function per section, each returning plain records (no printing)."""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cases import SPEED_LOSS, build_case

__all__ = [
    "Grid",
    "Timer",
    "compiled",
    "compiled_kernel_count",
    "eager_kernel_count",
    "flow_flops_per_row",
    "interleaved",
    "kernels",
    "loss",
    "matrix",
    "peak_memory",
    "profile",
    "resnet",
    "roofline",
]


@dataclass
class Grid:
    """The shapes and repeats of one run (``speed.py`` holds the full and the quick one)."""

    batches: list[int] = field(default_factory=lambda: [90, 180])
    dims: list[int] = field(default_factory=lambda: [128, 512])
    classes: list[int] = field(default_factory=lambda: [100, 11318])
    reps: int = 11
    step_reps: int = 5  # the ResNet50 step
    step_batch: int = 90
    image_size: int = 64
    matrix_batch: int = 90
    matrix_classes: int = 100
    matrix_rows: list[int] = field(default_factory=lambda: [100, 300, 500, 1000, 2000, 4000, 9000])
    compiled_grid: list[tuple[int, int]] = field(default_factory=list)  # (D, B); empty: every (D, B)

    def __post_init__(self) -> None:
        if not self.compiled_grid:
            self.compiled_grid = [(D, B) for D in self.dims for B in self.batches]


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
    times: dict[Any, list[float]] = {k: [] for k in fns}
    walls: dict[Any, list[float]] = {k: [] for k in fns}
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


# -- sections ---------------------------------------------------------------------------------
def loss(grid: Grid, device: torch.device, timer: Timer) -> list[dict]:
    """Section 1: loss forward+backward of ProxyAnchor (pa), PA+NIR (nir) and PA+FrEIA (freia)."""
    rows = []
    for C in grid.classes:
        for D in grid.dims:
            for B in grid.batches:
                case = build_case(B, D, C, device, loss_options=SPEED_LOSS)
                assert case.pa is not None
                fns = {
                    "pa": case.loss_step(case.pa),
                    "nir": case.loss_step(case.nir),
                    "freia": case.loss_step(case.freia_loss),
                }
                t = interleaved(fns, grid.reps, timer)
                mem = {k: peak_memory(f, device) for k, f in fns.items()}
                r = timing_record(B, D, C, t, **{f"{k}_peak_bytes": v for k, v in mem.items()})
                r["nir_over_pa"] = r["nir_s"] / r["pa_s"]
                r["freia_over_pa"] = r["freia_s"] / r["pa_s"]
                r["nir_over_freia"] = r["nir_s"] / r["freia_s"]
                r["nir_term_over_freia_term"] = (r["nir_s"] - r["pa_s"]) / max(r["freia_s"] - r["pa_s"], 1e-12)
                rows.append(r)
    return rows


def timing_record(B: int, D: int, C: int, times: dict[str, dict], **extra: Any) -> dict[str, Any]:
    """One row of a timed section: the shape, each arm's median time (``<arm>_s``) and wall time
    (``<arm>_wall_s``) from ``interleaved``, then ``extra``."""
    return {
        "B": B,
        "D": D,
        "C": C,
        **{f"{k}_s": v["median_s"] for k, v in times.items()},
        **{f"{k}_wall_s": v["wall_median_s"] for k, v in times.items()},
        **extra,
    }


def matrix(grid: Grid, device: torch.device, timer: Timer) -> list[dict]:
    """Section 2: ``log_likelihood_matrix`` throughput (no grad) against chunk size."""
    rows = []
    B, C = grid.matrix_batch, grid.matrix_classes
    for D in grid.dims:
        case = build_case(B, D, C, device, loss_options={"validate": False}, proxy_anchor=False, freia=False)
        x = case.emb.detach()
        chunks = sorted({max(1, r // C) for r in grid.matrix_rows})

        def f(ch):
            def run():
                with torch.no_grad():
                    case.nir.log_likelihood_matrix(x, chunk_size=ch)

            return run

        t = interleaved({ch: f(ch) for ch in chunks}, max(3, grid.reps // 2), timer, warmup=1)
        for ch in chunks:
            s = t[ch]["median_s"]
            rows.append(
                {
                    "D": D,
                    "B": B,
                    "C": C,
                    "chunk": ch,
                    "rows_per_pass": ch * C,
                    "s": s,
                    "rows_per_s": B * C / s,
                    "flop_per_s": B * C * flow_flops_per_row(D, context=False) / s,
                }
            )
    return rows


def roofline(grid: Grid, device: torch.device, timer: Timer, matrix_rows: list[dict], loss_rows: list[dict]) -> dict:
    """Section 3: the flow's achieved FLOP/s in sections 2 and 1 against measured dense matmuls."""
    peaks = {}
    for m, k, n in [(4096, 128, 128), (4096, 512, 128), (90, 128, 128), (4096, 1024, 1024)]:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        t = interleaved({"mm": lambda: a @ b}, max(5, grid.reps), timer, warmup=3)["mm"]["median_s"]
        peaks[f"{m}x{k}x{n}"] = 2 * m * k * n / t
    peak = max(peaks.values())
    best: dict[int, dict] = {}
    for r in matrix_rows:
        if r["flop_per_s"] > best.get(r["D"], {"flop_per_s": 0})["flop_per_s"]:
            best[r["D"]] = r
    rows: list[dict[str, Any]] = [
        {"pass": "matrix (no grad)", "D": D, "flop_per_s": r["flop_per_s"], "fraction_of_peak": r["flop_per_s"] / peak}
        for D, r in best.items()
    ]
    for r in loss_rows:
        if r["C"] == min(grid.classes):
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
    return {"matmul_flop_per_s": peaks, "peak_flop_per_s": peak, "rows": rows}


def resnet(grid: Grid, device: torch.device, timer: Timer) -> list[dict]:
    """Section 4: a ResNet50 training step (random init, small images), ProxyAnchor vs ProxyAnchor + NIR."""
    import torchvision

    B, D, C = grid.step_batch, 128, 100
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, D)
    model = model.to(device).train()
    case = build_case(B, D, C, device, loss_options={"validate": False}, freia=False)
    pa, nir = case.pa, case.nir
    assert pa is not None
    images = torch.randn(B, 3, grid.image_size, grid.image_size, device=device)
    params = list(model.parameters())
    opt_pa = torch.optim.Adam([{"params": params}, {"params": pa.parameters(), "lr": 1e-2}], lr=1e-4)
    opt_nir = torch.optim.Adam([{"params": params}, *nir.param_groups(1e-4)], lr=1e-4)

    def step(loss_fn, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            loss_fn(F.normalize(model(images), dim=1), case.labels).backward()
            opt.step()

        return f

    fns = {
        "pa_step": step(pa, opt_pa),
        "nir_step": step(nir, opt_nir),
        "nir_term": case.term_step(nir.nir.per_sample_loss, normalize=False),
    }
    t = interleaved(fns, grid.step_reps, timer, warmup=1)
    r: dict[str, Any] = {k: v["median_s"] for k, v in t.items()}
    r["nir_share_of_step"] = (r["nir_step"] - r["pa_step"]) / r["nir_step"]
    r["nir_term_share"] = r["nir_term"] / r["nir_step"]
    r.update(batch=B, image_size=grid.image_size)
    return [r]


def compiled(grid: Grid, device: torch.device, timer: Timer) -> dict:
    """Section 5: ``torch.compile`` vs eager of the NIR term and the FrEIA flow, the GEMMs alone, and
    ``torch.compile`` of the whole loss (what a user writes)."""
    rows = []
    C = 100
    for D, B in grid.compiled_grid:
        case = build_case(B, D, C, device, loss_options=SPEED_LOSS)
        fns = {k: case.term_step(v) for k, v in case.term_variants(compiled=True).items()}
        fns["gemm_floor"] = gemm_floor_fn(B, D, device)
        compile_s = {}
        for k in ("nir_compiled", "freia_compiled"):
            w = time.perf_counter()
            fns[k]()  # compiles (forward and backward graphs)
            compile_s[k] = time.perf_counter() - w
        t = interleaved(fns, grid.reps, timer, warmup=3)
        r = timing_record(B, D, C, t, **{f"{k}_compile_s": v for k, v in compile_s.items()})
        r["nir_over_freia"] = r["nir_s"] / r["freia_s"]
        r["gemm_floor_over_freia"] = r["gemm_floor_s"] / r["freia_s"]
        r["nir_compiled_over_freia"] = r["nir_compiled_s"] / r["freia_s"]
        r["freia_compiled_over_freia"] = r["freia_compiled_s"] / r["freia_s"]
        r["nir_compiled_over_freia_compiled"] = r["nir_compiled_s"] / r["freia_compiled_s"]
        rows.append(r)
    # PML's reducers break torch.compile(loss_fn) into several graphs; the flow stays in one.
    D, B = grid.compiled_grid[0]
    case = build_case(B, D, C, device, loss_options=SPEED_LOSS, freia=False)
    compiled_loss = torch.compile(case.nir)
    w = time.perf_counter()
    case.loss_step(compiled_loss)()
    compile_s_whole = time.perf_counter() - w
    t = interleaved(
        {"loss": case.loss_step(case.nir), "loss_compiled": case.loss_step(compiled_loss)}, grid.reps, timer, warmup=3
    )
    whole: dict[str, Any] = {
        "B": B,
        "D": D,
        "C": C,
        "loss_s": t["loss"]["median_s"],
        "loss_compiled_s": t["loss_compiled"]["median_s"],
        "compile_s": compile_s_whole,
    }
    whole["compiled_over_eager"] = whole["loss_compiled_s"] / whole["loss_s"]
    return {"term": rows, "whole_loss": whole}


def profile(
    device: torch.device, with_compiled: bool, B: int = 90, D: int = 128, C: int = 100, iters: int = 10
) -> dict:
    """Section 6: torch.profiler top ops of the NIR term vs the FrEIA flow, fwd+bwd."""
    case = build_case(B, D, C, device, loss_options=SPEED_LOSS)
    fns = {k: case.term_step(v) for k, v in case.term_variants(compiled=with_compiled).items()}
    acc: dict[str, dict[str, list[float]]] = {k: {} for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(iters):  # alternate one profiled iteration of each: machine noise hits both
        for name, fn in fns.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                t = acc[name].setdefault(e.key, [0.0, 0])
                t[0] += e.self_cpu_time_total
                t[1] += e.count
    res = {}
    for name in fns:
        items = sorted(acc[name].items(), key=lambda kv: -kv[1][0])
        total = sum(v[0] for _, v in items)
        gemm = sum(v[0] for k, v in items if k in ("aten::mm", "aten::addmm"))
        res[name] = {
            "self_ms_per_iter": total / 1e3 / iters,
            "top": [
                {"op": k, "self_ms_per_iter": v[0] / 1e3 / iters, "calls_per_iter": v[1] / iters, "share": v[0] / total}
                for k, v in items[:12]
            ],
            "ops_per_iter": sum(v[1] for _, v in items) / iters,
            "gemm_share": gemm / total,
        }
    return res


def kernels(
    device: torch.device,
    with_compiled: bool = True,
    cache_root: str | None = None,
    B: int = 90,
    D: int = 128,
    C: int = 100,
) -> dict:
    """Section 7: kernels per forward+backward of the NIR term (fused, and 0.2.0's layer-by-layer
    path), the FrEIA flow and PML's ProxyAnchorLoss; eager, under bf16 autocast, and compiled.

    ``cache_root``: compile into a fresh inductor cache below it, so that the compile times are
    cold too after section 5's compiles.
    """
    import torch._inductor.config as inductor_config

    if cache_root is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nir_speed_kernels_", dir=cache_root)
        torch._dynamo.reset()
    inductor_config.cpp.enable_kernel_profile = True  # (a different kernel source than section 5's)
    case = build_case(B, D, C, device, loss_options=SPEED_LOSS)
    pa, nir, labels = case.pa, case.nir, case.labels
    assert pa is not None
    # The accelerators' code path, on any device: the fused pass with batched weight gradients.
    nir.nir.flow.fused, nir.nir.flow.batched_weight_grads = True, True
    layers = copy.deepcopy(nir)
    layers.nir.flow.fused = False  # the layers one by one under autograd (nir-loss 0.2.0's path)
    case.extra.append(layers)

    def step(fn: Callable[[torch.Tensor], torch.Tensor], autocast: bool = False) -> Callable[[], None]:
        def f():
            case.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = fn(F.normalize(case.x0, dim=1))
            loss.backward()

        return f

    arms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "nir": lambda e: nir.nir.per_sample_loss(e, nir.proxies, labels).mean(),
        "nir_layers": lambda e: layers.nir.per_sample_loss(e, layers.proxies, labels).mean(),
        "freia": lambda e: case.freia_nll(e, nir.proxies, labels).mean(),
        "proxy_anchor": lambda e: pa(e, labels),
    }
    res: dict = {"eager": {}, "eager_bf16": {}, "compiled": {}, "compile_s": {}}
    for name, fn in arms.items():
        res["eager"][name] = eager_kernel_count(step(fn))
        if name != "proxy_anchor":
            res["eager_bf16"][name] = eager_kernel_count(step(fn, autocast=True))
    if with_compiled:
        compiled_nir = copy.deepcopy(nir)
        compiled_nir.nir.compile_nir()  # what a user switches on: fullgraph, static shape
        case.extra.append(compiled_nir)
        compiled_arms = {
            "nir": lambda e: compiled_nir.nir.per_sample_loss(e, compiled_nir.proxies, labels).mean(),
            "nir_layers": torch.compile(arms["nir_layers"], dynamic=False),
            "freia": torch.compile(arms["freia"], dynamic=False),
            "proxy_anchor": torch.compile(arms["proxy_anchor"], dynamic=False),
        }
        for name, fn in compiled_arms.items():
            w = time.perf_counter()
            step(fn)()
            res["compile_s"][name] = time.perf_counter() - w
            res["compiled"][name] = compiled_kernel_count(step(fn))
    return {"B": B, "D": D, "C": C, **res}
