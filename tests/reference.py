"""Independent plain-torch reference implementations used by the tests."""

import math

import normflows as nf
import torch
import torch.nn.functional as F


def proxy_anchor(x, labels, proxies, alpha=32.0, margin=0.1):
    """Proxy Anchor loss (Kim et al., CVPR 2020), written from the paper's equation."""
    cos = F.normalize(x, dim=1) @ F.normalize(proxies, dim=1).t()
    pos = F.one_hot(labels, proxies.shape[0]).to(cos.dtype)
    pos_sum = (pos * torch.exp(-alpha * (cos - margin))).sum(0)
    neg_sum = ((1 - pos) * torch.exp(alpha * (cos + margin))).sum(0)
    with_pos = pos.sum(0) > 0
    return torch.log1p(pos_sum[with_pos]).sum() / with_pos.sum() + torch.log1p(neg_sum).sum() / proxies.shape[0]


def flow_nll(flow, x, context):
    """NLL of x under the flow, re-deriving every coupling from its weights (x -> z direction)."""
    log_det = torch.zeros(x.shape[0], dtype=x.dtype)
    for layer in reversed(flow.flows):
        if isinstance(layer, nf.flows.Permute):
            x = x[:, layer.inv_perm]
            continue
        x_t, x_c = x[:, layer.transformed], x[:, layer.conditioner]
        param_map = layer.param_map
        h = x_c @ param_map.input_layer.weight.t() + param_map.input_layer.bias
        h = h + context @ param_map.context_layer.weight.t()
        for lin in [m for m in param_map.mlp.modules() if isinstance(m, torch.nn.Linear)]:
            h = torch.relu(h) @ lin.weight.t() + lin.bias
        n_t = h.shape[1] // 2
        shift, raw = h[:, :n_t], h[:, n_t:]  # the last layer's rows: [shift | log-scale]
        s = layer.clamp * 0.636 * torch.atan(raw)  # FrEIA's "ATAN" soft clamp
        x = x.clone()
        x[:, layer.transformed] = x_t * torch.exp(s) + shift
        log_det = log_det + s.sum(1)
    d = x.shape[1]
    return 0.5 * (x**2).sum(1) + 0.5 * d * math.log(2 * math.pi) - log_det


def nir_term(flow, x, proxies, labels, objective):
    """Mean NIR term of a batch for the given objective."""
    nll = flow_nll(flow, x, F.normalize(proxies[labels], dim=1))
    if objective == "exp_nll":
        return torch.exp(nll - 0.5 * x.shape[1] * math.log(2 * math.pi)).mean()
    return nll.mean()
