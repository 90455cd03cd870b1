"""A short real-data training: the NIR likelihood rises and held-out retrieval is measured."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits

from nir_loss import ProxyAnchorNIRLoss


def digits_split():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    # Class-independent nuisance features: an untrained net mixes them in, a trained one learns
    # to ignore them, which shows on classes it never saw.
    noise = torch.randn(len(x), 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, noise], dim=1)
    train = y < 5
    return x[train], y[train], x[~train], y[~train] - 5


def recall_at_1(model, x, y):
    with torch.no_grad():
        emb = F.normalize(model(x), dim=1)
    calc = AccuracyCalculator(include=("precision_at_1",), k=1, knn_func=CustomKNN(CosineSimilarity()))
    return calc.get_accuracy(emb, y)["precision_at_1"]


def test_short_training_on_digits():
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    flow_options = dict(num_blocks=2, num_layers=4, hidden_features=64)
    loss_fn = ProxyAnchorNIRLoss(5, 32, nir_weight=0.01, flow_options=flow_options)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *loss_fn.param_groups(1e-3)])
    untrained = recall_at_1(model, x_te, y_te)
    nll = []
    for _ in range(300):
        idx = torch.randint(0, len(x_tr), (64,))
        emb = F.normalize(model(x_tr[idx]), dim=1)
        loss = loss_fn(emb, y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        nll.append(-loss_fn.log_likelihood(emb.detach(), y_tr[idx]).mean().item())
    trained = recall_at_1(model, x_te, y_te)
    assert sum(nll[-20:]) / 20 < sum(nll[:20]) / 20 - 5.0  # the flow learns the class-conditional density
    print(f"held-out R@1 untrained {untrained:.3f} trained {trained:.3f}")
    assert trained > untrained + 0.02, (untrained, trained)  # held-out classes, measured


def test_readme_quick_start_runs_as_written():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python quick start"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
