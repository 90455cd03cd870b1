"""ProxyAnchor + NIR on scikit-learn's digits, written like pytorch-metric-learning's examples.

A small MLP embeds 8x8 digit images. As in PML's MNIST examples, every fifth image is held out
and retrieves among the training images (``examples/demo.py`` holds out whole classes instead).
The pieces are PML's (``MPerClassSampler``, ``AccuracyCalculator``) plus ``ProxyAnchorNIRLoss``
and its ``param_groups``. Offline, on one torch thread (``--threads``; more threads rarely
help a model this small): the 10 epochs took 14 s on one core of a 2-core x86 server; the
last line prints the time it took on yours.

Run: ``python examples/pml_style.py --epochs 10``
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nir_loss import ProxyAnchorNIRLoss


class Net(nn.Module):
    def __init__(self, embedding_size: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, embedding_size))

    def forward(self, x):
        return F.normalize(self.layers(x), dim=1)  # NIR models unit-norm embeddings


def digits_split():
    """(train, test) TensorDatasets of all 10 classes; every fifth image is a test image."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    test = torch.arange(len(y)) % 5 == 0
    return TensorDataset(x[~test], y[~test]), TensorDataset(x[test], y[test])


def train(model, loss_func, device, loader, optimizer, epoch, max_steps=None):
    model.train()
    loss_func.train()  # the NIR term adds its training noise in train mode
    for batch_idx, (data, labels) in enumerate(loader):
        if max_steps is not None and batch_idx >= max_steps:
            break
        data, labels = data.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = loss_func(model(data), labels)
        loss.backward()
        optimizer.step()
        if batch_idx % 10 == 0:
            nll = float(loss_func.nir_nll_mean)
            print(f"Epoch {epoch} Iteration {batch_idx}: Loss = {loss.item():.4f}, mean NLL = {nll:.1f}")


@torch.no_grad()
def get_all_embeddings(dataset, model, device):
    model.eval()
    x, labels = dataset.tensors
    return model(x.to(device)), labels.to(device)


def test(train_set, test_set, model, accuracy_calculator, device, when):
    train_embeddings, train_labels = get_all_embeddings(train_set, model, device)
    test_embeddings, test_labels = get_all_embeddings(test_set, model, device)
    accuracies = accuracy_calculator.get_accuracy(test_embeddings, test_labels, train_embeddings, train_labels)
    print(
        f"Test set {when}: Precision@1 = {accuracies['precision_at_1']:.3f}, "
        f"MAP@R = {accuracies['mean_average_precision_at_r']:.3f}"
    )
    return accuracies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch CPU threads"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_set, test_set = digits_split()
    sampler = MPerClassSampler(train_set.tensors[1], m=8, batch_size=40, length_before_new_iter=len(train_set))
    loader = DataLoader(train_set, batch_size=40, sampler=sampler, drop_last=True)

    model = Net(embedding_size=32).to(device)
    loss_func = ProxyAnchorNIRLoss(num_classes=10, embedding_size=32, flow_options={"num_blocks": 2}).to(device)
    # The loss owns parameters (proxies, flow): they train with their own groups.
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *loss_func.param_groups(model_lr=1e-3)])
    accuracy_calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )

    history = [test(train_set, test_set, model, accuracy_calculator, device, "before training")]
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train(model, loss_func, device, loader, optimizer, epoch, args.max_steps)
        history.append(test(train_set, test_set, model, accuracy_calculator, device, f"after epoch {epoch}"))
    first, last = history[0], history[-1]
    print(
        f"Summary: {args.epochs} epochs in {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} "
        f"thread(s); Precision@1 {first['precision_at_1']:.3f} -> {last['precision_at_1']:.3f}, "
        f"MAP@R {first['mean_average_precision_at_r']:.3f} -> {last['mean_average_precision_at_r']:.3f}"
    )
    return history  # accuracies before training and after each epoch


if __name__ == "__main__":
    main()
