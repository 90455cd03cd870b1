# ruff: noqa: B023, E501  (closures are called within their loop iteration; wide tables)
"""Prints the markdown tables of docs/benchmarks.md from benchmarks/results/*.json.

    python benchmarks/report.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def command(argv, name):
    """The recorded argv, with ``--out`` naming the committed results file (runs wrote to /tmp first)."""
    argv = list(argv)
    if "--out" in argv:
        argv[argv.index("--out") + 1] = f"benchmarks/results/{name}"
    return " ".join(argv)


def speed(d, name="speed.json"):
    from speed import flow_flops_per_row
    m = d["meta"]
    # Matrix FLOPs without the per-class context projection (results written before that fix
    # counted it per row): recompute from the measured rows/s.
    for r in d.get("matrix", []):
        r["flop_per_s"] = r["rows_per_s"] * flow_flops_per_row(r["D"], context=False)
    rf = d.get("roofline")
    if rf:
        for row in rf["rows"]:
            if row["pass"].startswith("matrix"):
                best = max((r for r in d["matrix"] if r["D"] == row["D"]), key=lambda r: r["flop_per_s"])
                row["flop_per_s"] = best["flop_per_s"]
                row["fraction_of_peak"] = best["flop_per_s"] / rf["peak_flop_per_s"]
    print(f"### Speed (`speed.py {command(m['argv'], name)}`: {m['total_seconds']:.0f} s wall, "
          f"{m['threads']} torch thread, {m['time_base']})\n")
    if not d.get("loss"):
        for r in d.get("resnet_step", []):
            print(f"ResNet50 step, {r['batch']} images of {r['image_size']} px, D=128, C=100, medians of "
                  f"{m['argv']}: ProxyAnchor {r['pa_step']*1e3:.0f} ms, ProxyAnchor+NIR {r['nir_step']*1e3:.0f} ms, "
                  f"NIR term alone {r['nir_term']*1e3:.1f} ms = **{r['nir_term_share']:.1%}** of the step; step "
                  f"difference {r['nir_share_of_step']:.1%}.\n")
        return
    print("| B | D | C | PA ms | PA+NIR ms | PA+FrEIA ms | NIR/PA | FrEIA/PA | NIR/FrEIA | NIR term / FrEIA term "
          "| saved MB PA / NIR / FrEIA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in d.get("loss", []):
        term = f"{r['nir_term_over_freia_term']:.2f}" if r["C"] <= 1000 else "(PA-dominated)"
        print(f"| {r['B']} | {r['D']} | {r['C']} | {r['pa_s']*1e3:.1f} | {r['nir_s']*1e3:.1f} | {r['freia_s']*1e3:.1f} | "
              f"{r['nir_over_pa']:.2f} | {r['freia_over_pa']:.2f} | **{r['nir_over_freia']:.2f}** | {term} | "
              f"{r['pa_peak_bytes']/2**20:.1f} / {r['nir_peak_bytes']/2**20:.1f} / {r['freia_peak_bytes']/2**20:.1f} |")
    print("\n| D | B x C | chunk (samples) | rows/pass | rows/s | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in d.get("matrix", []):
        print(f"| {r['D']} | {r['B']} x {r['C']} | {r['chunk']} | {r['rows_per_pass']} | {r['rows_per_s']:.0f} | "
              f"{r['flop_per_s']/1e9:.1f} |")
    rf = d.get("roofline")
    if rf:
        print("\nMeasured dense matmul: " + ", ".join(f"{k}: {v/1e9:.0f} GFLOP/s" for k, v in rf["matmul_flop_per_s"].items()))
        print("\n| pass | D | B | achieved GFLOP/s | fraction of best matmul |")
        print("|---|---|---|---|---|")
        for r in rf["rows"]:
            print(f"| {r['pass']} | {r['D']} | {r.get('B', '')} | {r['flop_per_s']/1e9:.1f} | {r['fraction_of_peak']:.0%} |")
    for r in d.get("resnet_step", []):
        print(f"\nResNet50 step (B={r['batch']}, {r['image_size']} px, D=128, C=100): ProxyAnchor "
              f"{r['pa_step']*1e3:.0f} ms, ProxyAnchor+NIR {r['nir_step']*1e3:.0f} ms; NIR term alone "
              f"{r['nir_term']*1e3:.1f} ms = **{r['nir_term_share']:.1%}** of the NIR step; step difference "
              f"{r['nir_share_of_step']:.1%} (includes the flow's optimizer update, and noise).")
    print()


def quality(d, title, name=""):
    import statistics
    m = d["meta"]
    print(f"### {title} (`quality.py {command(m['argv'], name)}`: {m['total_seconds']/60:.1f} min wall, "
          f"{m['threads']} torch thread, base lr {m['lr']}, D={m['dim']})\n")
    # Paired per-seed differences, for the median (robust to a single collapsed seed).
    by_key = {}
    for r in d["runs"]:
        by_key.setdefault((r["dataset"], r["proxy_lr_mult"], r["flow_lr_mult"], r["seed"]), {})[r["arm"]] = r
    print("| data | lr x (proxy, flow) | arm | seeds | R@1 mean ± std | ΔR@1 vs PA (paired) | W/L | MAP@R mean ± std "
          "| ΔMAP@R vs PA (paired) | median ΔMAP@R | W/L | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in d["summary"]:
        diffs = [a[r["arm"]]["mapr"] - a["pa"]["mapr"] for (ds, pm, fm, _), a in by_key.items()
                 if (ds, pm, fm) == (r["dataset"], r["proxy_lr_mult"], r["flow_lr_mult"]) and "pa" in a and r["arm"] in a]
        med = "—" if r["arm"] == "pa" or not diffs else f"{statistics.median(diffs):+.4f}"
        d1 = "—" if r["arm"] == "pa" else f"{r['d_r1']:+.4f} ± {r['d_r1_std']:.4f}"
        d2 = "—" if r["arm"] == "pa" else f"{r['d_mapr']:+.4f} ± {r['d_mapr_std']:.4f}"
        wl1 = "" if r["arm"] == "pa" else f"{r['wins_r1']}/{r['losses_r1']}"
        wl2 = "" if r["arm"] == "pa" else f"{r['wins_mapr']}/{r['losses_mapr']}"
        print(f"| {r['dataset']} | {r['proxy_lr_mult']:g}, {r['flow_lr_mult']:g} | {r['arm']} | {r['n']} | "
              f"{r['r1']:.4f} ± {r['r1_std']:.4f} | {d1} | {wl1} | {r['mapr']:.4f} ± {r['mapr_std']:.4f} | {d2} | {med} | "
              f"{wl2} | {r['seconds']:.0f} |")
    print()


def profile(d):
    prof = d["profile"]
    for ours, theirs in (("nir", "freia"), ("nir_compiled", "freia_compiled")):
        if ours not in prof:
            continue
        a, b = prof[ours], prof[theirs]
        print(f"| rank | {ours}: op | ms/iter | calls | share | {theirs}: op | ms/iter | calls | share |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i, (x, y) in enumerate(zip(a["top"], b["top"])):
            print(f"| {i+1} | {x['op'][:45]} | {x['self_ms_per_iter']:.2f} | {x['calls_per_iter']:.0f} | {x['share']:.0%} | "
                  f"{y['op'][:45]} | {y['self_ms_per_iter']:.2f} | {y['calls_per_iter']:.0f} | {y['share']:.0%} |")
        gemm = (f" (GEMMs {a['gemm_share']:.0%})", f" (GEMMs {b['gemm_share']:.0%})") if "gemm_share" in a else ("", "")
        print(f"| total | {a['ops_per_iter']:.0f} op calls{gemm[0]} | {a['self_ms_per_iter']:.1f} | | | "
              f"{b['ops_per_iter']:.0f} op calls{gemm[1]} | {b['self_ms_per_iter']:.1f} | | |\n")


def compiled(d):
    c = d.get("compiled")
    if not c:
        return
    print("| B | D | NIR eager ms | NIR compiled ms | FrEIA eager ms | FrEIA compiled ms | NIR / FrEIA | "
          "NIR compiled / FrEIA | FrEIA compiled / FrEIA | NIR compiled / FrEIA compiled | GEMMs alone / FrEIA | "
          "compile s (NIR, FrEIA) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in c["term"]:
        print(f"| {r['B']} | {r['D']} | {r['nir_s']*1e3:.1f} | {r['nir_compiled_s']*1e3:.1f} | {r['freia_s']*1e3:.1f} | "
              f"{r['freia_compiled_s']*1e3:.1f} | {r['nir_over_freia']:.2f} | **{r['nir_compiled_over_freia']:.2f}** | "
              f"{r['freia_compiled_over_freia']:.2f} | {r['nir_compiled_over_freia_compiled']:.2f} | "
              f"{r['gemm_floor_over_freia']:.2f} | {r['nir_compiled_compile_s']:.0f}, {r['freia_compiled_compile_s']:.0f} |")
    w = c["whole_loss"]
    print(f"\nWhole loss, `torch.compile(ProxyAnchorNIRLoss(...))`, B={w['B']} D={w['D']} C={w['C']}: eager "
          f"{w['loss_s']*1e3:.1f} ms, compiled {w['loss_compiled_s']*1e3:.1f} ms = **{w['compiled_over_eager']:.2f}x** "
          f"(first call {w['compile_s']:.0f} s).\n")


# (selector, results file, heading) of each quality table on docs/benchmarks.md, in page order.
QUALITY_TABLES = [
    ("quality", "quality.json", "Quality, default run (0.2.0)"),
    ("quality010", "quality_0.1.0.json", "Quality, default run on 0.1.0 (same command, same seeds)"),
    ("seeds15", "quality_pig_15seeds.json", "PigCVP, 15 seeds, weight 0.01 (0.2.0)"),
    ("seeds15", "quality_pig_15seeds_w0.005.json", "PigCVP, 15 seeds, weight 0.005 (0.2.0)"),
    ("seeds15", "quality_pig_15seeds_w0.003.json", "PigCVP, 15 seeds, weight 0.003 (0.2.0)"),
    ("sweep", "quality_sweep.json", "Sweep, PigCVP, 0.1.0"),
    ("digits", "quality_sweep_digits.json", "Sweep, digits (small weights), 0.1.0"),
    ("narrow", "quality_sweep_pig_narrow.json", "Sweep, PigCVP around nll 0.01, 5 seeds, 0.1.0"),
    ("d512", "quality_sweep_pig_d512.json", "Sweep, PigCVP at D = 512, 0.1.0"),
    ("d512scaled", "quality_sweep_pig_d512_scaled.json", "PigCVP at D = 512, weight 1.28 / D (0.2.0)"),
    ("d512seeds15", "quality_pig_d512_15seeds.json", "PigCVP at D = 512, weight 1.28 / D, 15 seeds (0.2.0)"),
]


if __name__ == "__main__":
    which = sys.argv[1:] or ["speed", "resnet", "profile", "compiled", *dict.fromkeys(k for k, _, _ in QUALITY_TABLES)]
    if "speed" in which and load("speed.json"):
        speed(load("speed.json"))
    if "resnet" in which and load("speed_resnet.json"):
        speed(load("speed_resnet.json"), "speed_resnet.json")
    if "profile" in which and load("speed.json") and "profile" in load("speed.json"):
        profile(load("speed.json"))
    if "compiled" in which and load("speed.json"):
        compiled(load("speed.json"))
    for key, name, title in QUALITY_TABLES:
        if key in which and load(name):
            quality(load(name), title, name)
