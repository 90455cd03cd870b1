"""Retrieval evaluation on held-out classes: PML AccuracyCalculator plus Recall@k from a cosine kNN."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import Tensor

PML_METRICS = ("NMI", "mean_average_precision_at_r", "r_precision", "precision_at_1")
RECALL_KS = (1, 2, 4, 8)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _sklearn_kmeans(x: Tensor, num_clusters: int) -> Tensor:
    """k-means for NMI when faiss is absent (PML's default k-means is faiss)."""
    from sklearn.cluster import KMeans

    ids = KMeans(num_clusters, n_init=1, random_state=0).fit_predict(x.detach().cpu().float().numpy())
    return torch.as_tensor(ids, device=x.device)


def recall_at_k(embeddings: Tensor, labels: Tensor, ks=RECALL_KS, chunk: int = 1024) -> dict[str, float]:
    """Recall@k (a query counts if any of its k nearest other samples shares its label), cosine kNN.

    Example:
        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> recall_at_k(e, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
        {'recall_at_1': 0.5, 'recall_at_2': 0.75}
    """
    e = F.normalize(embeddings.float(), dim=1)
    kmax = min(max(ks), len(e) - 1)
    hits = []
    for start in range(0, len(e), chunk):
        sims = e[start : start + chunk] @ e.T
        rows = torch.arange(start, min(start + chunk, len(e)))
        sims[torch.arange(len(rows)), rows] = -float("inf")  # exclude the query itself
        nn_idx = sims.topk(kmax, dim=1).indices
        hits.append(labels[nn_idx] == labels[rows, None])
    hit = torch.cat(hits)
    return {f"recall_at_{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}


def compute_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Recall@1/2/4/8, NMI, MAP@R, R-Precision and P@1 of a query set against itself (leave-one-out)."""
    knn = None if _has_faiss() else CustomKNN(CosineSimilarity())
    kmeans = None if _has_faiss() else _sklearn_kmeans
    calc = AccuracyCalculator(include=PML_METRICS, k="max_bin_count", knn_func=knn, kmeans_func=kmeans)
    embeddings, labels = embeddings.float().cpu(), labels.cpu()
    out = {k: float(v) for k, v in calc.get_accuracy(embeddings, labels).items()}
    out.update(recall_at_k(embeddings, labels))
    return out


@torch.no_grad()
def embed(
    model: torch.nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Embeddings and labels of a whole loader, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    embs, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            embs.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(embs), torch.cat(labels)


def finite(metrics: dict[str, float]) -> bool:
    """All metric values finite."""
    return all(np.isfinite(v) for v in metrics.values())
