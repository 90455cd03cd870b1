"""The CUB trainer's --check-nir: paired runs on a validation split of the training classes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from .helpers import FAST_TRAIN_ARGS, import_example, make_mini_cub

train_cub = import_example("train")
check = import_example("trainer.check")
held_out = import_example("held_out")

# 12 classes: the DML split trains on 6, which the check splits into 3 that train and 3 that validate.
FAST = [*FAST_TRAIN_ARGS, "--batch-size", "6", "--eval-batch-size", "32", "--epochs", "1"]
# The smallest pretrained trunk: its drop-connect draws random numbers in every training step.
LITE0 = ["--arch", "efficientnet_lite0", "--weights", "imagenet"]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_mini_cub(tmp_path_factory.mktemp("cub12"), num_classes=12, per_class=4, size=32)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_check_pairs_its_runs_and_writes_the_table(cub, tmp_path, capsys):
    """At a negligible weight every NIR run retraces its seed's baseline: the same model, proxies, batches,
    crops and drop-connect masks, although the NIR term draws its training noise in every step."""
    out = tmp_path / "check"
    argv = ["--data", str(cub), "--out", str(out), *FAST, *LITE0]
    record = train_cub.main([*argv, "--check-nir", "1e-9", "--check-seeds", "2", "--seed", "5"])
    printed = capsys.readouterr().out
    assert record["seeds"] == [5, 6] and record["classes"] == {"train": 3, "validation": 3}
    assert record["weights"] == {"1e-9": 1e-9} and record["baseline"] == "ProxyAnchor"
    base_losses = []
    for seed in (5, 6):
        base, nir = _losses(out / f"seed{seed}" / "baseline"), _losses(out / f"seed{seed}" / "nir-1e-9")
        assert nir == pytest.approx(base, rel=1e-6, abs=0)
        base_losses += base
        assert not (out / f"seed{seed}" / "baseline" / "last.pt").exists()  # metrics only, no checkpoints
    assert base_losses[0] != pytest.approx(base_losses[1], rel=1e-3)  # seeds do differ
    for metric in ("mapr", "r1"):
        base = [r[metric] for r in record["runs"]["ProxyAnchor"]]
        arm = [r[metric] for r in record["runs"]["1e-9"]]
        assert all(0 < v <= 1 for v in base + arm)
        assert record["paired"][metric]["1e-9"] == held_out.paired_differences([a - b for a, b in zip(arm, base)])
    # A negligible weight cannot clear the bar: the advice is to leave NIR off.
    assert record["recommendation"]["weight"] == 0.0 and record["recommendation"]["label"] is None
    assert json.loads((out / "check_nir.json").read_text()) == record
    assert "trains on 3 classes (12 images), validates on 3 (12 images)" in printed
    assert "MAP@R, NIR minus ProxyAnchor, paired by seed:" in printed
    assert "recommendation: NIR did not beat ProxyAnchor on the validation classes" in printed
    assert "this trainer: --nir off\n" in printed


def test_a_diverged_run_is_a_collapse_not_the_end_of_the_check(cub, tmp_path, capsys, monkeypatch):
    real_fit = check.fit

    def diverging_fit(cfg, *args, **kwargs):
        if "NIR" in cfg.run_name:
            raise FloatingPointError("non-finite loss nan at epoch 1 step 0")
        return real_fit(cfg, *args, **kwargs)

    monkeypatch.setattr(check, "fit", diverging_fit)
    record = train_cub.main(
        ["--data", str(cub), "--out", str(tmp_path), *FAST, "--check-nir", "1x", "--check-seeds", "1"]
    )
    assert record["runs"]["1x"] == [{"seed": 0, "mapr": None, "r1": None}]
    assert record["paired"]["mapr"]["1x"]["collapses"] == 1 and record["recommendation"]["weight"] == 0.0
    assert "non-finite loss nan at epoch 1 step 0: counted as a collapse" in capsys.readouterr().out


def test_summary_names_the_recommended_weight_and_prints_every_arm():
    runs = {
        "ProxyAnchor": [{"seed": s, "mapr": m, "r1": 0.5} for s, m in enumerate([0.40, 0.42, 0.41])],
        "0.5x": [{"seed": s, "mapr": m, "r1": 0.5} for s, m in enumerate([0.40, 0.41, 0.41])],
        "1x": [{"seed": s, "mapr": m, "r1": 0.6} for s, m in enumerate([0.42, 0.43, 0.43])],
        "2x": [{"seed": s, "mapr": m, "r1": 0.4} for s, m in enumerate([0.20, 0.43, math.nan])],
    }
    args = train_cub.parse_args(["--data", "x", "--check-nir"])
    weights = {"0.5x": 0.005, "1x": 0.01, "2x": 0.02}
    record = check.summarize(args, runs, weights, "ProxyAnchor", 50, 50)
    assert record["recommendation"]["weight"] == 0.01 and record["recommendation"]["label"] == "1x"
    assert record["runs"]["2x"][2]["mapr"] is None  # NaN is written as null
    assert record["paired"]["mapr"]["2x"]["collapses"] == 2  # -0.2 and the non-finite run
    assert record["paired"]["r1"]["1x"]["wins"] == 3
    text = check.format_check(record)
    assert "  1x (0.01)        +0.0200  +0.0167          3/0  +0.0100          0" in text
    assert "     2       0.4100      0.4100      0.4300         nan" in text
    assert " ".join(text.split()).endswith("use nir_weight=0.01. this trainer: --nir on --nir-weight 0.01")
    assert max(len(line) for line in text.splitlines()) <= 78


def test_validation_split_is_half_of_the_training_classes_by_id():
    labels = np.array([0, 0, 1, 2, 2, 3, 4, 5, 5])
    items = [f"img{i}" for i in range(len(labels))]
    fit_items, fit_labels, val_items, val_labels = check.validation_split(items, labels)
    assert fit_items == ["img0", "img1", "img2", "img3", "img4"] and fit_labels.tolist() == [0, 0, 1, 2, 2]
    assert val_items == ["img5", "img6", "img7", "img8"] and val_labels.tolist() == [3, 4, 5, 5]


def test_weights_option():
    assert train_cub.parse_args(["--data", "x"]).check_nir is None
    args = train_cub.parse_args(["--data", "x", "--check-nir"])
    assert args.check_nir == [("0.5x", 0.5, True), ("1x", 1.0, True), ("2x", 2.0, True)] and args.check_seeds == 3
    args = train_cub.parse_args(["--data", "x", "--check-nir", "3x,0.02", "--check-seeds", "5"])
    assert args.check_nir == [("3x", 3.0, True), ("0.02", 0.02, False)] and args.check_seeds == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--check-nir", "abc"], "'abc' is not a weight: give positive numbers or Nx"),
        (["--check-nir", "0,1x"], "'0' is not a weight"),
        (["--check-nir=-1x"], "'-1x' is not a weight"),
        (["--check-nir", "nan"], "'nan' is not a weight"),
        (["--check-nir", "1x,1x"], "weight 1x is given twice"),
        (["--check-nir", "--check-seeds", "0"], "'0' is not a whole number >= 1"),
    ],
)
def test_bad_check_options_stop_at_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cub.parse_args(["--data", "x", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "classes, extra, message",
    [
        (12, ["--resume", "{tmp}/last.pt"], "--check-nir trains new runs from scratch and cannot --resume one"),
        (12, ["--check-nir", "1x,0.01", "--nir-objective", "nll"], "names one weight twice (1x = 0.01)"),
        (12, ["--batch-size", "8"], "--check-nir trains on the first 3 of the 6 training classes"),
        (6, [], "needs at least 4 training classes; the data has 3"),
    ],
)
def test_check_errors_are_one_line(cub, tmp_path, capsys, classes, extra, message):
    data = cub if classes == 12 else make_mini_cub(tmp_path / "small", num_classes=classes, per_class=4, size=32)
    (tmp_path / "last.pt").touch()  # a checkpoint that exists: the check, not the path, refuses it
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), *FAST, "--check-nir", "1x", *extra]
    code = train_cub.cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out" / "check_nir.json").exists()
