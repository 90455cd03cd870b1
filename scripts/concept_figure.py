"""Draws docs/img/concept.png: ProxyAnchor vs ProxyAnchor + NIR on 3-D unit embeddings of sklearn digits.

A small MLP maps the 8x8 digits (digits 0-3) to 3-D L2-normalized embeddings, trained once with
``ProxyAnchorLoss`` and once with ``ProxyAnchorNIRLoss`` (same seed, data, steps, learning rates).
Each panel shows the held-out embeddings on the sphere (longitude/latitude), the normalized
proxies (stars), and for NIR the flow's class-conditional density p(x | proxy_c) of the
embedding's predicted class evaluated on the sphere (contours). Numbers printed at the end come
from this run and are quoted in docs/concepts.md.

Run: ``python scripts/concept_figure.py`` (about a minute on one CPU thread).
"""

from __future__ import annotations

import argparse
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_metric_learning.losses import ProxyAnchorLoss  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from nir_loss import ProxyAnchorNIRLoss  # noqa: E402

# 4 classes: ProxyAnchor can place 4 proxies on the 2-sphere with every negative cosine < -margin
# (a tetrahedron); with 10 classes in 3-D its negative term dominates and the run degenerates.
D, C = 3, 4
FLOW = {"num_blocks": 3, "hidden_features": 64, "num_layers": 3}


def _data(seed: int):
    digits = load_digits()
    keep = digits.target < C
    x = torch.tensor(digits.data[keep], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[keep], dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.7 * len(x))
    return x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]


def train(nir_weight: float | None, steps: int, seed: int):
    """Trains the MLP with ProxyAnchor (nir_weight None) or ProxyAnchor + NIR; returns model, loss."""
    torch.manual_seed(seed)
    x, y, _, _ = _data(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, D))
    if nir_weight is None:
        loss_fn = ProxyAnchorLoss(C, D)
        groups = [{"params": loss_fn.parameters(), "lr": 1e-1}]
    else:
        # The paper's objective: the flow keeps learning the class densities drawn here.
        loss_fn = ProxyAnchorNIRLoss(C, D, nir_weight=nir_weight, objective="nll", flow_options=FLOW)
        groups = loss_fn.param_groups(3e-3, proxy_lr_mult=100 / 3, flow_lr_mult=1.0)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 3e-3}, *groups])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = loss_fn(F.normalize(model(x[idx]), dim=1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss_fn.eval()


def _lonlat(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.degrees(np.arctan2(v[:, 1], v[:, 0])), np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))


def _stats(emb: torch.Tensor, y: torch.Tensor, proxies: torch.Tensor) -> dict[str, float]:
    p = F.normalize(proxies, dim=1)
    cos_own = (emb * p[y]).sum(1)
    nearest = (emb @ p.t()).argmax(1)
    return {
        "mean_cos_to_own_proxy": cos_own.mean().item(),
        "std_cos_to_own_proxy": cos_own.std().item(),
        "nearest_proxy_accuracy": (nearest == y).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--nir-weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "docs/img/concept.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, _, xt, yt = _data(args.seed)

    lon, lat = np.meshgrid(np.linspace(-180, 180, 181), np.linspace(-89, 89, 90))
    grid = np.stack(
        [
            np.cos(np.radians(lat)) * np.cos(np.radians(lon)),
            np.cos(np.radians(lat)) * np.sin(np.radians(lon)),
            np.sin(np.radians(lat)),
        ],
        -1,
    ).reshape(-1, 3)
    grid_t = torch.tensor(grid, dtype=torch.float32)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (title, weight) in zip(
        axes, [("ProxyAnchorLoss", None), (f"ProxyAnchorNIRLoss (nir_weight={args.nir_weight})", args.nir_weight)]
    ):
        model, loss_fn = train(weight, args.steps, args.seed)
        with torch.no_grad():
            emb = F.normalize(model(xt), dim=1)
            proxies = loss_fn.proxies.detach()
            stats = _stats(emb, yt, proxies)
            if weight is not None:
                # log p(x | proxy_c) on the sphere for the class whose proxy is nearest to x.
                ll = loss_fn.log_likelihood_matrix(grid_t)
                own = (grid_t @ F.normalize(proxies, dim=1).t()).argmax(1)
                dens = ll.gather(1, own[:, None]).squeeze(1).reshape(lon.shape).numpy()
                levels = np.linspace(np.percentile(dens, 60), dens.max(), 8)
                ax.contour(lon, lat, dens, levels=levels, cmap="Greys", linewidths=0.7)
                stats["test_mean_nll"] = -loss_fn.log_likelihood(emb, yt).mean().item()
        elon, elat = _lonlat(emb.numpy())
        ax.scatter(elon, elat, s=5, c=[colors(int(k)) for k in yt], alpha=0.6, linewidths=0)
        plon, plat = _lonlat(F.normalize(proxies, dim=1).numpy())
        ax.scatter(plon, plat, s=160, marker="*", c=[colors(k) for k in range(C)], edgecolors="black", linewidths=0.8)
        ax.set_title(title, fontsize=13)
        ax.set_xlabel("longitude (deg)", fontsize=12)
        ax.tick_params(labelsize=11)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        print(title, {k: round(v, 3) for k, v in stats.items()})
    axes[0].set_ylabel("latitude (deg)", fontsize=12)
    fig.suptitle(
        f"sklearn digits 0-3, 3-D unit embeddings, {args.steps} steps, held-out samples\n"
        "stars: proxies; contours: flow density of the nearest proxy's class",
        fontsize=12,
    )
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({math.ceil(out.stat().st_size / 1024)} KiB)")


if __name__ == "__main__":
    main()
