# ruff: noqa: B023, E401, E402, E501, E701, E702, B007, UP031  (a short diagnostic script)
"""User vs system CPU time and page faults per loss call at B=90, D=512, C=11318 (CPU).

    python benchmarks/speed_pagefaults.py
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/speed_pagefaults.py

glibc hands large blocks (ProxyAnchor's B x C tensors) back to the OS after each call and
page-faults them in again on the next one; with the thresholds raised the faults disappear.
"""
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1])); torch.set_num_threads(1)
import torch.nn.functional as F

from benchmarks.speed import make_losses, zero_grads

pa, nir, freia_loss, x0, labels, mods = make_losses(90, 512, 11318, torch.device("cpu"))
fns = {"pa": pa, "nir": nir, "freia": freia_loss}
res = {k: [] for k in fns}
for rep in range(8):
    for k, fn in fns.items():
        zero_grads(mods, x0)
        a = resource.getrusage(resource.RUSAGE_THREAD)
        fn(F.normalize(x0, dim=1), labels).backward()
        b = resource.getrusage(resource.RUSAGE_THREAD)
        res[k].append((b.ru_utime - a.ru_utime, b.ru_stime - a.ru_stime, b.ru_minflt - a.ru_minflt))
for k, v in res.items():
    v = v[2:]
    print(k, "user %.1f ms sys %.1f ms minor faults %d" % tuple(statistics.median(x[i] for x in v) * (1e3 if i < 2 else 1) for i in range(3)))
