# ruff: noqa: B023, E401, E402, E501, E701, E702, B007, UP031  (a short diagnostic script)
"""Why exp_nll is inert and nll grows: the NIR term and its embedding gradient over training (digits).

    python benchmarks/nir_dynamics.py     # about 30 s on 1 CPU thread

Trains the digits MLP for 200 steps with ProxyAnchorNIRLoss (exp_nll w=133, nll w=0.01) and
prints, every 50 steps, the NIR per-sample term, the mean log-det of the flow, and the mean
per-sample gradient norm on the embeddings of (weight x NIR term) vs the ProxyAnchor term.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
import quality as q

from nir_loss import ProxyAnchorNIRLoss

xtr, ytr, xte, yte = q.load_digits_split()
for obj, w in (("exp_nll", 133.0), ("nll", 0.01)):
    torch.manual_seed(0); model = q.MLP(64, 128)
    lf = ProxyAnchorNIRLoss(5, 128, nir_weight=w, objective=obj)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *lf.param_groups(1e-3, 100, 10)])
    g = torch.Generator().manual_seed(0)
    for step in range(201):
        idx = torch.randperm(len(ytr), generator=g)[:90]
        emb = model(xtr[idx]); loss = lf(emb, ytr[idx])
        if step % 50 == 0:
            with torch.no_grad():
                per = lf.nir.per_sample_loss(emb, lf.proxies, ytr[idx])
                z, ld = lf.nir.latent(emb, lf.proxies, ytr[idx])
            emb_g = emb.detach().requires_grad_()
            (w * lf.nir.per_sample_loss(emb_g, lf.proxies, ytr[idx]).mean()).backward()
            gn = emb_g.grad.norm(dim=1).mean().item()
            emb_p = emb.detach().requires_grad_()
            from pytorch_metric_learning.losses import ProxyAnchorLoss
            pa = ProxyAnchorLoss(5, 128); pa.proxies = lf.proxies
            pa(emb_p, ytr[idx]).backward()
            print(f"{obj} w={w} step {step}: NIR term mean {per.mean().item():.3g}, log_det mean {ld.mean().item():.1f}, "
                  f"|grad_emb| NIR {gn:.2e} vs PA {emb_p.grad.norm(dim=1).mean().item():.2e}")
        opt.zero_grad(); loss.backward(); opt.step()
