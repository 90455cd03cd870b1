# ruff: noqa: B023, E501  (closures are called within their loop iteration)
"""A/B of the coupling subnet's output layout under torch.compile: [shift | log-scale] halves
(nir-loss >= 0.2) vs interleaved (shift, log-scale) columns (0.1.0), next to the FrEIA flow.

    python benchmarks/speed_layout.py     # about 4 minutes on one CPU thread (cold compiles)

The interleaved variant is a copy of the same NIR term whose subnets run 0.1.0's
``shift_and_log_scale``; everything else is the same code and the same weights. Times: thread CPU time, medians of 15 interleaved repeats, NIR term fwd+bwd, C = 100.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.freia_ref import build_freia_flow, freia_log_likelihood  # noqa: E402
from nir_loss import NIRTerm  # noqa: E402
from nir_loss import flow as flow_module  # noqa: E402


class InterleavedParamMap(flow_module._ConditionedParamMap):
    def shift_and_log_scale(self, x_cond, encoded, index):
        """0.1.0's layout: shift and raw log-scale in alternating output columns."""
        return interleaved_shift_and_log_scale(self, x_cond, encoded, index)


def interleaved_shift_and_log_scale(self, x_cond, encoded, index):
    h = F.linear(x_cond, self.input_layer.weight, self.input_layer.bias)
    if encoded is not None:
        h = h.add_(flow_module._gather_rows(encoded, index).to(h.dtype))
    h = torch.relu_(h)
    for layer in self.mlp.net:
        h = F.linear(h, layer.weight, layer.bias) if isinstance(layer, torch.nn.Linear) else torch.relu_(h)
    param = h.to(x_cond.dtype)
    return param[:, 0::2], flow_module.soft_clamp(param[:, 1::2], self.clamp)


def main():
    torch.set_num_threads(1)
    for B, D in [(90, 128), (180, 512)]:
        torch.manual_seed(0)
        term, inn = NIRTerm(D, identity_init=False), build_freia_flow(D)
        # A separate copy whose subnets use the old layout: its own compiled graph (dynamo
        # guards on the module objects), the same weights.
        old_term = copy.deepcopy(term)
        for m in old_term.modules():
            if isinstance(m, flow_module._ConditionedParamMap):
                m.__class__ = InterleavedParamMap
        proxies = torch.randn(100, D, requires_grad=True)
        x0 = torch.randn(B, D, requires_grad=True)
        labels = torch.randint(0, 100, (B,))
        params = [*term.parameters(), *old_term.parameters(), *inn.parameters(), proxies, x0]

        def freia_nll(emb, proxies, labels):
            return -freia_log_likelihood(inn, emb, proxies, labels)

        def arm(fn):
            def run():
                for p in params:
                    p.grad = None
                fn(F.normalize(x0, dim=1), proxies, labels).mean().backward()
            return run
        fns = {"freia eager": arm(freia_nll),
               "NIR interleaved, compiled": arm(torch.compile(old_term.per_sample_loss, dynamic=False)),
               "NIR halves, compiled": arm(torch.compile(term.per_sample_loss, dynamic=False))}
        for f in fns.values():
            for _ in range(3):
                f()
        times = {k: [] for k in fns}
        for _ in range(15):
            for k, f in fns.items():
                c = time.thread_time()
                f()
                times[k].append(time.thread_time() - c)
        base = statistics.median(times["freia eager"])
        print(f"B={B} D={D}: " + ", ".join(f"{k} {statistics.median(v) / base:.3f}x" for k, v in times.items())
              + f" (FrEIA eager = {base * 1e3:.1f} ms)", flush=True)


if __name__ == "__main__":
    main()
