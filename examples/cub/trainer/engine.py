"""The training engine of train.py: loop, warmup, evaluation, checkpoints, DDP."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

import nir_loss

from . import report
from .errors import ConfigError
from .evaluation import compute_metrics, embed
from .losses import has_nir, loss_param_groups


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: says in which epoch, and which checkpoint (if any) a run can resume from."""

    def __init__(self, epoch: int, checkpoint: Path | None, checkpoint_epoch: int | None) -> None:
        super().__init__(epoch, checkpoint, checkpoint_epoch)
        self.epoch, self.checkpoint, self.checkpoint_epoch = epoch, checkpoint, checkpoint_epoch


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, loss and data (saved in checkpoints)."""

    out_dir: str = "runs/run"
    epochs: int = 10
    batch_size: int = 90
    m: int = 2  # samples per class in a batch; batch_size % m == 0
    lr: float = 1e-4
    proxy_lr_mult: float = 100.0
    flow_lr_mult: float = 10.0
    weight_decay: float = 4e-4  # backbone only
    warmup_epochs: int = 1  # trunk frozen; head, proxies and flow train
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.5
    grad_clip: float = 0.0  # max grad norm; 0 = off
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp16 | off
    seed: int = 0
    eval_every: int = 1
    workers: int = 0
    eval_batch_size: int = 128
    samples_per_epoch: int = 0  # sampler length; 0 = size of the train set
    max_steps_per_epoch: int = 0  # 0 = all; for smoke tests
    resume: str = ""
    progress: bool = True
    plots: bool = True
    checkpoints: bool = True  # last.pt and best.pt; off for the runs of --check-nir, which keep metrics only
    run_name: str = "run"
    extra: dict = field(default_factory=dict)  # free-form settings recorded with the run


@dataclass
class DistInfo:
    """Process-group facts; world_size 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initializes DDP when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device)
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank, local_rank, world, dev)


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seeds python, numpy (PML's sampler draws from numpy's global RNG) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA by default (fp16 risks exp(NLL) overflow), none on CPU."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def build_optimizer(cfg: TrainConfig, model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """Adam: trunk at lr with weight decay, head at lr, proxies/flow at the library's multipliers."""
    trunk = model.trunk_parameters() if hasattr(model, "trunk_parameters") else []
    trunk_ids = {id(p) for p in trunk}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in trunk_ids]
    groups = [
        {"params": trunk, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "trunk"},
        {"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "head"},
    ]
    groups = [g for g in groups if g["params"]]
    groups += [
        dict(g, weight_decay=0.0) for g in loss_param_groups(loss_fn, cfg.lr, cfg.proxy_lr_mult, cfg.flow_lr_mult)
    ]
    return torch.optim.Adam(groups)


def check_batch_settings(batch_size: int, m: int, labels: np.ndarray) -> None:
    """Raises ConfigError, naming the flag to change, unless MPerClassSampler can build the batches.

    A batch holds batch_size / m classes with m samples each, so batch_size must be a multiple of
    m and the training data must have at least batch_size / m classes.
    """
    if m < 1:
        raise ConfigError(f"m = {m} samples per class: pass --samples-per-class 1 or more")
    if batch_size < m or batch_size % m:
        raise ConfigError(
            f"batch size {batch_size} is not a positive multiple of m = {m} samples per class "
            f"(MPerClassSampler): pass a --batch-size that is, e.g. {m * max(1, batch_size // m)}"
        )
    num_classes = len(np.unique(labels))
    if m * num_classes < batch_size:
        raise ConfigError(
            f"batch size {batch_size} needs {batch_size // m} classes of m = {m} samples each (MPerClassSampler), "
            f"but the training data has {num_classes} classes: pass --batch-size {m * num_classes} or less "
            f"(a multiple of m), or raise m with --samples-per-class (at least {-(-batch_size // num_classes)}, "
            f"dividing the batch size)"
        )


def make_train_loader(cfg: TrainConfig, dataset: Dataset, labels: np.ndarray, dist: DistInfo) -> DataLoader:
    """Class-balanced batches (m per class); each rank draws its own (numpy seeded per rank).

    Raises:
        ConfigError: The batch size is not a multiple of m, or needs more classes than the data has.
    """
    check_batch_settings(cfg.batch_size, cfg.m, labels)
    n = cfg.samples_per_epoch or len(labels)
    n = max(cfg.batch_size, n // dist.world_size // cfg.batch_size * cfg.batch_size)
    sampler = MPerClassSampler(labels, cfg.m, batch_size=cfg.batch_size, length_before_new_iter=n)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )


def make_eval_loader(cfg: TrainConfig, dataset: Dataset, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    path: Path,
    epoch: int,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer,
    scheduler,
    scaler,
    history: list[dict],
    best: dict,
    cfg: TrainConfig,
) -> None:
    """Writes atomically (tmp + rename) so an interrupted save never corrupts last.pt."""
    state = {
        "epoch": epoch,
        "model": _unwrap(model).state_dict(),
        "loss": loss_fn.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "best": best,
        "config": asdict(cfg),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_one_epoch(
    cfg: TrainConfig,
    epoch: int,
    model: nn.Module,
    loss_fn: nn.Module,
    train_loss: nn.Module,
    optimizer,
    loader: DataLoader,
    dist: DistInfo,
    scaler=None,
) -> dict[str, float]:
    """One pass over the sampler; returns the mean loss and, for NIR runs, the NIR NLL's statistics.

    ``train_loss`` is what is called (possibly a DistributedLossWrapper around ``loss_fn``);
    ``loss_fn`` is the bare loss, whose ``nir_nll_mean`` / ``nir_nll_max`` (the batch's NLL mean
    and max, recorded by every call) are accumulated on the device and read once per epoch:
    ``nll`` is the mean of the batch means, ``nll_max`` the max of the batch maxes.
    """
    model.train()
    dtype = amp_dtype(cfg, dist.device)
    steps = len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = 0.0
    nll_sum: torch.Tensor | None = None
    nll_max: torch.Tensor | None = None
    count = 0
    bar = _progress(loader, steps, f"epoch {epoch}", cfg.progress and dist.is_main)
    for step, (x, y) in enumerate(bar):
        if step >= steps:
            break
        x, y = x.to(dist.device, non_blocking=True), torch.as_tensor(y).to(dist.device, non_blocking=True)
        with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
            emb = model(x)
        loss = train_loss(emb.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        # DistributedLossWrapper returns world_size x the gathered-batch loss: log the per-batch value.
        value = loss.item() / dist.world_size
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at epoch {epoch} step {step}")
        if has_nir(loss_fn):  # device tensors: no sync here
            mean = torch.as_tensor(loss_fn.nir_nll_mean, device=dist.device, dtype=torch.float64)
            high = torch.as_tensor(loss_fn.nir_nll_max, device=dist.device, dtype=torch.float64)
            nll_sum = mean if nll_sum is None else nll_sum + mean
            nll_max = high if nll_max is None else torch.maximum(nll_max, high)
        loss_sum += value
        count += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}")
    out: dict = {"loss": loss_sum / max(count, 1), "steps": count, "nll": None, "nll_max": None}
    if nll_sum is not None and nll_max is not None:
        out["nll"], out["nll_max"] = nll_sum.item() / count, nll_max.item()  # one read per epoch
    return out


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    loss_fn: nn.Module,
    train_set: Dataset,
    train_labels: np.ndarray,
    test_set: Dataset,
    dist: DistInfo | None = None,
    log=print,
) -> dict:
    """Trains with warmup and a step schedule, evaluates every ``eval_every`` epochs, checkpoints.

    Writes to ``cfg.out_dir``: metrics.jsonl, metrics.csv, last.pt, best.pt (best R@1; neither with
    ``cfg.checkpoints`` off), curves.png, projection.png, summary.txt. With ``cfg.resume`` (a checkpoint path) training
    continues after the saved epoch.

    Returns:
        ``{"history": [...], "best": {...}, "final": {...}, "epochs_run": int}``; the last two
        hold the metrics of the last evaluation and how many epochs this call trained.
    """
    dist = dist or DistInfo()
    out = Path(cfg.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # same model/proxy/flow init on every rank
    model.to(dist.device)
    loss_fn.to(dist.device)
    optimizer = build_optimizer(cfg, model, loss_fn)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_steps), cfg.lr_gamma)
    dtype = amp_dtype(cfg, dist.device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    history: list[dict] = []
    best: dict = {}
    start_epoch = 1
    if cfg.resume:
        ckpt = torch.load(cfg.resume, map_location=dist.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        log(f"[{cfg.run_name}] resumed from {cfg.resume} at epoch {ckpt['epoch']}")
    np.random.seed((cfg.seed + 1000 * dist.rank + start_epoch) % 2**32)  # each rank its own batches
    train_model: nn.Module = model
    train_loss: nn.Module = loss_fn
    if dist.world_size > 1:
        # find_unused_parameters: the trunk is frozen during warmup, so its params get no grads then.
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            find_unused_parameters=cfg.warmup_epochs > 0,
        )
        train_loss = nir_loss.DistributedLossWrapper(loss_fn)  # loss stays outside DDP
    loader = make_train_loader(cfg, train_set, train_labels, dist)
    test_loader = make_eval_loader(cfg, test_set, dist.device)
    jsonl, csv_path = out / "metrics.jsonl", out / "metrics.csv"
    epochs_run = 0
    # The checkpoint a run interrupted now could resume from, and its epoch.
    saved: tuple[Path, int] | None = (Path(cfg.resume), start_epoch - 1) if cfg.resume else None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            warm = epoch <= cfg.warmup_epochs
            if hasattr(model, "set_trunk_trainable"):
                model.set_trunk_trainable(not warm)
            t0 = time.time()
            stats = train_one_epoch(cfg, epoch, train_model, loss_fn, train_loss, optimizer, loader, dist, scaler)
            scheduler.step()
            epochs_run += 1
            record = {
                "epoch": epoch,
                "warmup": warm,
                "loss": stats["loss"],
                "nll": stats["nll"],
                "nll_max": stats["nll_max"],
                "steps": stats["steps"],
                "lr": optimizer.param_groups[0]["lr"],
                "train_s": time.time() - t0,
            }
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                if dist.is_main:
                    t1 = time.time()
                    emb, lab = embed(model, test_loader, dist.device, dtype)
                    record.update(compute_metrics(emb, lab))
                    record["eval_s"] = time.time() - t1
                if dist.world_size > 1:
                    torch.distributed.barrier()
            if dist.world_size > 1:
                record["loss_param_spread"] = _sync_loss_params(loss_fn, dist)
            history.append(record)
            if dist.is_main:
                r1 = record.get("recall_at_1")
                if r1 is not None and r1 >= best.get("recall_at_1", -1.0):
                    best = dict(record)
                report.append_jsonl(jsonl, record)
                report.write_csv(csv_path, history)
                if cfg.checkpoints:
                    save_checkpoint(
                        out / "last.pt", epoch, model, loss_fn, optimizer, scheduler, scaler, history, best, cfg
                    )
                    saved = (out / "last.pt", epoch)
                if cfg.checkpoints and best.get("epoch") == epoch:
                    save_checkpoint(
                        out / "best.pt", epoch, model, loss_fn, optimizer, scheduler, scaler, history, best, cfg
                    )
                msg = f"[{cfg.run_name}] epoch {epoch}/{cfg.epochs} loss {stats['loss']:.4f}"
                msg += f" nll mean {stats['nll']:.2f} max {stats['nll_max']:.2f}" if stats["nll"] is not None else ""
                msg += f" R@1 {100 * r1:.2f}" if r1 is not None else ""
                if "loss_param_spread" in record:
                    msg += f" (loss params across ranks: max diff {record['loss_param_spread']:.1e}, re-synced)"
                log(msg)
    except KeyboardInterrupt:
        raise TrainingInterrupted(epoch, *(saved or (None, None))) from None
    final = next((r for r in reversed(history) if "recall_at_1" in r), {})
    if dist.is_main and history:
        (out / "summary.txt").write_text(report.format_table({"best": best, "last": final}, cfg.run_name) + "\n")
        if cfg.plots:
            report.plot_history({cfg.run_name: history}, out / "curves.png")
            _plot_projection(cfg, model, loss_fn, train_set, train_labels, test_loader, dist, out / "projection.png")
    return {"history": history, "best": best, "final": final, "epochs_run": epochs_run}


def _sync_loss_params(loss_fn: nn.Module, dist: DistInfo) -> float:
    """Proxies and flow live outside DDP; each rank applies the same update, up to float summation
    order over the gathered batch. Measures the spread across ranks, then broadcasts rank 0's
    values so rounding differences cannot accumulate over a long run.

    Raises:
        RuntimeError: The ranks disagree by more than rounding (a real desynchronization).
    """
    params = [p for p in loss_fn.parameters()]
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in params])
        gathered = [torch.empty_like(flat) for _ in range(dist.world_size)]
        torch.distributed.all_gather(gathered, flat)
        spread = max(float((g - flat).abs().max()) for g in gathered)
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    if spread > 1e-3:
        raise RuntimeError(f"loss parameters differ across ranks by {spread:.3g}: proxies/flow out of sync")
    return spread


def _plot_projection(
    cfg: TrainConfig,
    model: nn.Module,
    loss_fn: nn.Module,
    train_set: Dataset,
    train_labels: np.ndarray,
    test_loader: DataLoader,
    dist: DistInfo,
    path: Path,
) -> None:
    """Embeds up to 10 train classes (un-augmented when the dataset allows) and the test set; plots a PCA."""
    keep = np.flatnonzero(np.isin(train_labels, np.unique(train_labels)[:10]))[:2000]
    subset = torch.utils.data.Subset(_eval_view(train_set), keep.tolist())
    dtype = amp_dtype(cfg, dist.device)
    tr_emb, tr_lab = embed(model, make_eval_loader(cfg, subset, dist.device), dist.device, dtype)
    te_emb, te_lab = embed(model, test_loader, dist.device, dtype)
    proxies = nir_loss.get_proxies(loss_fn.loss if hasattr(loss_fn, "loss") else loss_fn)
    report.plot_projection(tr_emb, tr_lab, proxies, te_emb, te_lab, path, title=cfg.run_name)


def _eval_view(dataset: Dataset) -> Dataset:
    """The dataset with its test-time transform, if it has one (``eval_view()``), else itself."""
    view = getattr(dataset, "eval_view", None)
    return view() if callable(view) else dataset
