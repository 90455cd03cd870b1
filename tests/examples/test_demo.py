"""`make demo`: the quality benchmark's experiment at the defaults, over paired seeds."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

import nir_loss

from .helpers import import_example

demo = import_example("demo")
held_out = import_example("held_out")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402

SMALL = ["--dataset", "digits", "--seeds", "0,1", "--dim", "16", "--epochs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.main([*SMALL, "--out", str(out)])


def test_demo_prints_per_seed_and_paired_results_and_writes_them(demo_run, capsys):
    out, record = demo_run
    assert set(record["runs"]) == {"ProxyAnchor", "ProxyAnchor+NIR"}
    for name, runs in record["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(0 < r["mapr"] <= 1 and 0 < r["r1"] <= 1 for r in runs), name
    default_weight = pytest.approx(nir_loss.default_nir_weight(16))
    assert [r["weight"] for r in record["runs"]["ProxyAnchor+NIR"]] == [default_weight] * 2
    for metric in ("r1", "mapr"):
        diffs = [n[metric] - p[metric] for p, n in zip(*record["runs"].values())]
        summary = record["summary"][metric]
        assert summary["mean"] == pytest.approx(sum(diffs) / 2)
        assert summary["worst"] == min(diffs) and summary["worst_seed"] == diffs.index(min(diffs))
        assert summary["wins"] + summary["losses"] <= 2
    text = (out / "digits" / "comparison.txt").read_text()
    assert re.search(r"MAP@R +median [+-]\d\.\d{4} +mean [+-]\d\.\d{4} +wins/losses \d/\d", text)
    assert json.loads((out / "digits" / "comparison.json").read_text())["summary"] == record["summary"]
    assert (out / "digits" / "comparison.png").stat().st_size > 10_000


def test_demo_says_what_a_healthy_nll_is_how_to_read_the_plot_and_what_to_try_next(tmp_path, capsys):
    demo.main(["--dataset", "digits", "--seeds", "3", "--dim", "8", "--epochs", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.index("below about 1,000 is healthy") < printed.index("seed 3:")
    assert "compared at the last epoch" in printed and printed.rstrip().splitlines()[-6] == "Try next:"
    curves = json.loads((tmp_path / "digits" / "comparison.json").read_text())["curves"]
    titles = demo.plot(curves, tmp_path / "again.png", "digits, D = 8, paired seeds 3")
    assert titles[0] == "digits, D = 8, paired seeds 3" and "last epoch" in titles[1]


def test_demo_records_curves_of_every_epoch(demo_run):
    _, record = demo_run
    for name, runs in record["curves"].items():
        for curve in runs:
            assert [r["epoch"] for r in curve] == [1, 2]
            has_nll = [r["nll_mean"] is not None and r["nll_max"] >= r["nll_mean"] for r in curve]
            assert has_nll == [name == "ProxyAnchor+NIR"] * 2
    # The last epoch's curve point is the run's final measurement.
    for curves, runs in zip(record["curves"].values(), record["runs"].values()):
        assert [c[-1]["mapr"] for c in curves] == [r["mapr"] for r in runs]


def test_demo_is_the_quality_benchmarks_experiment(demo_run):
    """Same data, model, training and defaults: the benchmark's runs give the demo's numbers."""
    _, record = demo_run
    for name, arm in (("ProxyAnchor", "pa"), ("ProxyAnchor+NIR", f"{nir_loss.DEFAULT_OBJECTIVE}:1x")):
        bench = quality.run_one("digits", arm, seed=1, dim=16, lr=1e-3, epochs=2)
        shown = record["runs"][name][1]
        assert (bench["r1"], bench["mapr"], bench["nll_mean_max"]) == (
            shown["r1"],
            shown["mapr"],
            shown["nll_mean_max"],
        ), name


def test_paired_differences_count_a_non_finite_run_as_a_total_loss():
    paired = held_out.paired_differences([0.02, -0.15, math.nan, 0.0, 0.01])
    assert paired["worst"] == -1.0 and paired["worst_index"] == 2
    assert (paired["wins"], paired["losses"], paired["collapses"]) == (2, 2, 2)
    assert paired["median"] == 0.0 and paired["mean"] == pytest.approx((0.03 - 1.15) / 5)
