"""The NIR term: agreement with a reference, batched likelihoods, miners, sampling."""

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss
from nir_loss.nir import miner_weights, weighted_element_losses

from . import reference

DATA = pathlib.Path(__file__).resolve().parent / "data"
FLOW = dict(num_blocks=3, hidden_features=16, num_layers=4, identity_init=False)
# The plain NLL: no training noise, no tail guard (what the references compute).
EXACT = dict(noise_std=0.0, guard_radius=math.inf)


def batch(b=12, d=8, c=5, dtype=torch.float64):
    x = F.normalize(torch.randn(b, d, dtype=dtype), dim=1).requires_grad_()
    return x, torch.randint(0, c, (b,))


@pytest.mark.parametrize("objective", ["nll", "exp_nll"])
def test_matches_independent_reference(objective):
    loss_fn = ProxyAnchorNIRLoss(5, 8, nir_weight=0.3, objective=objective, flow_options=FLOW, **EXACT).double()
    x, y = batch()
    expected = reference.proxy_anchor(x, y, loss_fn.proxies) + 0.3 * reference.nir_term(
        loss_fn.flow, x, loss_fn.proxies, y, objective
    )
    got = loss_fn(x, y)
    assert abs(float((got - expected).detach())) < 1e-6 * max(1.0, abs(float(expected.detach())))
    g_got = torch.autograd.grad(got, [x, loss_fn.proxies])
    g_exp = torch.autograd.grad(expected, [x, loss_fn.proxies])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_log_likelihood_is_minus_reference_nll():
    loss_fn = ProxyAnchorNIRLoss(5, 8, flow_options=FLOW).double()
    x, y = batch()
    expected = -reference.flow_nll(loss_fn.flow, x, F.normalize(loss_fn.proxies[y], dim=1))
    torch.testing.assert_close(loss_fn.log_likelihood(x, y), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_matches_labelled_pass_and_chunking(dtype):
    loss_fn = ProxyAnchorNIRLoss(7, 8, flow_options=FLOW).to(dtype)
    x, y = batch(b=11, c=7, dtype=dtype)
    full = loss_fn.log_likelihood_matrix(x)
    assert full.shape == (11, 7) and full.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for c in range(7):
        labels = torch.full((11,), c)
        torch.testing.assert_close(full[:, c], loss_fn.log_likelihood(x, labels), atol=tol, rtol=0)
    for chunk in (1, 3, 4, 11, 50):
        torch.testing.assert_close(loss_fn.log_likelihood_matrix(x, chunk_size=chunk), full, atol=tol, rtol=0)


def test_matrix_keeps_no_graph_unless_asked():
    """Grad enabled, embeddings that require grad, a trainable flow: by default no pass keeps its graph."""
    loss_fn = ProxyAnchorNIRLoss(7, 8, flow_options=FLOW).double()
    x, _ = batch(b=11, c=7)
    full = loss_fn.log_likelihood_matrix(x, chunk_size=2)
    assert full.grad_fn is None and not full.requires_grad
    with_grad = loss_fn.log_likelihood_matrix(x, chunk_size=2, requires_grad=True)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad.detach(), full, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(with_grad[:, 3].sum(), x)
    (expected,) = torch.autograd.grad(loss_fn.log_likelihood(x, torch.full((11,), 3)).sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=0)
    with torch.no_grad():  # the caller's no_grad still wins
        assert not loss_fn.log_likelihood_matrix(x, requires_grad=True).requires_grad


def test_multi_centre_losses_use_nearest_centre():
    base = losses.SoftTripleLoss(4, 6, centers_per_class=3)
    loss_fn = NIRRegularizer(base, flow_options=FLOW).double()
    x, y = batch(b=9, d=6, c=4)
    centres = F.normalize(base.fc.t().reshape(4, 3, 6), dim=-1)
    nearest = centres[y, (torch.einsum("bkd,bd->bk", centres[y], x)).argmax(1)]
    expected = -reference.flow_nll(loss_fn.flow, x, nearest)
    torch.testing.assert_close(loss_fn.log_likelihood(x, y), expected, atol=1e-10, rtol=0)
    matrix = loss_fn.log_likelihood_matrix(x, chunk_size=2)
    torch.testing.assert_close(matrix[torch.arange(9), y], expected, atol=1e-10, rtol=0)


def test_sample_is_the_flow_forward_of_base_draws():
    loss_fn = ProxyAnchorNIRLoss(5, 8, flow_options=FLOW).double()
    labels = torch.tensor([0, 0, 3, 4])
    x = loss_fn.sample(labels, generator=torch.Generator().manual_seed(1))
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(x, loss_fn.flow.forward(z, F.normalize(loss_fn.proxies[labels], dim=1)))
    # and the samples' latents are the draws: log p(sample) is exact
    torch.testing.assert_close(loss_fn.flow.inverse(x, F.normalize(loss_fn.proxies[labels], dim=1)), z)


def test_sampling_matches_likelihood_statistically():
    """Samples of p(x | rho) have the flow's mean NLL: E[NLL] = D/2 (1 + log 2pi) - E[log det]."""
    loss_fn = ProxyAnchorNIRLoss(3, 4, flow_options=FLOW)
    labels = torch.zeros(4000, dtype=torch.long)
    with torch.no_grad():
        x = loss_fn.sample(labels, generator=torch.Generator().manual_seed(0))
        z, _ = loss_fn.flow.inverse_and_log_det(x, F.normalize(loss_fn.proxies[labels], dim=1))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.05


def test_miner_weights_match_pml_and_handle_empty():
    labels = torch.randint(0, 3, (10,))
    x = torch.randn(10, 4)
    for miner in (miners.MultiSimilarityMiner(0.5), miners.TripletMarginMiner(0.5)):
        tup = miner(x, labels)
        ours = miner_weights(tup, 10, torch.float32, x.device)
        torch.testing.assert_close(ours, lmu.convert_to_weights(tup, labels, dtype=torch.float32))
    empty = (torch.tensor([], dtype=torch.long),) * 3
    assert miner_weights(empty, 10, torch.float32, x.device).abs().sum() == 0
    assert miner_weights(None, 10, torch.float32, x.device) is None
    losses_ = weighted_element_losses(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(losses_, torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("miner", [miners.MultiSimilarityMiner(0.3), miners.TripletMarginMiner(0.3)])
def test_nir_term_is_miner_weighted_mean(miner):
    loss_fn = NIRRegularizer(losses.ProxyNCALoss(5, 8), nir_weight=0.5, flow_options=FLOW, **EXACT).double()
    x, y = batch(b=16)
    tup = miner(x, y)
    w = lmu.convert_to_weights(tup, y, dtype=torch.float64)
    nll = reference.flow_nll(loss_fn.flow, x, F.normalize(loss_fn.loss.proxies[y], dim=1))
    nir_part = loss_fn(x, y, tup) - loss_fn.loss(x, y, tup)
    torch.testing.assert_close(nir_part, 0.5 * (w * nll).sum() / w.sum(), atol=1e-10, rtol=1e-10)


def test_miner_naming_nothing_gives_zero_nir_term():
    loss_fn = NIRRegularizer(losses.ProxyNCALoss(5, 8), nir_weight=0.5, flow_options=FLOW).double()
    x, y = batch()
    empty = tuple(torch.tensor([], dtype=torch.long) for _ in range(4))
    total = loss_fn(x, y, empty)
    assert torch.isfinite(total)
    torch.testing.assert_close(total, loss_fn.loss(x, y, empty))


def test_unnamed_samples_do_not_affect_nir_term():
    loss_fn = ProxyAnchorNIRLoss(5, 8, nir_weight=1.0, flow_options=FLOW, **EXACT).double()
    x, y = batch()
    tup = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1]), torch.tensor([4, 5]))
    nir = lambda e: loss_fn.nir.per_sample_loss(e, loss_fn.proxies, y)  # noqa: E731
    w = miner_weights(tup, 12, torch.float64, x.device)
    before = weighted_element_losses(nir(x), w).mean()
    x2 = x.detach().clone()
    x2[10] = -x2[10]  # sample 10 is never named
    torch.testing.assert_close(weighted_element_losses(nir(x2), w).mean(), before)


@pytest.mark.parametrize("d", [6, 7])
def test_state_dicts_saved_by_0_2_0_give_the_same_term_and_gradients(d):
    """A loss saved by nir-loss 0.2.0 (before the fused pass) loads and computes what it computed then.

    tests/data/nir_0.2.0_float64.pt holds the state dict, a batch, and 0.2.0's per-sample term
    (eval mode: no noise, default tail guard), log-likelihoods, matrix and gradients, in float64.
    """
    saved = torch.load(DATA / "nir_0.2.0_float64.pt", weights_only=True)[d]
    loss_fn = ProxyAnchorNIRLoss(5, d, flow_options=dict(num_blocks=2, hidden_features=8, num_layers=4)).double()
    loss_fn.load_state_dict(saved["state_dict"])
    loss_fn.eval()
    x, labels = saved["x"].clone().requires_grad_(), saved["labels"]
    assert loss_fn.flow._affine_plan(x) is not None  # computed by the fused pass
    per_sample = loss_fn.nir.per_sample_loss(x, loss_fn.proxies, labels)
    torch.testing.assert_close(per_sample, saved["per_sample_loss"], atol=1e-10, rtol=0)
    grads = torch.autograd.grad(per_sample.sum(), [x, *loss_fn.parameters()])
    torch.testing.assert_close(grads[0], saved["grad_x"], atol=1e-10, rtol=0)
    for (name, _), g in zip(loss_fn.named_parameters(), grads[1:]):
        torch.testing.assert_close(g, saved["grads"][name], atol=1e-10, rtol=0, msg=name)
    torch.testing.assert_close(loss_fn.log_likelihood(x, labels), saved["log_likelihood"], atol=1e-10, rtol=0)
    torch.testing.assert_close(loss_fn.log_likelihood_matrix(x), saved["matrix"], atol=1e-10, rtol=0)
