# ruff: noqa: B023, E501  (closures are called within their loop iteration; wide tables)
"""Renders the tables and the plot of docs/benchmarks.md from benchmarks/results/<version>/*.json.

    python benchmarks/report.py            # speed and quality, from the newest version of each
    python benchmarks/report.py quality    # one of them (speed, quality, pretrained, finetune,
                                           # learning_rate, adam_moments)

Tables go to ``<results file>.md`` beside each results file (docs/benchmarks.md includes them);
the quality plots go to docs/img/<name>.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def latest(name: str) -> Path | None:
    """``results/<version>/name`` of the newest version that has it."""
    found = sorted(RESULTS.glob(f"*/{name}"), key=lambda p: tuple(int(v) for v in p.parent.name.split(".")))
    return found[-1] if found else None


def load(name):
    p = latest(name)
    return json.loads(p.read_text()) if p else None


def command(argv, name):
    """The recorded argv, with ``--out`` naming the committed results file (runs wrote to /tmp first)."""
    argv = list(argv)
    if "--out" in argv:
        path = latest(name)
        argv[argv.index("--out") + 1] = f"benchmarks/results/{path.parent.name + '/' if path else ''}{name}"
    return " ".join(argv)


def arm_cell(arm: str) -> str:
    """An arm's name for a table cell: its options after a space, where the page may wrap it."""
    parts = arm.split(":")
    return ":".join(p for p in parts if "=" not in p) + "".join(f" :{p}" for p in parts if "=" in p)


def p_cell(p: float) -> str:
    """A sign-flip p-value for a table: two digits, bold where the difference is beyond noise."""
    text = "<0.01" if p < 0.01 else f"{p:.2f}"
    return f"**{text}**" if p < 0.05 else text


def speed(d, name="speed.json"):
    m = d["meta"]
    print(
        f"Command: `{('python benchmarks/speed.py ' + command(m['argv'], name)).strip()}` "
        f"({m['total_seconds']:.0f} s wall, {m['threads']} torch thread, {m['time_base']}).\n"
    )
    if not d.get("loss"):
        for r in d.get("resnet_step", []):
            print(
                f"ResNet50 step, {r['batch']} images of {r['image_size']} px, D=128, C=100, medians of "
                f"{m['argv']}: ProxyAnchor {r['pa_step'] * 1e3:.0f} ms, ProxyAnchor+NIR {r['nir_step'] * 1e3:.0f} ms, "
                f"NIR term alone {r['nir_term'] * 1e3:.1f} ms = **{r['nir_term_share']:.1%}** of the step; step "
                f"difference {r['nir_share_of_step']:.1%}.\n"
            )
        return
    print("Loss forward + backward, ms (medians), and NIR's time as a fraction of FrEIA's:\n")
    print("| B, D, C | PA | PA+NIR | PA+FrEIA | NIR / FrEIA | term / term |")
    print("|---|---|---|---|---|---|")
    for r in d.get("loss", []):
        term = f"{r['nir_term_over_freia_term']:.2f}" if r["C"] <= 1000 else "(PA-bound)"
        print(
            f"| {r['B']}, {r['D']}, {r['C']} | {r['pa_s'] * 1e3:.1f} | {r['nir_s'] * 1e3:.1f} | "
            f"{r['freia_s'] * 1e3:.1f} | **{r['nir_over_freia']:.2f}** | {term} |"
        )
    print("\nAgainst ProxyAnchor alone, and activation memory saved for backward (MB):\n")
    print("| B | D | C | NIR / PA | FrEIA / PA | MB: PA / NIR / FrEIA |")
    print("|---|---|---|---|---|---|")
    for r in d.get("loss", []):
        print(
            f"| {r['B']} | {r['D']} | {r['C']} | {r['nir_over_pa']:.2f} | {r['freia_over_pa']:.2f} | "
            f"{r['pa_peak_bytes'] / 2**20:.1f} / {r['nir_peak_bytes'] / 2**20:.1f} / "
            f"{r['freia_peak_bytes'] / 2**20:.1f} |"
        )
    print("\n| D | B x C | chunk (samples) | rows/pass | rows/s | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in d.get("matrix", []):
        print(
            f"| {r['D']} | {r['B']} x {r['C']} | {r['chunk']} | {r['rows_per_pass']} | {r['rows_per_s']:.0f} | "
            f"{r['flop_per_s'] / 1e9:.1f} |"
        )
    rf = d.get("roofline")
    if rf:
        print(
            "\nMeasured dense matmul: "
            + ", ".join(f"{k}: {v / 1e9:.0f} GFLOP/s" for k, v in rf["matmul_flop_per_s"].items())
        )
        print("\n| pass | D | B | achieved GFLOP/s | fraction of best matmul |")
        print("|---|---|---|---|---|")
        for r in rf["rows"]:
            print(
                f"| {r['pass']} | {r['D']} | {r.get('B', '')} | {r['flop_per_s'] / 1e9:.1f} | {r['fraction_of_peak']:.0%} |"
            )
    for r in d.get("resnet_step", []):
        print(
            f"\nResNet50 step (B={r['batch']}, {r['image_size']} px, D=128, C=100): ProxyAnchor "
            f"{r['pa_step'] * 1e3:.0f} ms, ProxyAnchor+NIR {r['nir_step'] * 1e3:.0f} ms; NIR term alone "
            f"{r['nir_term'] * 1e3:.1f} ms = **{r['nir_term_share']:.1%}** of the NIR step; step difference "
            f"{r['nir_share_of_step']:.1%} (includes the flow's optimizer update, and noise)."
        )
    print()


def quality(d, out_md: Path | None = None, out_png: Path | None = None) -> str:
    """The quality tables (markdown) of a ``quality.py`` results file, and its per-seed plot."""
    import quality as quality_benchmark  # torch and the examples: only for the quality tables

    m = d["meta"]
    rows = quality_benchmark.summarize(d["runs"])  # from the runs: files written before a column existed
    seeds = sorted({r["seed"] for r in d["runs"]})
    script = m.get("script", "quality.py")
    # A file grown by several invocations (--resume) lists each command, oldest first.
    invocations = [*m.get("history", []), m]
    commands = "; ".join(f"`{' '.join([f'python benchmarks/{script}', *i['argv']])}`" for i in invocations)
    minutes = sum(i.get("total_seconds", 0) for i in invocations) / 60
    lines = [
        f"Command{'s' if len(invocations) > 1 else ''}: {commands} ({minutes:.0f} min on "
        f"{m['machine']}, {m['jobs']} runs in parallel, one torch thread each; nir-loss {m['version']}, "
        f"torch {m['torch']}). Seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}), paired.",
        "",
    ]
    nir_rows = [r for r in rows if r["arm"] != "pa"]
    # One D for every row: said once above the tables, so that they fit the page's column.
    dims = {r["dim"] for r in rows}
    one_dim = len(dims) == 1
    at = f" (D = {next(iter(dims))})" if one_dim else ""
    head = "data" if one_dim else "data, D"

    def data(r: dict) -> str:
        return r["dataset"] if one_dim else f"{r['dataset']}, {r['dim']}"

    if any(r.get("baseline", "pa") != "pa" for r in nir_rows):
        lines += [
            "An arm at another learning rate (`:lrx=M`, M times the base lr) is compared with "
            "ProxyAnchor at the same rate (`pa:lrx=M`) where the file has it; `pa:lrx=M` itself "
            "with `pa`.",
            "",
        ]
    lines += [
        f"MAP@R, paired difference against ProxyAnchor{at}; p: the paired sign-flip test of the mean "
        "difference, two-sided (bold: below 0.05, beyond the noise of the seeds):",
        "",
        f"| {head} | arm | median / mean | W/L (p) | worst (seed) | collapses |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {data(r)} | {arm_cell(r['arm'])} | **{r['d_mapr_median']:+.3f}** / {r['d_mapr']:+.3f} | "
        f"{r['wins_mapr']}/{r['losses_mapr']} ({p_cell(r['p_mapr'])}) | {r['worst_mapr']:+.3f} ({r['worst_seed_mapr']}) | "
        f"{r['collapses']} |"
        for r in nir_rows
    ]
    lines += [
        "",
        f"R@1, paired difference against ProxyAnchor{at}, and the largest per-sample training NLL:",
        "",
        f"| {head} | arm | median / mean | W/L | max NLL |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {data(r)} | {arm_cell(r['arm'])} | {r['d_r1_median']:+.3f} / {r['d_r1']:+.3f} | "
        f"{r['wins_r1']}/{r['losses_r1']} | {'' if r['nll_peak_max'] is None else format(r['nll_peak_max'], '.3g')} |"
        for r in nir_rows
    ]
    base = {(r["dataset"], r["dim"]): r for r in rows if r["arm"] == "pa"}
    lines += [
        "",
        "ProxyAnchor alone (the paired baseline), mean over the seeds:",
        "",
        "| data | D | R@1 | MAP@R |",
        "|---|---|---|---|",
    ]
    for (ds, dim), r in base.items():
        lines.append(f"| {ds} | {dim} | {r['r1']:.4f} | {r['mapr']:.4f} |")
    text = "\n".join(lines) + "\n"
    if out_md is not None:
        out_md.write_text(text)
    if out_png is not None:
        _quality_plot(d, out_png)
    return text


def adam_moments(d, out_md: Path | None = None) -> str:
    """adam_moments.json: the quality tables, and each NIR arm against its ``:adam=pa_direction``
    twin, which takes the same steps' scale but ProxyAnchor's direction: what the term's own
    gradient direction adds."""
    import quality as quality_benchmark

    text = quality(d)
    lines = [
        "",
        "MAP@R, NIR against the same arm with `:adam=pa_direction` (what the term's own gradient "
        "direction adds, at the same step sizes):",
        "",
        "| data, D | arm | median / mean | W/L (p) | worst (seed) |",
        "|---|---|---|---|---|",
    ]
    for ds, dim in dict.fromkeys((r["dataset"], r["dim"]) for r in d["runs"]):
        by_arm: dict[str, dict[int, float]] = {}
        for r in d["runs"]:
            if (r["dataset"], r["dim"]) == (ds, dim):
                by_arm.setdefault(r["arm"], {})[r["seed"]] = r["mapr"]
        for twin, twin_runs in by_arm.items():
            whole = twin.removesuffix(":adam=pa_direction")
            if whole == twin or whole not in by_arm:
                continue
            seeds = sorted(set(twin_runs) & set(by_arm[whole]))
            s = quality_benchmark.held_out.paired_differences([by_arm[whole][k] - twin_runs[k] for k in seeds])
            lines.append(
                f"| {ds}, {dim} | {arm_cell(whole)} | **{s['median']:+.3f}** / {s['mean']:+.3f} | "
                f"{s['wins']}/{s['losses']} ({p_cell(s['p'])}) | {s['worst']:+.3f} ({seeds[s['worst_index']]}) |"
            )
    text += "\n".join(lines) + "\n"
    if out_md is not None:
        out_md.write_text(text)
    return text


def _quality_plot(d, path: Path) -> None:
    """Paired per-seed MAP@R differences against ProxyAnchor, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = d["runs"]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    # Two panels a row: the page shows the figure at about 700 px, where this text stays readable.
    rows = -(-len(datasets) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(7.5, 3.3 * rows + 0.5), squeeze=False, sharey=True)
    for ax in axes.flat[len(datasets) :]:
        ax.set_visible(False)
    for ax, ds in zip(axes.flat, datasets):
        base = {(r["dim"], r["seed"]): r["mapr"] for r in runs if r["dataset"] == ds and r["arm"] == "pa"}
        groups = list(dict.fromkeys((r["dim"], r["arm"]) for r in runs if r["dataset"] == ds and r["arm"] != "pa"))
        for i, (dim, arm) in enumerate(groups):
            diffs = [
                r["mapr"] - base[(dim, r["seed"])]
                for r in runs
                if r["dataset"] == ds and r["arm"] == arm and r["dim"] == dim and (dim, r["seed"]) in base
            ]
            ax.scatter([i] * len(diffs), diffs, s=12, alpha=0.6)
            ax.plot([i - 0.3, i + 0.3], [sorted(diffs)[len(diffs) // 2]] * 2, color="k", lw=1.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(-0.1, color="red", lw=0.6, ls=":")
        ax.set_xticks(range(len(groups)), [f"D={dim}\n{arm}" for dim, arm in groups], fontsize=10)
        ax.tick_params(axis="y", labelsize=10)
        ax.set_title(ds, fontsize=12)
    for row in axes:
        row[0].set_ylabel("MAP@R − ProxyAnchor\n(same seed)", fontsize=11)
    fig.suptitle(
        "Held-out classes: paired MAP@R difference per seed\n(bar: median; dotted: collapse line)", fontsize=12
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compiled(d):
    c = d.get("compiled")
    if not c:
        return
    print("\n`torch.compile` (inductor) of the NIR term and of the FrEIA flow, ms:\n")
    print("| B | D | NIR eager | NIR compiled | FrEIA eager | FrEIA compiled | compile s (NIR, FrEIA) |")
    print("|---|---|---|---|---|---|---|")
    for r in c["term"]:
        print(
            f"| {r['B']} | {r['D']} | {r['nir_s'] * 1e3:.1f} | {r['nir_compiled_s'] * 1e3:.1f} | "
            f"{r['freia_s'] * 1e3:.1f} | {r['freia_compiled_s'] * 1e3:.1f} | "
            f"{r['nir_compiled_compile_s']:.0f}, {r['freia_compiled_compile_s']:.0f} |"
        )
    print("\nThe same as fractions of FrEIA's eager time (\"GEMMs alone\": the term's matrix products and")
    print("nothing else, the floor that no fusion can go below):\n")
    print("| B | D | NIR | NIR compiled | FrEIA compiled | GEMMs alone |")
    print("|---|---|---|---|---|---|")
    for r in c["term"]:
        print(
            f"| {r['B']} | {r['D']} | {r['nir_over_freia']:.2f} | **{r['nir_compiled_over_freia']:.2f}** | "
            f"{r['freia_compiled_over_freia']:.2f} | {r['gemm_floor_over_freia']:.2f} |"
        )
    w = c["whole_loss"]
    print(
        f"\nWhole loss, `torch.compile(ProxyAnchorNIRLoss(...))`, B={w['B']} D={w['D']} C={w['C']}: eager "
        f"{w['loss_s'] * 1e3:.1f} ms, compiled {w['loss_compiled_s'] * 1e3:.1f} ms = "
        f"**{w['compiled_over_eager']:.2f}x** (first call {w['compile_s']:.0f} s).\n"
    )


def kernels(d) -> str:
    """The kernel-count table of section 7 (``--sections kernels``), as markdown."""
    k = d.get("kernels")
    if not k:
        return ""
    rows = [
        ("nir", "NIR term (fused pass, the default)"),
        ("nir_layers", "NIR term, `fused=False` (0.2.0's path)"),
        ("freia", "FrEIA flow of the same shape"),
        ("proxy_anchor", "PML `ProxyAnchorLoss`"),
    ]
    lines = [
        f"B = {k['B']}, D = {k['D']}, C = {k['C']}; one step = normalize the embeddings, the per-sample",
        "term, its mean, backward.",
        "",
        "| | eager ops | of which GEMMs | eager, bf16 autocast | compiled: kernels + GEMMs |",
        "|---|---|---|---|---|",
    ]
    for key, label in rows:
        eager, bf16, comp = k["eager"].get(key), k.get("eager_bf16", {}).get(key), k.get("compiled", {}).get(key)
        compiled_cell = f"{comp['fused']} + {comp['gemm']} = {comp['graph_launches']:,}" if comp else ""
        cells = [f"{eager['total']:,}", str(eager["gemm"]), f"{bf16['total']:,}" if bf16 else "", compiled_cell]
        if key == "nir":
            cells = [f"**{c}**" if c and i != 1 else c for i, c in enumerate(cells)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def profile(d) -> str:
    """The top ops of section 6 (``--sections profile``) as plain text: too wide for a page."""
    lines = []
    for name, r in d.get("profile", {}).items():
        lines.append(
            f"{name}: {r['self_ms_per_iter']:.1f} ms/iter self CPU (profiled), {r['ops_per_iter']:.0f} op calls/iter, "
            f"GEMMs {r['gemm_share']:.0%}"
        )
        lines += [
            f"   {t['op'][:48]:48} {t['self_ms_per_iter']:7.2f} ms {t['share']:6.1%} {t['calls_per_iter']:6.0f} calls"
            for t in r["top"]
        ]
    return "\n".join(lines) + "\n" if lines else ""


def speed_tables(d) -> str:
    """Every speed table of one ``speed.py`` results file, as markdown."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        speed(d)
        compiled(d)  # (the profiles of section 6 stay in the JSON: too wide for a page)
    return buf.getvalue()


if __name__ == "__main__":
    which = sys.argv[1:] or ["speed", "quality", "pretrained", "finetune", "learning_rate", "adam_moments"]
    # Each rendering is written where the docs include it from (a snippet beside its results file,
    # the plot into docs/img) and printed.
    path = latest("speed.json")
    if "speed" in which and path:
        d = json.loads(path.read_text())
        text = speed_tables(d)
        path.with_suffix(".md").write_text(text)
        path.with_name("speed_kernels.md").write_text(kernels(d))
        print(text + kernels(d))
    # quality.json: small models from scratch; pretrained.json: frozen ImageNet features and a head;
    # finetune.json: the whole pretrained network fine-tuned by the example trainer;
    # learning_rate.json: ProxyAnchor at other learning rates, the control of NIR's gains.
    for name in ("quality", "pretrained", "finetune", "learning_rate"):
        path = latest(f"{name}.json")
        if name in which and path:
            docs = RESULTS.parents[1] / "docs"
            # The control's arms are paired with ProxyAnchor at their own rate: a table, no plot.
            png = None if name == "learning_rate" else docs / "img" / f"{name}.png"
            print(quality(json.loads(path.read_text()), path.with_suffix(".md"), png))
    # adam_moments.json: NIR's effect split between Adam's step sizes and the term's direction.
    path = latest("adam_moments.json")
    if "adam_moments" in which and path:
        print(adam_moments(json.loads(path.read_text()), path.with_suffix(".md")))
