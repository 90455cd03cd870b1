"""Quick start: a step with ProxyAnchor + NIR; NIR added to another loss."""

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss

num_classes, embedding_size = 10, 32
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128),
    torch.nn.ReLU(),
    torch.nn.Linear(128, embedding_size),
)

# ProxyAnchorLoss with the NIR term built in (by default the reference code's
# objective="exp_nll" at its CUB weight, nir_weight=1/0.0075).
loss_fn = ProxyAnchorNIRLoss(num_classes, embedding_size)
# The loss owns parameters (proxies, flow): give them to the optimizer. Pass
# your model's lr: the proxies train at 100x it (1e-2), the flow at 1x.
groups = [{"params": model.parameters(), "lr": 1e-4}]
groups += loss_fn.param_groups(model_lr=1e-4)
optimizer = torch.optim.Adam(groups)

inputs = torch.randn(32, 64)
labels = torch.randint(0, num_classes, (32,))
embeddings = F.normalize(model(inputs), dim=1)  # or model(inputs): same loss
loss = loss_fn(embeddings, labels)
optimizer.zero_grad()
loss.backward()
optimizer.step()
print(f"ProxyAnchor + NIR loss: {loss.item():.3f}")

# Any proxy-based PML loss: wrap it (ArcFace's class weights are its proxies).
arcface_nir = NIRRegularizer(
    ArcFaceLoss(num_classes, embedding_size), nir_weight=0.01
)
print(f"ArcFace + NIR loss: {arcface_nir(embeddings.detach(), labels):.3f}")

# What the flow learned: log p(embedding | its class's proxy), one per sample.
print(loss_fn.log_likelihood(embeddings.detach(), labels).shape)
