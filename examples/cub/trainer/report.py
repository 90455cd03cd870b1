"""Run records: JSON-lines and CSV metric logs, summary tables, and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

TABLE_KEYS = (
    ("recall_at_1", "R@1"),
    ("recall_at_2", "R@2"),
    ("recall_at_4", "R@4"),
    ("recall_at_8", "R@8"),
    ("NMI", "NMI"),
    ("mean_average_precision_at_r", "MAP@R"),
    ("r_precision", "RP"),
)


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
        >>> print(
        ...     format_table({"a": {"recall_at_1": 0.5}})
        ... )  # doctest: +NORMALIZE_WHITESPACE
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


def plot_history(histories: dict[str, list[dict]], path: Path) -> list[str]:
    """Per-epoch curves of one or more runs: train loss, NIR NLL (mean and max), R@1, MAP@R, NMI.

    The NLL panel shows each NIR run's mean of batch means (solid) and max of batch maxes (dashed),
    so a spike or a runaway NLL stands out; panels without data (the NLL of runs without NIR,
    metrics never evaluated) are left out rather than drawn empty. Returns the panels' titles.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    panels = [
        (("loss",), "train loss"),
        (("nll", "nll_max"), "train NIR NLL: mean (solid), max (dashed)"),
        (("recall_at_1",), "R@1"),
        (("mean_average_precision_at_r",), "MAP@R"),
        (("NMI",), "NMI"),
    ]

    def points(hist: list[dict], key: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[key]) for r in hist if r.get(key) is not None]

    panels = [
        (keys, title) for keys, title in panels if any(points(hist, k) for hist in histories.values() for k in keys)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(histories)}  # one color per run in every panel
    for ax, (keys, title) in zip(axes[0], panels):
        for name, hist in histories.items():
            for key, style in zip(keys, ("-", "--")):
                pts = points(hist, key)
                if pts:
                    ax.plot(
                        *zip(*pts), style, marker="o", ms=3, color=colors[name], label=name if key == keys[0] else None
                    )
        ax.set_title(title, fontsize=9 if len(title) > 20 else None)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [title for _, title in panels]


def _class_plane(emb: torch.Tensor, labels: torch.Tensor, classes: np.ndarray):
    """A 2-D projection centred on the embeddings, spanned by the directions that separate the class means.

    A PCA of the class means, not of all points: when the embeddings sit in one clump (early in
    training) or away from the proxies, a PCA of everything spends its axes on the clump's spread
    or on that offset, and the classes overlap in the plot.
    """
    emb = emb.float()
    centre = emb.mean(0, keepdim=True)
    means = torch.stack([emb[labels == int(c)].mean(0) for c in classes])
    fit = means if len(classes) >= 3 else emb  # two means span one direction only
    basis = torch.linalg.svd(fit - fit.mean(0, keepdim=True), full_matrices=False)[2][:2].T
    return lambda x: ((x.float() - centre) @ basis).numpy()


def plot_projection(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    proxies: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
    path: Path,
    max_classes: int = 10,
    title: str = "",
) -> None:
    """2-D projections of embeddings: train classes with their proxies, held-out classes with their means.

    Each panel is projected on the plane that best separates its classes' means (centred on its
    embeddings); the train panel's proxies (L2-normalized, centre 0 of multi-centre classes) are
    projected on the same plane, so a proxy lies among its class when the embeddings have moved to
    it. Held-out classes have no proxies (they are unseen in training): the right panel marks
    their class means.
    """
    plt = _plt()
    proxies = proxies.detach().float().cpu()
    proxies = torch.nn.functional.normalize(proxies[:, 0] if proxies.dim() == 3 else proxies, dim=1)
    tr_classes = np.unique(train_labels.numpy())[:max_classes]
    te_classes = np.unique(test_labels.numpy())[:max_classes]
    proj_train = _class_plane(train_emb, train_labels, tr_classes)
    proj_test = _class_plane(test_emb, test_labels, te_classes)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(tr_classes):
        p = proj_train(train_emb[train_labels == int(c)])
        axes[0].scatter(p[:, 0], p[:, 1], s=8, color=cmap(i % 10), alpha=0.5)
        q = proj_train(proxies[int(c)][None])
        axes[0].scatter(q[:, 0], q[:, 1], s=180, marker="*", color=cmap(i % 10), edgecolor="k")
    axes[0].set_title(f"train: {len(tr_classes)} classes and their proxies (stars)")
    for i, c in enumerate(te_classes):
        e = test_emb[test_labels == int(c)]
        p = proj_test(e)
        axes[1].scatter(p[:, 0], p[:, 1], s=8, color=cmap(i % 10), alpha=0.5)
        q = proj_test(e.mean(0, keepdim=True))
        axes[1].scatter(q[:, 0], q[:, 1], s=120, marker="X", color=cmap(i % 10), edgecolor="k")
    axes[1].set_title(f"held out: {len(te_classes)} classes and their means (X)")
    for ax in axes:
        ax.set_xlabel("plane of the class means, axis 1")
        ax.set_ylabel("axis 2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
