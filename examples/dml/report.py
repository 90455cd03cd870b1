"""Run records: JSON-lines and CSV metric logs, summary tables, and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

TABLE_KEYS = (("recall_at_1", "R@1"), ("recall_at_2", "R@2"), ("recall_at_4", "R@4"), ("recall_at_8", "R@8"),
              ("NMI", "NMI"), ("mean_average_precision_at_r", "MAP@R"), ("r_precision", "RP"))


def append_jsonl(path: Path, record: dict) -> None:
    """Appends one JSON record per line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    """Rewrites the CSV from all records (the column set can grow as metrics appear)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)


def format_table(rows: dict[str, dict], title: str = "") -> str:
    """A fixed-width table: one row per run name, metric columns in percent.

    Example:
        >>> print(format_table({"a": {"recall_at_1": 0.5}}))  # doctest: +NORMALIZE_WHITESPACE
        run   R@1   R@2   R@4   R@8   NMI   MAP@R   RP
        a     50.00 -     -     -     -     -       -
    """
    names = list(rows)
    width = max([3] + [len(n) for n in names]) + 2
    header = "run".ljust(width) + "  ".join(label.ljust(6) for _, label in TABLE_KEYS)
    lines = [title] if title else []
    lines.append(header.rstrip())
    for n in names:
        cells = []
        for key, label in TABLE_KEYS:
            v = rows[n].get(key)
            cells.append(("-" if v is None else f"{100 * v:.2f}").ljust(max(6, len(label))))
        lines.append((n.ljust(width) + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(histories: dict[str, list[dict]], path: Path) -> None:
    """Per-epoch curves (train loss, NLL, R@1, MAP@R, NMI) of one or more runs."""
    plt = _plt()
    panels = [("loss", "train loss"), ("nll", "train NLL"), ("recall_at_1", "R@1"),
              ("mean_average_precision_at_r", "MAP@R"), ("NMI", "NMI")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    colors = {name: f"C{i}" for i, name in enumerate(histories)}  # one color per run in every panel
    for ax, (key, title) in zip(axes, panels):
        for name, hist in histories.items():
            pts = [(r["epoch"], r[key]) for r in hist if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name, color=colors[name])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_projection(train_emb: torch.Tensor, train_labels: torch.Tensor, proxies: torch.Tensor,
                    test_emb: torch.Tensor, test_labels: torch.Tensor, path: Path, max_classes: int = 10,
                    title: str = "") -> None:
    """PCA (2-D) of embeddings: train classes around their proxies, held-out classes around their means.

    Held-out classes have no proxies (they are unseen in training), so the right panel marks
    their class means. Each panel has its own PCA basis.
    """
    plt = _plt()
    proxies = proxies.detach().float().cpu()
    # (C, K, D) multi-centre proxies: plot centre 0.
    proxies = torch.nn.functional.normalize(proxies[:, 0] if proxies.dim() == 3 else proxies, dim=1)
    tr_classes = np.unique(train_labels.numpy())[:max_classes]
    te_classes = np.unique(test_labels.numpy())[:max_classes]
    tr_mask = np.isin(train_labels.numpy(), tr_classes)

    def pca(fit: torch.Tensor):
        """A 2-D PCA projection fitted on ``fit``."""
        mean = fit.float().mean(0, keepdim=True)
        basis = torch.linalg.svd(fit.float() - mean, full_matrices=False)[2][:2].T
        return lambda x: ((x.float() - mean) @ basis).numpy()

    # One basis per panel: held-out classes occupy other directions than the train classes.
    proj_train = pca(torch.cat([train_emb[tr_mask], proxies[tr_classes]]))
    proj_test = pca(test_emb[np.isin(test_labels.numpy(), te_classes)])

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(tr_classes):
        p = proj_train(train_emb[train_labels == int(c)])
        axes[0].scatter(p[:, 0], p[:, 1], s=8, color=cmap(i % 10), alpha=0.5)
        q = proj_train(proxies[int(c)][None])
        axes[0].scatter(q[:, 0], q[:, 1], s=180, marker="*", color=cmap(i % 10), edgecolor="k")
    axes[0].set_title("train classes and their proxies (stars)")
    for i, c in enumerate(te_classes):
        e = test_emb[test_labels == int(c)]
        p = proj_test(e)
        axes[1].scatter(p[:, 0], p[:, 1], s=8, color=cmap(i % 10), alpha=0.5)
        q = proj_test(torch.nn.functional.normalize(e.mean(0, keepdim=True), dim=1))
        axes[1].scatter(q[:, 0], q[:, 1], s=120, marker="X", color=cmap(i % 10), edgecolor="k")
    axes[1].set_title("held-out classes and their means (X)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
