"""The NIR term: agreement with a reference, batched likelihoods, miners, sampling, the training
term's safeguards (input noise, tail guard, recorded NLL statistics), and no host sync."""

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss
from nir_loss.losses import miner_weights, weighted_element_losses
from nir_loss.nir import (
    OBJECTIVES,
    NIROptions,
    NIRTerm,
    Objective,
    default_guard_radius,
    default_nir_weight,
    default_noise_std,
    guarded_energy,
)

from . import reference
from .helpers import EXACT, FLOW, META

DATA = pathlib.Path(__file__).resolve().parent / "data"
# Deeper than FLOW: three blocks of four-layer subnets against the reference.
DEEP_FLOW = dict(num_blocks=3, hidden_features=16, num_layers=4, identity_init=False)


def batch(b=12, d=8, c=5, dtype=torch.float64):
    x = F.normalize(torch.randn(b, d, dtype=dtype), dim=1).requires_grad_()
    return x, torch.randint(0, c, (b,))


@pytest.mark.parametrize("objective", ["nll", "exp_nll"])
def test_matches_independent_reference(objective):
    loss_fn = ProxyAnchorNIRLoss(5, 8, nir_weight=0.3, objective=objective, flow_options=DEEP_FLOW, **EXACT).double()
    x, y = batch()
    # The flow models what ProxyAnchor's cosine compares: x / ||x|| (same value, projected gradient).
    expected = reference.proxy_anchor(x, y, loss_fn.proxies) + 0.3 * reference.nir_term(
        loss_fn.flow, F.normalize(x, dim=1), loss_fn.proxies, y, objective
    )
    got = loss_fn(x, y)
    assert abs(float((got - expected).detach())) < 1e-6 * max(1.0, abs(float(expected.detach())))
    g_got = torch.autograd.grad(got, [x, loss_fn.proxies])
    g_exp = torch.autograd.grad(expected, [x, loss_fn.proxies])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_log_likelihood_is_minus_reference_nll():
    loss_fn = ProxyAnchorNIRLoss(5, 8, flow_options=DEEP_FLOW).double()
    x, y = batch()
    expected = -reference.flow_nll(loss_fn.flow, x, F.normalize(loss_fn.proxies[y], dim=1))
    torch.testing.assert_close(loss_fn.log_likelihood(x, y), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_matches_labelled_pass_and_chunking(dtype):
    loss_fn = ProxyAnchorNIRLoss(7, 8, flow_options=DEEP_FLOW).to(dtype)
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
    loss_fn = ProxyAnchorNIRLoss(7, 8, flow_options=DEEP_FLOW).double()
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
    loss_fn = NIRRegularizer(base, flow_options=DEEP_FLOW).double()
    x, y = batch(b=9, d=6, c=4)
    centres = F.normalize(base.fc.t().reshape(4, 3, 6), dim=-1)
    nearest = centres[y, (torch.einsum("bkd,bd->bk", centres[y], x)).argmax(1)]
    expected = -reference.flow_nll(loss_fn.flow, x, nearest)
    torch.testing.assert_close(loss_fn.log_likelihood(x, y), expected, atol=1e-10, rtol=0)
    matrix = loss_fn.log_likelihood_matrix(x, chunk_size=2)
    torch.testing.assert_close(matrix[torch.arange(9), y], expected, atol=1e-10, rtol=0)


def test_sample_is_the_flow_forward_of_base_draws():
    loss_fn = ProxyAnchorNIRLoss(5, 8, flow_options=DEEP_FLOW).double()
    labels = torch.tensor([0, 0, 3, 4])
    x = loss_fn.sample(labels, generator=torch.Generator().manual_seed(1))
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(x, loss_fn.flow.forward(z, F.normalize(loss_fn.proxies[labels], dim=1)))
    # and the samples' latents are the draws: log p(sample) is exact
    torch.testing.assert_close(loss_fn.flow.inverse(x, F.normalize(loss_fn.proxies[labels], dim=1)), z)


def test_samples_map_back_to_the_standard_normal_base():
    """Samples of p(x | rho), sent back through the flow, have the base's mean 0 and variance 1."""
    loss_fn = ProxyAnchorNIRLoss(3, 4, flow_options=DEEP_FLOW)
    labels = torch.zeros(4000, dtype=torch.long)
    with torch.no_grad():
        x = loss_fn.sample(labels, generator=torch.Generator().manual_seed(0))
        z, _ = loss_fn.flow.inverse_and_log_det(x, F.normalize(loss_fn.proxies[labels], dim=1))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.05


@pytest.mark.parametrize("miner", [miners.MultiSimilarityMiner(0.3), miners.TripletMarginMiner(0.3)])
def test_nir_term_is_miner_weighted_mean(miner):
    loss_fn = NIRRegularizer(
        losses.ProxyNCALoss(5, 8), nir_weight=0.5, objective="nll", flow_options=DEEP_FLOW, **EXACT
    ).double()
    x, y = batch(b=16)
    tup = miner(x, y)
    w = lmu.convert_to_weights(tup, y, dtype=torch.float64)
    nll = reference.flow_nll(loss_fn.flow, x, F.normalize(loss_fn.loss.proxies[y], dim=1))
    nir_part = loss_fn(x, y, tup) - loss_fn.loss(x, y, tup)
    torch.testing.assert_close(nir_part, 0.5 * (w * nll).sum() / w.sum(), atol=1e-10, rtol=1e-10)


def test_miner_naming_nothing_gives_zero_nir_term():
    loss_fn = NIRRegularizer(losses.ProxyNCALoss(5, 8), nir_weight=0.5, flow_options=DEEP_FLOW).double()
    x, y = batch()
    empty = tuple(torch.tensor([], dtype=torch.long) for _ in range(4))
    total = loss_fn(x, y, empty)
    assert torch.isfinite(total)
    torch.testing.assert_close(total, loss_fn.loss(x, y, empty))


def test_unnamed_samples_do_not_affect_nir_term():
    loss_fn = ProxyAnchorNIRLoss(5, 8, nir_weight=1.0, flow_options=DEEP_FLOW, **EXACT).double()
    x, y = batch()
    tup = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1]), torch.tensor([4, 5]))
    nir = lambda e: loss_fn.nir.per_sample_loss(e, loss_fn.proxies, y)  # noqa: E731
    w = miner_weights(tup, 12, torch.float64, x.device)
    before = weighted_element_losses(nir(x), w).mean()
    x2 = x.detach().clone()
    x2[10] = -x2[10]  # sample 10 is never named
    torch.testing.assert_close(weighted_element_losses(nir(x2), w).mean(), before)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layer_loop"])
@pytest.mark.parametrize("d", [6, 7])
def test_state_dicts_saved_by_0_2_0_give_the_same_term_and_gradients(d, fused):
    """A loss saved by nir-loss 0.2.0 (before the fused pass) loads and computes what it computed then.

    tests/data/nir_0.2.0_float64.pt holds the state dict, a batch, and 0.2.0's per-sample term
    (eval mode: no noise, default tail guard), log-likelihoods, matrix and gradients, in float64.
    Its keys are 0.3.0's: each coupling's subnet at coupling.param_map, its context layer beside it.
    """
    saved = torch.load(DATA / "nir_0.2.0_float64.pt", weights_only=True)[d]
    flow_options = dict(num_blocks=2, hidden_features=8, num_layers=4)
    loss_fn = ProxyAnchorNIRLoss(5, d, objective="nll", flow_options=flow_options).double()  # 0.2.0's default
    loss_fn.load_state_dict(saved["state_dict"])
    loss_fn.eval()
    x, labels = saved["x"].clone().requires_grad_(), saved["labels"]
    loss_fn.flow.fused = fused
    per_sample = loss_fn.nir.per_sample_loss(x, loss_fn.proxies, labels)
    torch.testing.assert_close(per_sample, saved["per_sample_loss"], atol=1e-10, rtol=0)
    grads = torch.autograd.grad(per_sample.sum(), [x, *loss_fn.parameters()])
    torch.testing.assert_close(grads[0], saved["grad_x"], atol=1e-10, rtol=0)
    for (name, _), g in zip(loss_fn.named_parameters(), grads[1:]):
        old_name = name.replace(".param_map.context_layer.", ".context_layer.").replace(
            ".param_map.", ".coupling.param_map."
        )
        torch.testing.assert_close(g, saved["grads"][old_name], atol=1e-10, rtol=0, msg=name)
    torch.testing.assert_close(loss_fn.log_likelihood(x, labels), saved["log_likelihood"], atol=1e-10, rtol=0)
    torch.testing.assert_close(loss_fn.log_likelihood_matrix(x), saved["matrix"], atol=1e-10, rtol=0)


# -- the training term's safeguards: input noise, the tail guard, the recorded NLL statistics ---


def seeded_batch(b=10, d=8, c=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    return x, torch.randint(0, c, (b,), generator=g)


def test_switched_off_the_term_is_the_plain_nll():
    term = NIRTerm(8, "nll", noise_std=0.0, guard_radius=math.inf, **FLOW).double()
    x, y = seeded_batch()
    proxies = torch.randn(4, 8, dtype=torch.float64)
    expected = reference.flow_nll(term.flow, x, F.normalize(proxies[y], dim=1))
    loss, nll = term.loss_and_nll(x, proxies, y)
    assert torch.equal(loss, nll)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)


def test_defaults_scale_with_the_dimension():
    for d in (32, 128, 512):
        assert default_noise_std(d) * math.sqrt(d) == pytest.approx(0.7)
        assert default_guard_radius(d) == pytest.approx(2 * math.sqrt(d))
    term = NIRTerm(32, **FLOW)
    assert term.noise_std == default_noise_std(32) and term.guard_radius == default_guard_radius(32)


def test_noise_is_drawn_in_training_mode_only_and_is_reproducible():
    term = NIRTerm(8, "nll", noise_std=0.05, guard_radius=math.inf, **FLOW).double()
    x, y = seeded_batch()
    proxies = torch.randn(4, 8, dtype=torch.float64)
    clean = -term.log_likelihood(x, proxies, y)
    torch.manual_seed(3)
    first = term.per_sample_loss(x, proxies, y)
    torch.manual_seed(3)
    again = term.per_sample_loss(x, proxies, y)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, clean)
    # the noise is x + noise_std * randn from the given generator
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    expected = reference.flow_nll(term.flow, x + 0.05 * noise, F.normalize(proxies[y], dim=1))
    got = term.per_sample_loss(x, proxies, y, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    term.eval()
    torch.testing.assert_close(term.per_sample_loss(x, proxies, y), clean, atol=1e-12, rtol=0)


def test_loss_module_noise_follows_train_and_eval():
    loss_fn = ProxyAnchorNIRLoss(4, 8, nir_weight=1.0, flow_options=FLOW, guard_radius=math.inf).double()
    x, y = seeded_batch()
    a, b = loss_fn(x, y), loss_fn(x, y)
    assert not torch.equal(a, b)  # fresh noise each call
    loss_fn.eval()
    torch.testing.assert_close(loss_fn(x, y), loss_fn(x, y), atol=0, rtol=0)


def test_guard_is_continuous_in_value_and_gradient():
    radius = 3.0
    direction = F.normalize(torch.randn(1, 6, dtype=torch.float64), dim=1)
    values, grads = [], []
    for r in (radius * (1 - 1e-7), radius * (1 + 1e-7)):
        z = (r * direction).requires_grad_()
        e = guarded_energy(z, radius).sum()
        (g,) = torch.autograd.grad(e, z)
        values.append(float(e.detach()))
        grads.append(g)
    assert values[0] == pytest.approx(0.5 * radius**2, rel=1e-6) and values[1] == pytest.approx(values[0], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)
    # far out, the gradient with respect to z has norm radius; inside it is z
    z = (1e4 * direction).requires_grad_()
    (g,) = torch.autograd.grad(guarded_energy(z, radius).sum(), z)
    assert float(g.norm()) == pytest.approx(radius)
    z = (0.5 * direction).requires_grad_()
    (g,) = torch.autograd.grad(guarded_energy(z, radius).sum(), z)
    torch.testing.assert_close(g, z.detach())
    z = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)  # the unused branch's sqrt stays finite
    (g,) = torch.autograd.grad(guarded_energy(z, radius).sum(), z)
    assert torch.equal(g, torch.zeros_like(g))


def test_far_sample_gets_a_bounded_gradient_from_a_sharp_flow():
    # A small flow trained to be sharp on tightly bunched embeddings of one class.
    torch.manual_seed(0)
    term = NIRTerm(8, "nll", noise_std=0.0, guard_radius=math.inf, **FLOW)
    proxies, label = torch.randn(1, 8), torch.zeros(1, dtype=torch.long)
    centre = F.normalize(torch.randn(1, 8), dim=1)
    opt = torch.optim.Adam(term.parameters(), lr=1e-2)
    for _ in range(100):
        loss = term.per_sample_loss(centre + 0.01 * torch.randn(32, 8), proxies, label.expand(32)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    far = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(5)), dim=1)
    grads = {}
    for radius in (default_guard_radius(8), math.inf):
        term.guard_radius = radius
        x = far.clone().requires_grad_()
        (grads[radius],) = torch.autograd.grad(term.per_sample_loss(x, proxies, label).sum(), x)
    with torch.no_grad():
        z, _ = term.latent(far, proxies, label)
    radius = default_guard_radius(8)
    assert float(z.norm()) > 5 * radius  # the flow is sharp: the sample is far out in latent space
    # Without the guard the gradient grows with ||z||; with it, it is that of a sample at the radius.
    assert float(grads[math.inf].norm()) > 0.5 * float(z.norm()) / radius * float(grads[radius].norm())


def test_exp_objective_stays_finite_far_from_the_mode():
    term = NIRTerm(128, objective="exp_nll", guard_radius=math.inf, **FLOW)
    x = (20 * F.normalize(torch.randn(4, 128), dim=1)).requires_grad_()
    value = term.per_sample_loss(x, torch.randn(3, 128), torch.tensor([0, 1, 2, 0]))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(x.grad).all()


def test_recorded_nll_statistics():
    loss_fn = ProxyAnchorNIRLoss(4, 8, nir_weight=0.5, flow_options=FLOW)
    assert math.isnan(loss_fn.nir_nll_mean)
    assert {"nir_nll_mean", "nir_nll_max"} <= set(loss_fn._record_these)
    x, y = seeded_batch(dtype=torch.float32)
    loss_fn.eval()
    loss_fn(x, y)
    nll = -loss_fn.log_likelihood(x, y)
    assert loss_fn.nir_nll_mean.requires_grad is False
    torch.testing.assert_close(loss_fn.nir_nll_mean, nll.mean().detach())
    torch.testing.assert_close(loss_fn.nir_nll_max, nll.max().detach())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_std=-0.1),
        dict(noise_std=math.inf),
        dict(noise_std=math.nan),
        dict(guard_radius=0.0),
        dict(guard_radius=-1.0),
        dict(guard_radius=math.nan),
    ],
)
def test_bad_safeguard_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="noise_std|guard_radius"):
        ProxyAnchorNIRLoss(4, 8, flow_options=FLOW, **kwargs)


# -- no host sync: the term, its likelihoods and its matrix run on meta tensors ---------------


@pytest.mark.parametrize("objective", ["nll", "exp_nll"])
@pytest.mark.parametrize(
    "make",
    [
        lambda o: ProxyAnchorNIRLoss(7, 8, objective=o, flow_options=FLOW, validate=False),
        lambda o: NIRRegularizer(
            losses.SoftTripleLoss(7, 8, centers_per_class=2), objective=o, validate=False, flow_options=FLOW
        ),
    ],
)
def test_nir_term_runs_on_meta_tensors(make, objective):
    loss_fn = make(objective).to(META)
    x = torch.empty(12, 8, device=META, requires_grad=True)
    y = torch.empty(12, dtype=torch.long, device=META)
    pairs = tuple(torch.empty(5, dtype=torch.long, device=META) for _ in range(4))
    for tup in (None, pairs):
        entry = loss_fn._nir_loss_entry(x, y, tup)
        assert entry["losses"].shape in ((12,), ()) and entry["losses"].device == META
        entry["losses"].sum().backward()
    assert loss_fn.log_likelihood(x, y).shape == (12,)
    assert loss_fn.log_likelihood_matrix(x, chunk_size=5).shape == (12, 7)


# -- the centred flow: p(x | rho) is a flow of the offset (x - rho) * sqrt(D) ------------------
def test_centred_likelihood_is_the_flow_of_the_scaled_offset():
    loss_fn = ProxyAnchorNIRLoss(5, 8, centered=True, flow_options=DEEP_FLOW).double()
    x, y = batch()
    rho = F.normalize(loss_fn.proxies[y], dim=1)
    # Change of variables: u = (x - rho) sqrt(8) has log|det du/dx| = 4 log 8.
    expected = -reference.flow_nll(loss_fn.flow, (x - rho) * math.sqrt(8), rho) + 4 * math.log(8)
    torch.testing.assert_close(loss_fn.log_likelihood(x, y), expected, atol=1e-10, rtol=0)
    matrix = loss_fn.log_likelihood_matrix(x, chunk_size=5)
    torch.testing.assert_close(matrix[torch.arange(len(y)), y], expected, atol=1e-10, rtol=0)
    loss_fn.eval()  # no training noise: the training term's NLL is the same density
    torch.testing.assert_close(loss_fn.nir.loss_and_nll(x, loss_fn.proxies, y)[1], -expected, atol=1e-10, rtol=0)


def test_centred_density_integrates_to_one_in_2d():
    term = NIRTerm(2, centered=True, num_blocks=2, hidden_features=8, num_layers=3, identity_init=False).double()
    grid = torch.linspace(-6, 6, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    proxies = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    with torch.no_grad():
        log_p = term.log_likelihood(points, proxies, torch.zeros(len(points), dtype=torch.long))
    assert abs(float(log_p.exp().sum() * (grid[1] - grid[0]) ** 2) - 1.0) < 1e-4


def test_centred_density_peaks_at_the_own_proxy_from_the_start():
    """Identity flow: log p(x | rho_c) is an isotropic Gaussian around rho_c, so its argmax over
    classes is the nearest proxy (the uncentred flow is one density whatever the class)."""
    term = NIRTerm(16, centered=True, num_blocks=2, hidden_features=8, num_layers=3).eval()
    proxies = F.normalize(torch.randn(10, 16), dim=1)
    x = F.normalize(torch.randn(40, 16), dim=1)
    nearest = (x @ proxies.t()).argmax(1)
    torch.testing.assert_close(term.log_likelihood_matrix(x, proxies).argmax(1), nearest)


def test_centred_samples_have_the_flows_density():
    term = NIRTerm(4, centered=True, **DEEP_FLOW).double()
    proxies = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 2, 2])
    x = term.sample(proxies, labels, generator=torch.Generator().manual_seed(1))
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(term.latent(x, proxies, labels)[0], z)


# -- fit_flow: exp(NLL) for the embeddings, maximum likelihood for the flow -------------------
def test_fit_flow_adds_the_nll_gradient_to_the_flow_alone():
    fit = NIRTerm(8, "exp_nll", noise_std=0, fit_flow=True, **DEEP_FLOW).double()
    plain = NIRTerm(8, "exp_nll", flow=fit.flow, noise_std=0, fit_flow=False)
    mle = NIRTerm(8, "nll", flow=fit.flow, noise_std=0)
    proxies = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    x, y = batch()
    params = [x, proxies, *fit.flow.parameters()]
    got = fit.per_sample_loss(x, proxies, y).sum()
    expected = plain.per_sample_loss(x, proxies, y).sum()
    torch.testing.assert_close(got, expected)  # the term's value is exp(NLL)'s
    g_got = torch.autograd.grad(got, params)
    g_plain = torch.autograd.grad(expected, params)
    g_mle = torch.autograd.grad(mle.per_sample_loss(x, proxies, y).sum(), params)
    torch.testing.assert_close(g_got[:2], g_plain[:2])  # embeddings and proxies: exp(NLL) only
    for a, b, c in zip(g_got[2:], g_plain[2:], g_mle[2:]):
        torch.testing.assert_close(a, b + c)  # the flow: exp(NLL) + NLL
    assert any(c.abs().max() > 0 for c in g_mle[2:])


def test_fit_flow_defaults_off_and_is_refused_for_nll():
    assert not NIRTerm(8, "exp_nll", **FLOW).fit_flow and NIRTerm(8, "exp_nll", fit_flow=True, **FLOW).fit_flow
    with pytest.raises(ValueError, match="fit_flow"):
        ProxyAnchorNIRLoss(4, 8, objective="nll", fit_flow=True, flow_options=FLOW)


# -- objectives: one table entry each ------------------------------------------------------
@pytest.fixture
def softplus_nll():
    """A toy objective registered for one test: softplus of the guarded NLL, saturating."""
    OBJECTIVES["softplus_nll"] = Objective(
        lambda energy, constant: F.softplus(energy + constant), default_weight=lambda dim: 0.5, saturates=True
    )
    yield "softplus_nll"
    del OBJECTIVES["softplus_nll"]


def test_a_new_objective_is_one_table_entry(softplus_nll):
    loss_fn = ProxyAnchorNIRLoss(5, 8, objective=softplus_nll, flow_options=FLOW, **EXACT).double()
    assert loss_fn.nir_weight == 0.5 == default_nir_weight(8, softplus_nll)
    x, y = batch()
    term = loss_fn.nir.per_sample_loss(x, loss_fn.proxies, y)
    nll = reference.flow_nll(loss_fn.flow, x, F.normalize(loss_fn.proxies[y], dim=1))
    torch.testing.assert_close(term, F.softplus(nll))  # the entry's term of the NLL
    optimizer = torch.optim.Adam(loss_fn.param_groups(model_lr=1e-3))
    before = [p.detach().clone() for p in loss_fn.flow.parameters()]
    loss = loss_fn(x, y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, loss_fn.flow.parameters()))


def test_objectives_table_names_and_error_messages():
    assert "nll" in OBJECTIVES and list(OBJECTIVES) == ["nll", "exp_nll"]
    assert [OBJECTIVES[name].saturates for name in OBJECTIVES] == [False, True]
    energy = torch.tensor([1.0, 40.0])
    torch.testing.assert_close(OBJECTIVES["nll"].term(energy, 2.0), energy + 2.0)
    torch.testing.assert_close(OBJECTIVES["exp_nll"].term(energy[:1], 2.0), torch.exp(energy[:1]))
    for make in (
        lambda: NIROptions(objective="nlll"),
        lambda: NIRTerm(8, "nlll", **FLOW),
        lambda: ProxyAnchorNIRLoss(4, 8, objective="nlll"),
        lambda: default_nir_weight(8, "nlll"),
    ):
        with pytest.raises(ValueError, match=r"objective must be one of \('nll', 'exp_nll'\), got 'nlll'"):
            make()


def test_nir_options_are_checked_when_built_and_build_the_same_term():
    with pytest.raises(ValueError, match="fit_flow=True applies to objectives that saturate only"):
        NIROptions(objective="nll", fit_flow=True)
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        NIROptions(noise_std=-1.0)
    with pytest.raises(ValueError, match=r"guard_radius must be > 0 \(math.inf: no guard\)"):
        NIROptions(guard_radius=0.0)
    with pytest.raises(TypeError, match=r"unknown flow_options \['num_block'\]; .*num_blocks"):
        NIROptions(flow_options={"num_block": 2})
    term = NIRTerm(8, "nll", **FLOW)
    with pytest.raises(ValueError, match="Pass either flow= or flow options, not both"):
        NIROptions(flow=term.flow, flow_options={"num_blocks": 2})
    given = {"num_blocks": 1}
    options = NIROptions(flow_options=given, noise_std=0, centered=True)
    given["num_blocks"] = 3  # the options keep what they were built with
    built = NIRTerm.from_options(8, options)
    direct = NIRTerm(8, noise_std=0, centered=True, num_blocks=1)
    assert len(built.flow.flows) == len(direct.flow.flows) == 3
    for name in ("objective", "detach_proxies", "noise_std", "guard_radius", "centered", "fit_flow"):
        assert getattr(built, name) == getattr(direct, name), name
