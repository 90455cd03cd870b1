"""examples/pml_style.py runs end to end and learns."""

from __future__ import annotations

import math

from .helpers import import_example

pml_style = import_example("pml_style")


def test_pml_style_example_trains_and_improves_retrieval(capsys):
    history = pml_style.main(["--epochs", "1"])
    assert len(history) == 2
    assert all(math.isfinite(a[k]) for a in history for k in ("precision_at_1", "mean_average_precision_at_r"))
    before, after = (a["mean_average_precision_at_r"] for a in history)
    assert after > before + 0.05, (before, after)  # one epoch: about 0.41 -> 0.6
    out = capsys.readouterr().out
    assert "Epoch 1 Iteration 0: Loss = " in out and "mean NLL = " in out
    assert out.startswith("Test set before training: Precision@1 = ") and "Test set after epoch 1:" in out
    summary = out.rstrip().splitlines()[-1]
    assert summary.startswith("Summary: 1 epochs in ") and f"MAP@R {before:.3f} -> {after:.3f}" in summary


def test_pml_style_example_max_steps_limits_an_epoch(capsys):
    pml_style.main(["--epochs", "1", "--max-steps", "2"])
    out = capsys.readouterr().out
    assert out.count("Iteration") == 1  # iterations 0 and 1; printed every 10
