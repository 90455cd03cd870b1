"""The benchmark suite's parts: arm parsing, a paired run, the summary's statistics, the report."""

import json
import math
import sys
from pathlib import Path

import pytest

import nir_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402
import report  # noqa: E402


def test_arms_are_relative_to_the_default_weight():
    assert quality.parse_arm("pa", 128) == (None, nir_loss.DEFAULT_FLOW_LR_MULT)
    nir, flow_lr_mult = quality.parse_arm("nll:3x", 64)
    assert nir == {"objective": "nll", "nir_weight": pytest.approx(3 * nir_loss.default_nir_weight(64))}
    assert flow_lr_mult == nir_loss.DEFAULT_FLOW_LR_MULT
    nir, flow_lr_mult = quality.parse_arm("nll:0.01:noisenorm=0.5:radius=inf:flowlr=10", 25)
    assert nir["nir_weight"] == 0.01 and nir["noise_std"] == pytest.approx(0.1) and math.isinf(nir["guard_radius"])
    assert flow_lr_mult == 10
    with pytest.raises(SystemExit):
        quality.parse_arm("nll:1x:lr=3", 32)


def test_one_seed_reruns_identically_and_pairs_with_proxy_anchor():
    a = quality.run_one("digits", "nll:1x", seed=1, dim=16, lr=1e-3, epochs=1)
    b = quality.run_one("digits", "nll:1x", seed=1, dim=16, lr=1e-3, epochs=1)
    assert (a["r1"], a["mapr"]) == (b["r1"], b["mapr"])
    assert len(a["nll_mean_max"]) == 1 and a["nll_mean_max"][0][1] >= a["nll_mean_max"][0][0]
    pa = quality.run_one("digits", "pa", seed=1, dim=16, lr=1e-3, epochs=1)
    assert pa["nll_mean_max"] == [] and 0 < pa["mapr"] <= 1


def _run(arm, seed, mapr, r1=0.9):
    return {
        "dataset": "x",
        "dim": 8,
        "arm": arm,
        "seed": seed,
        "weight": None if arm == "pa" else 1.0,
        "mapr": mapr,
        "r1": r1,
        "seconds": 1.0,
        "nonfinite": math.isnan(mapr),
        "nll_mean_max": [] if arm == "pa" else [(1.0, 5.0 + seed)],
    }


def test_summary_reports_median_worst_seed_and_collapses():
    base = [0.5, 0.6, 0.7, 0.5]
    nir = [0.52, 0.62, 0.55, math.nan]  # seed 2 drops 0.15 (a collapse), seed 3 went non-finite
    runs = [_run("pa", s, m) for s, m in enumerate(base)] + [_run("nll", s, m) for s, m in enumerate(nir)]
    (pa_row, row) = quality.summarize(runs)
    assert pa_row["arm"] == "pa" and row["arm"] == "nll"
    assert row["wins_mapr"] == 2 and row["losses_mapr"] == 2
    assert row["worst_mapr"] == -1.0 and row["worst_seed_mapr"] == 3  # a non-finite run counts as a total loss
    assert row["collapses"] == 2 and row["nonfinite"] == 1
    assert row["d_mapr_median"] == pytest.approx(statistics_median([0.02, 0.02, -0.15, -1.0]))
    assert row["nll_peak_max"] == 8.0


def statistics_median(values):
    values = sorted(values)
    return (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


@pytest.mark.parametrize("name", ["speed", "quality"])
def test_the_docs_tables_are_the_reports_rendering_of_the_committed_results(name, tmp_path):
    """docs/benchmarks.md includes the tables that `python benchmarks/report.py` writes."""
    path = report.latest(f"{name}.json")
    data = json.loads(path.read_text())
    if name == "speed":
        assert path.with_suffix(".md").read_text() == report.speed_tables(data)
        assert path.with_name("speed_kernels.md").read_text() == report.kernels(data)
        assert "| NIR term (fused pass, the default) | **" in report.kernels(data)
    else:
        rendered = report.quality(data, tmp_path / "quality.md", tmp_path / "quality.png")
        assert path.with_suffix(".md").read_text() == (tmp_path / "quality.md").read_text()
        assert rendered and (tmp_path / "quality.png").stat().st_size > 10_000
