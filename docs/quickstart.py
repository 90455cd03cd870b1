"""Quick start: a training step with ProxyAnchor + NIR, and NIR added to another PML loss."""

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss

num_classes, embedding_size = 10, 32
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, embedding_size))

# ProxyAnchorLoss with the NIR term built in (nir_weight 1.28 / D, objective="nll" by default).
loss_fn = ProxyAnchorNIRLoss(num_classes=num_classes, embedding_size=embedding_size)
# The loss owns parameters (proxies and the flow): give them to the optimizer, with their own lr.
optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-4}, *loss_fn.param_groups(lr=1e-4)])

inputs, labels = torch.randn(32, 64), torch.randint(0, num_classes, (32,))
embeddings = F.normalize(model(inputs), dim=1)  # NIR models L2-normalized embeddings
loss = loss_fn(embeddings, labels)
optimizer.zero_grad()
loss.backward()
optimizer.step()
print(f"ProxyAnchor + NIR loss: {loss.item():.3f}")

# Any proxy-based PML loss: wrap it (here ArcFace, whose class weights are the proxies).
arcface_nir = NIRRegularizer(ArcFaceLoss(num_classes, embedding_size), weight=0.01)
print(f"ArcFace + NIR loss: {arcface_nir(embeddings.detach(), labels).item():.3f}")

# What the flow learned: log p(embedding | proxy of its class), one value per sample.
print(loss_fn.log_likelihood(embeddings.detach(), labels).shape)
