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


def _metrics(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return _metrics(run_dir, "loss")


def test_check_pairs_its_runs_and_writes_the_table(cub, tmp_path, capsys):
    """At a negligible weight every NIR run retraces its seed's baseline: the same model, proxies, batches,
    crops and drop-connect masks, although the NIR term draws its training noise in every step. The
    learning-rate control (on by default, 0.5x) runs the plain loss at half the learning rate."""
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
    # The learning-rate control: the plain loss at 0.5x --lr, one run per seed, paired with the baseline.
    control = record["lr_control"]
    assert control["factor"] == 0.5 and control["label"] == "ProxyAnchor lr x0.5"
    assert control["lr"] == pytest.approx(0.5 * record["lr"])
    assert [r["seed"] for r in record["runs"]["ProxyAnchor lr x0.5"]] == [5, 6]
    for metric in ("mapr", "r1"):
        base = [r[metric] for r in record["runs"]["ProxyAnchor"]]
        arm = [r[metric] for r in record["runs"]["ProxyAnchor lr x0.5"]]
        assert all(0 < v <= 1 for v in arm)
        assert control["paired"][metric] == held_out.paired_differences([a - b for a, b in zip(arm, base)])
    for seed in (5, 6):
        base_lr, control_lr = (_metrics(out / f"seed{seed}" / arm, "lr") for arm in ("baseline", "lr-x0.5"))
        assert base_lr == [record["lr"]] and control_lr == [pytest.approx(0.5 * record["lr"], rel=1e-12)]
        assert _metrics(out / f"seed{seed}" / "nir-1e-9", "lr") == base_lr
        # Same start, other steps: the second step's loss already differs from the baseline's.
        assert _losses(out / f"seed{seed}" / "lr-x0.5") != pytest.approx(
            _losses(out / f"seed{seed}" / "baseline"), rel=1e-6
        )
    # A negligible weight cannot clear the bar: the advice is to leave NIR off.
    advice = record["recommendation"]
    assert advice["weight"] == 0.0 and advice["label"] is None and advice["lr_factor"] in (1.0, 0.5)
    assert json.loads((out / "check_nir.json").read_text()) == record
    assert "trains on 3 classes (12 images), validates on 3 (12 images)" in printed
    assert "MAP@R, NIR minus ProxyAnchor, paired by seed:" in printed
    assert "recommendation: NIR did not beat ProxyAnchor on the validation classes" in printed
    assert "lr x0.5, no NIR: the learning-rate control, ProxyAnchor without NIR at 0.5x --lr" in " ".join(
        printed.split()
    )
    lower = f" --lr {0.5 * record['lr']:.4g}" if advice["lr_factor"] == 0.5 else ""
    assert f"this trainer: --nir off{lower}\n" in printed


def test_a_diverged_run_is_a_collapse_not_the_end_of_the_check(cub, tmp_path, capsys, monkeypatch):
    real_fit = check.fit

    def diverging_fit(cfg, *args, **kwargs):
        if "NIR" in cfg.run_name:
            raise FloatingPointError("non-finite loss nan at epoch 1 step 0")
        return real_fit(cfg, *args, **kwargs)

    monkeypatch.setattr(check, "fit", diverging_fit)
    argv = ["--data", str(cub), "--out", str(tmp_path), *FAST, "--check-nir", "1x", "--check-seeds", "1"]
    record = train_cub.main([*argv, "--check-lr-control", "0"])
    assert record["runs"]["1x"] == [{"seed": 0, "mapr": None, "r1": None}]
    assert record["lr_control"] is None and set(record["runs"]) == {"ProxyAnchor", "1x"}  # 0: no control
    assert record["paired"]["mapr"]["1x"]["collapses"] == 1 and record["recommendation"]["weight"] == 0.0
    assert "non-finite loss nan at epoch 1 step 0: counted as a collapse" in capsys.readouterr().out


def _summary_runs(control_mapr):
    return {
        "ProxyAnchor": [{"seed": s, "mapr": m, "r1": 0.5} for s, m in enumerate([0.40, 0.42, 0.41])],
        "0.5x": [{"seed": s, "mapr": m, "r1": 0.5} for s, m in enumerate([0.40, 0.41, 0.41])],
        "1x": [{"seed": s, "mapr": m, "r1": 0.6} for s, m in enumerate([0.42, 0.43, 0.43])],
        "2x": [{"seed": s, "mapr": m, "r1": 0.4} for s, m in enumerate([0.20, 0.43, math.nan])],
        "ProxyAnchor lr x0.5": [{"seed": s, "mapr": m, "r1": 0.55} for s, m in enumerate(control_mapr)],
    }


def test_summary_names_the_recommended_weight_and_prints_every_arm():
    runs = _summary_runs([0.41, 0.43, 0.42])  # the control gains +0.01, less than 1x's +0.02
    args = train_cub.parse_args(["--data", "x", "--check-nir"])
    weights = {"0.5x": 0.005, "1x": 0.01, "2x": 0.02}
    record = check.summarize(args, runs, weights, "ProxyAnchor", 50, 50)
    assert record["recommendation"]["weight"] == 0.01 and record["recommendation"]["label"] == "1x"
    assert record["recommendation"]["lr_factor"] == 1.0
    assert record["runs"]["2x"][2]["mapr"] is None  # NaN is written as null
    assert record["paired"]["mapr"]["2x"]["collapses"] == 2  # -0.2 and the non-finite run
    assert record["paired"]["r1"]["1x"]["wins"] == 3
    control = record["lr_control"]
    assert control["factor"] == 0.5 and control["label"] == "ProxyAnchor lr x0.5" and control["lr"] == 5e-5
    assert control["paired"]["mapr"]["median"] == pytest.approx(0.01) and control["paired"]["r1"]["wins"] == 3
    text = check.format_check(record)
    assert "  1x (0.01)        +0.0200  +0.0167          3/0  +0.0100          0" in text
    assert "  seed  ProxyAnchor        0.5x          1x          2x     lr x0.5" in text
    assert "     2       0.4100      0.4100      0.4300         nan      0.4200" in text
    # The control's row in both paired tables, named as the learning-rate control, not as a weight.
    assert text.count("  lr x0.5, no NIR  +0.0100  +0.0100          3/0  +0.0100          0") == 1
    assert text.count("  lr x0.5, no NIR  +0.0500  +0.0500          3/0  +0.0500          0") == 1
    assert "lr x0.5, no NIR: the learning-rate control, ProxyAnchor without NIR at 0.5x --lr (5e-05)" in " ".join(
        text.split()
    )
    assert " ".join(text.split()).endswith("use nir_weight=0.01. this trainer: --nir on --nir-weight 0.01")
    assert max(len(line) for line in text.splitlines()) <= 78


def test_a_control_that_gains_as_much_as_nir_advises_a_lower_learning_rate():
    runs = _summary_runs([0.43, 0.45, 0.44])  # the control gains +0.03, more than 1x's +0.02
    args = train_cub.parse_args(["--data", "x", "--check-nir", "--lr", "2e-4", "--check-lr-control", "0.25"])
    runs["ProxyAnchor lr x0.25"] = runs.pop("ProxyAnchor lr x0.5")
    record = check.summarize(args, runs, {"0.5x": 0.005, "1x": 0.01, "2x": 0.02}, "ProxyAnchor", 50, 50)
    advice = record["recommendation"]
    assert advice["weight"] == 0.0 and advice["label"] is None and advice["lr_factor"] == 0.25
    assert advice["reason"].startswith("ProxyAnchor at 0.25x the learning rate gained as much (+0.0300 median")
    text = check.format_check(record)
    assert " ".join(text.split()).endswith(
        "(+0.0200): lower the learning rate rather than add NIR. this trainer: --nir off --lr 5e-05"
    )
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
    assert args.check_lr_control == 0.5  # the learning-rate control is on by default
    for text, factor in (("0.25", 0.25), ("0", 0.0)):
        assert (
            train_cub.parse_args(["--data", "x", "--check-nir", "--check-lr-control", text]).check_lr_control == factor
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--check-nir", "abc"], "'abc' is not a weight: give positive numbers or Nx"),
        (["--check-nir", "0,1x"], "'0' is not a weight"),
        (["--check-nir=-1x"], "'-1x' is not a weight"),
        (["--check-nir", "nan"], "'nan' is not a weight"),
        (["--check-nir", "1x,1x"], "weight 1x is given twice"),
        (["--check-nir", "--check-seeds", "0"], "'0' is not a whole number >= 1"),
        (
            ["--check-nir", "--check-lr-control", "1"],
            "'1' is not a learning-rate factor: give a number between 0 and 1",
        ),
        (
            ["--check-nir", "--check-lr-control", "1.5"],
            "'1.5' is not a learning-rate factor: give a number between 0 and 1",
        ),
        (
            ["--check-nir", "--check-lr-control", "-0.5"],
            "'-0.5' is not a learning-rate factor: give a number between 0 and 1",
        ),
        (
            ["--check-nir", "--check-lr-control", "nan"],
            "'nan' is not a learning-rate factor: give a number between 0 and 1",
        ),
        (
            ["--check-nir", "--check-lr-control", "half"],
            "'half' is not a learning-rate factor: give a number between 0 and 1",
        ),
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
