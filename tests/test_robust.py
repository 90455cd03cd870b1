"""The training term's safeguards: input noise, the tail guard, the recorded NLL statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from nir_loss import ProxyAnchorNIRLoss
from nir_loss.nir import NIRTerm, default_guard_radius, default_noise_std, guarded_energy

from . import reference

FLOW = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)


def batch(b=10, d=8, c=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    return x, torch.randint(0, c, (b,), generator=g)


def test_switched_off_the_term_is_the_plain_nll():
    term = NIRTerm(8, noise_std=0.0, guard_radius=math.inf, **FLOW).double()
    x, y = batch()
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
    term = NIRTerm(8, noise_std=0.05, guard_radius=math.inf, **FLOW).double()
    x, y = batch()
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
    x, y = batch()
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
    term = NIRTerm(8, noise_std=0.0, guard_radius=math.inf, **FLOW)
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
    x, y = batch(dtype=torch.float32)
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
