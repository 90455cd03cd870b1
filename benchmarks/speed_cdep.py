# ruff: noqa: B023, E401, E402, E501, E701, E702, B007, UP031  (a short diagnostic script)
"""At D=512, B=90: NIR term alone vs FrEIA flow alone vs full losses, at C=100 and C=11318.

    python benchmarks/speed_cdep.py      # about 1 minute; thread CPU time, 1 thread, medians of 8

Columns: term = NIRTerm.per_sample_loss fwd+bwd; freia = the FrEIA flow NLL fwd+bwd; full_nir =
ProxyAnchorNIRLoss fwd+bwd; nir_w0 = the same with nir_weight=0 (plain ProxyAnchor).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1])); torch.set_num_threads(1)
import torch.nn.functional as F

from benchmarks.freia_ref import build_freia_flow, freia_log_likelihood
from nir_loss import ProxyAnchorNIRLoss

D, B = 512, 90
for C in (100, 11318):
    torch.manual_seed(0)
    nir = ProxyAnchorNIRLoss(C, D, validate=False, flow_options={"identity_init": False})
    inn = build_freia_flow(D)
    x0 = torch.randn(B, D, requires_grad=True); y = torch.randint(0, C, (B,))
    P = nir.proxies
    fs = {"term": lambda: nir.nir.per_sample_loss(F.normalize(x0, dim=1), P, y).mean().backward(),
          "freia": lambda: (-freia_log_likelihood(inn, F.normalize(x0, dim=1), P, y)).mean().backward(),
          "full_nir": lambda: nir(F.normalize(x0, dim=1), y).backward(),
          "nir_w0": None}
    nir0 = ProxyAnchorNIRLoss(C, D, validate=False, nir_weight=0.0)
    fs["nir_w0"] = lambda: nir0(F.normalize(x0, dim=1), y).backward()
    ts = {k: [] for k in fs}
    for r in range(9):
        for k, f in fs.items():
            for m in (nir, inn, nir0):
                for p in m.parameters(): p.grad = None
            t = time.thread_time(); f(); ts[k].append(time.thread_time() - t)
    print(C, {k: round(statistics.median(v[1:]) * 1e3, 1) for k, v in ts.items()})
