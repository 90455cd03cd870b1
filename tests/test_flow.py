"""Flow invariants: invertibility, exact log-det, normalization, normflows contract, precision."""

import copy
import io
import math
import pickle
import re
from collections import OrderedDict

import normflows as nf
import pytest
import torch
import torch.nn.functional as F

from nir_loss import ProxyConditionedFlow
from nir_loss.flow import COUPLINGS, ContextAffineCoupling, soft_clamp
from nir_loss.testing import check_flow


def make_flow(d, coupling="affine", **kw):
    options = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False, coupling=coupling)
    options.update(kw)
    return ProxyConditionedFlow(d, **options).double()


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("d", [2, 3, 8])
def test_inverse_then_forward_is_identity(coupling, d):
    flow = make_flow(d, coupling)
    x = F.normalize(torch.randn(16, d, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(16, d, dtype=torch.float64), dim=1)
    z, log_det = flow.inverse_and_log_det(x, c)
    x_back, log_det_back = flow.forward_and_log_det(z, c)
    assert (z - x).abs().max() > 1e-3  # the flow is not the identity
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_det + log_det_back, torch.zeros_like(log_det), atol=1e-10, rtol=0)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("d", [2, 3, 8])
def test_log_det_matches_autograd_jacobian(coupling, d):
    flow = make_flow(d, coupling)
    x = F.normalize(torch.randn(4, d, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(4, d, dtype=torch.float64), dim=1)
    _, log_det = flow.inverse_and_log_det(x, c)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: flow.inverse(v[None], c[i : i + 1])[0], x[i])
        expected = torch.linalg.slogdet(jac)[1]
        assert abs(float(log_det[i].detach() - expected)) < 1e-10


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_density_integrates_to_one_in_2d(coupling):
    flow = make_flow(2, coupling, num_blocks=3)
    grid = torch.linspace(-10, 10, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    context = torch.tensor([[0.6, 0.8]], dtype=torch.float64).expand(len(points), 2)
    with torch.no_grad():
        mass = flow.log_prob(points, context).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-4


def test_log_prob_is_base_log_prob_plus_log_det():
    flow = make_flow(4)
    x, c = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    z, log_det = flow.inverse_and_log_det(x, c)
    expected = -0.5 * (z**2).sum(1) - 2 * math.log(2 * math.pi) + log_det
    torch.testing.assert_close(flow.log_prob(x, c), expected)
    # normflows' own base distribution gives the same base term
    torch.testing.assert_close(flow.q0.log_prob(z), expected - log_det)


def test_context_changes_the_density():
    flow = make_flow(4)
    x = torch.randn(3, 4, dtype=torch.float64)
    c1, c2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert (flow.log_prob(x, c1) - flow.log_prob(x, c2)).abs().min() > 1e-6


def test_encoded_context_with_index_equals_gathered_context():
    flow = make_flow(6, context_mlp_width=5)
    classes = torch.randn(4, 6, dtype=torch.float64)
    index = torch.tensor([3, 0, 0, 2, 1, 3])
    x = torch.randn(6, 6, dtype=torch.float64)
    direct = flow.log_prob(x, classes[index])
    via_index = flow.log_prob(x, encoded=flow.encode_context(classes), context_index=index)
    torch.testing.assert_close(direct, via_index, atol=1e-12, rtol=0)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_gradients_reach_every_parameter(coupling):
    flow = make_flow(6, coupling, context_mlp_width=8)
    x, c = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    flow.log_prob(x, c).sum().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_identity_init_starts_as_identity():
    flow = ProxyConditionedFlow(8, num_blocks=2, hidden_features=16, num_layers=3)
    x, c = torch.randn(5, 8), torch.randn(5, 8)
    z, log_det = flow.inverse_and_log_det(x, c)
    # permutations only: the same multiset of values, zero log-det
    torch.testing.assert_close(z.sort(1).values, x.sort(1).values)
    assert log_det.abs().max() == 0


def test_reference_architecture_defaults():
    flow = ProxyConditionedFlow(16)
    couplings = [m for m in flow.flows if isinstance(m, ContextAffineCoupling)]
    permutes = [m for m in flow.flows if isinstance(m, nf.flows.Permute)]
    assert len(permutes) == 5 and len(couplings) == 10  # 5 x [permutation, GLOW block of two halves]
    linears = [m for m in couplings[0].modules() if isinstance(m, torch.nn.Linear)]
    # 8 subnet layers (the first one split into an input and a context part), width 128
    assert len(linears) == 9 and all(m.out_features == 128 for m in linears[:-1])
    assert isinstance(flow.q0, nf.distributions.DiagGaussian) and isinstance(flow, nf.ConditionalNormalizingFlow)


def _permutations(flow):
    return [m.perm for m in flow.flows if isinstance(m, nf.flows.Permute)]


def test_permutations_depend_on_seed_only():
    """Whatever the global RNG's state, `seed` alone fixes the permutations."""
    torch.manual_seed(1)
    a = ProxyConditionedFlow(8, num_blocks=3, seed=1)
    torch.manual_seed(2)
    torch.rand(5)
    b, c = ProxyConditionedFlow(8, num_blocks=3, seed=1), ProxyConditionedFlow(8, num_blocks=3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(_permutations(a), _permutations(b)))
    assert not all(torch.equal(p, q) for p, q in zip(_permutations(a), _permutations(c)))
    for m in a.flows:
        if isinstance(m, nf.flows.Permute):
            assert torch.equal(m.perm[m.inv_perm], torch.arange(8))


def test_weights_come_from_the_global_rng():
    """As documented: torch.manual_seed makes the weights reproducible, `seed` does not change them."""

    def weights(global_seed, seed):
        torch.manual_seed(global_seed)
        flow = ProxyConditionedFlow(8, num_blocks=2, hidden_features=16, num_layers=3, seed=seed)
        return torch.cat([p.detach().flatten() for p in flow.parameters()])

    assert torch.equal(weights(0, seed=1), weights(0, seed=2))
    assert not torch.equal(weights(0, seed=1), weights(1, seed=1))
    state = torch.random.get_rng_state()
    ProxyConditionedFlow(8, num_blocks=2, hidden_features=16, num_layers=3)
    assert not torch.equal(state, torch.random.get_rng_state())  # building a flow advances the global RNG


def test_soft_clamp_matches_freia_atan():
    s = torch.linspace(-50, 50, 101)
    torch.testing.assert_close(soft_clamp(s, 2.0), 2.0 * 0.636 * torch.atan(s))
    assert soft_clamp(torch.tensor(1e9), 2.0) < 2.0


def test_normflows_affine_coupling_behaviour_is_pinned():
    """Pins what ContextAffineCoupling relies on in normflows' AffineCoupling."""
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, z1):
            seen["z1"] = z1
            return torch.tensor([[0.5, 0.1, -1.0, 0.2]])  # interleaved (shift, log-scale) x 2

    layer = nf.flows.AffineCoupling(Recorder(), scale=True, scale_map="exp")
    token = object()
    z2 = torch.tensor([[2.0, 3.0]])
    (out1, out2), log_det = layer.forward([token, z2])
    assert seen["z1"] is token and out1 is token  # param_map gets z1 as is; z1 is returned untouched
    shift, log_scale = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.1, 0.2]])
    torch.testing.assert_close(out2, z2 * torch.exp(log_scale) + shift)
    torch.testing.assert_close(log_det, log_scale.sum(1))
    (_, back), inv_log_det = layer.inverse([token, out2])
    torch.testing.assert_close(back, z2)
    torch.testing.assert_close(inv_log_det, -log_scale.sum(1))


def test_coupling_is_a_normflows_layer():
    layer = ContextAffineCoupling(4, context_features=3, hidden_features=8, num_layers=3, identity_init=False)
    model = nf.ConditionalNormalizingFlow(
        nf.distributions.DiagGaussian(4, trainable=False), [layer, nf.flows.Permute(4), layer]
    )
    x, c = torch.randn(5, 4), torch.randn(5, 3)
    torch.testing.assert_close(model.forward(model.inverse(x, c), c), x, atol=1e-5, rtol=0)
    assert model.log_prob(x, c).shape == (5,)
    with pytest.raises(ValueError, match="context"):
        layer.inverse(x)


@pytest.mark.parametrize("fused", [True, False])
def test_autocast_leaves_the_flow_in_float32(fused):
    """Autocast is switched off inside the flow: no per-layer casts, the same numbers as without it."""
    flow = ProxyConditionedFlow(16, hidden_features=32, num_layers=3, identity_init=False, fused=fused)
    x, c = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(6, 16), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_det = flow.inverse_and_log_det(x, c)
        lp = flow.log_prob(x, c)
    assert z.dtype == log_det.dtype == lp.dtype == torch.float32
    torch.testing.assert_close(lp, flow.log_prob(x, c), atol=0, rtol=0)
    assert flow.double().log_prob(x.double(), c.double()).dtype == torch.float64


def test_sample_maps_base_draws_through_forward():
    flow = make_flow(4)
    c = torch.randn(7, 4, dtype=torch.float64)
    x, log_q = flow.sample(7, c, generator=torch.Generator().manual_seed(3))
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(x, flow.forward(z, c))
    torch.testing.assert_close(log_q, flow.log_prob(x, c))


def test_state_dict_deepcopy_pickle_round_trip():
    flow = make_flow(5)
    x, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = flow.log_prob(x, c)
    other = make_flow(5, seed=9)
    other.load_state_dict(flow.state_dict())
    buffer = io.BytesIO()
    torch.save(flow, buffer)
    buffer.seek(0)
    state_buffer = io.BytesIO()
    torch.save(flow.state_dict(), state_buffer)  # keeps the modules' state-dict versions
    state_buffer.seek(0)
    from_file = make_flow(5, seed=9)
    from_file.load_state_dict(torch.load(state_buffer, weights_only=True))
    for clone in (
        other,
        from_file,
        copy.deepcopy(flow),
        pickle.loads(pickle.dumps(flow)),
        torch.load(buffer, weights_only=False),
    ):
        torch.testing.assert_close(clone.log_prob(x, c), expected)


def _as_version_1(flow, state):
    """``state`` as nir-loss 0.1.0 saved it: each subnet's last layer interleaved (shift, log-scale)."""
    for name, module in flow.named_modules():
        if name.endswith("param_map"):
            last = f"{name}.mlp.net.{len(module.mlp.net) - 1}."
            for key in (last + "weight", last + "bias"):
                shift, raw = state[key].chunk(2)
                state[key] = torch.stack([shift, raw], 1).flatten(0, 1)
            state._metadata[name]["version"] = 1
    return state


def test_version_1_state_dicts_are_converted_on_load():
    flow = make_flow(6)
    x, c = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    old_state = _as_version_1(flow, flow.state_dict())
    loaded = make_flow(6, seed=9)
    loaded.load_state_dict(old_state)
    torch.testing.assert_close(loaded.log_prob(x, c), flow.log_prob(x, c))
    # The same rows read as version 2 are a different flow: the conversion is what makes it match.
    for meta in old_state._metadata.values():
        meta.pop("version", None)
    unconverted = make_flow(6, seed=9)
    unconverted.load_state_dict(old_state)
    assert not torch.allclose(unconverted.log_prob(x, c), flow.log_prob(x, c))


def _with_release_0_3_keys(state):
    """``state`` keyed as nir-loss 0.3.0 and earlier saved it: each subnet at ``coupling.param_map``
    (inside a stock normflows AffineCoupling), its context layer beside it at ``context_layer``."""

    def old(key):
        key = re.sub(r"(flows\.\d+\.)param_map\.context_layer\.", r"\1context_layer.", key)
        return re.sub(r"(flows\.\d+\.)param_map\.", r"\1coupling.param_map.", key)

    out = OrderedDict((old(k), v) for k, v in state.items())
    out._metadata = OrderedDict((old(k + ".")[:-1], dict(m)) for k, m in state._metadata.items())
    for path, meta in out._metadata.items():
        if re.fullmatch(r"flows\.\d+", path) and f"{path}.coupling.param_map" in out._metadata:
            meta["version"] = 1
    return out


@pytest.mark.parametrize("subnet_version", [1, 2], ids=["0.1.0", "0.2.0-0.3.0"])
def test_state_dicts_keyed_by_earlier_releases_load(subnet_version):
    flow = make_flow(6)
    x, c = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    state = flow.state_dict()
    if subnet_version == 1:
        state = _as_version_1(flow, state)
    old_state = _with_release_0_3_keys(state)
    assert "flows.1.coupling.param_map.input_layer.weight" in old_state and "flows.1.context_layer.weight" in old_state
    buffer = io.BytesIO()
    torch.save(old_state, buffer)  # keeps the metadata
    buffer.seek(0)
    for loaded_state in (old_state, torch.load(buffer, weights_only=True)):
        loaded = make_flow(6, seed=9)
        loaded.load_state_dict(loaded_state)
        torch.testing.assert_close(loaded.log_prob(x, c), flow.log_prob(x, c), atol=1e-12, rtol=0)
    if subnet_version == 2:  # the keys move in any module that holds the flow
        holder = torch.nn.ModuleDict({"flow": make_flow(6, seed=9)})
        holder.load_state_dict({f"flow.{k}": v for k, v in old_state.items()})
        torch.testing.assert_close(holder["flow"].log_prob(x, c), flow.log_prob(x, c), atol=1e-12, rtol=0)


class _ToyCoupling(nf.flows.Flow):
    """A coupling kind for the test of the table: y_t = x_t * exp(s(context)) + t(x_c, context)."""

    def __init__(self, features, context_features, transform_first):
        super().__init__()
        self.features, self.context_features, self.context_width = features, context_features, context_features
        split = round(features / 2)
        self.sizes, self.transform_first = (split, features - split), transform_first
        n_t = split if transform_first else features - split
        self.scale = torch.nn.Linear(context_features, n_t)
        self.shift = torch.nn.Linear(features - n_t + context_features, n_t)

    def encode_context(self, context):
        return context

    def _step(self, x, encoded, density):
        first, second = x.split(self.sizes, dim=1)
        x_t, x_c = (first, second) if self.transform_first else (second, first)
        s, t = torch.tanh(self.scale(encoded)), self.shift(torch.cat([x_c, encoded], dim=1))
        y_t = x_t * torch.exp(s) + t if density else (x_t - t) * torch.exp(-s)
        parts = (y_t, x_c) if self.transform_first else (x_c, y_t)
        return torch.cat(parts, dim=1), s.sum(1) if density else -s.sum(1)

    def _rows(self, context, encoded, context_index):
        if encoded is None:
            return context
        return encoded if context_index is None else encoded[context_index]

    def inverse(self, z, context=None, *, encoded=None, context_index=None):
        return self._step(z, self._rows(context, encoded, context_index), True)

    def forward(self, z, context=None, *, encoded=None, context_index=None):
        return self._step(z, self._rows(context, encoded, context_index), False)


def test_a_new_coupling_kind_is_one_table_entry(monkeypatch):
    monkeypatch.setitem(COUPLINGS, "toy", lambda d, ctx, first, options: _ToyCoupling(d, ctx, first))
    flow = ProxyConditionedFlow(5, num_blocks=2, coupling="toy")
    assert sum(isinstance(m, _ToyCoupling) for m in flow.flows) == 4
    check_flow(flow)  # shapes, inverse round trip, log-det = slogdet of the Jacobian, gradients, context
    x, c = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(flow.forward(flow.inverse(x, c), c), x, atol=1e-5, rtol=0)


def test_compiles_fullgraph():
    flow = ProxyConditionedFlow(8, num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)
    x, c = torch.randn(6, 8), torch.randn(6, 8)
    compiled = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, c), flow.log_prob(x, c))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"coupling must be one of \['affine', 'spline'\], got 'nope'"):
        ProxyConditionedFlow(4, coupling="nope")
    with pytest.raises(ValueError, match="context"):
        ProxyConditionedFlow(4).log_prob(torch.randn(2, 4))


@pytest.mark.parametrize("transform_first", [True, False])
def test_fused_coupling_equals_the_stock_normflows_affine_coupling(transform_first):
    """The fast path computes exactly what normflows' AffineCoupling does with the same subnet."""
    layer = ContextAffineCoupling(
        7, context_features=5, hidden_features=16, num_layers=3, transform_first=transform_first, identity_init=False
    ).double()
    x, c = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    encoded = layer.encode_context(c)

    class Interleaved(torch.nn.Module):
        """The coupling's subnet as normflows' AffineCoupling reads it: (shift, clamped log-scale) interleaved."""

        def forward(self, x_c):
            shift, raw = layer.param_map(x_c, encoded).chunk(2, dim=1)
            return torch.stack([shift, soft_clamp(raw, layer.clamp)], dim=-1).flatten(-2)

    stock = nf.flows.AffineCoupling(Interleaved(), scale=True, scale_map="exp")
    x_t, x_c = x[:, layer.transformed], x[:, layer.conditioner]
    for density, stock_step in ((True, stock.forward), (False, stock.inverse)):
        (_, y_t), stock_log_det = stock_step([x_c, x_t])
        y, log_det = (layer.inverse if density else layer.forward)(x, context=c)
        torch.testing.assert_close(y[:, layer.transformed], y_t, atol=1e-14, rtol=0)
        torch.testing.assert_close(y[:, layer.conditioner], x_c, atol=0, rtol=0)
        torch.testing.assert_close(log_det, stock_log_det, atol=1e-14, rtol=0)


def _uses_fused_path(t):
    return type(t.grad_fn).__name__ == "_FusedDensityBackward"


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer_weight_grads", "batched_weight_grads"])
@pytest.mark.parametrize("d, num_layers, context_mlp", [(8, 3, False), (7, 4, True), (6, 2, False), (3, 3, False)])
def test_fused_density_equals_autograd_through_the_layer_loop(d, num_layers, context_mlp, batched):
    """z, log-det and the gradients of input, context and every parameter, in float64."""
    fused = make_flow(d, num_blocks=3, num_layers=num_layers, context_mlp_width=5 if context_mlp else None, fused=True)
    fused.batched_weight_grads = batched
    layers = copy.deepcopy(fused)
    layers.fused = False
    x = F.normalize(torch.randn(11, d, dtype=torch.float64), dim=1).requires_grad_()
    c = F.normalize(torch.randn(11, d, dtype=torch.float64), dim=1).requires_grad_()
    z, log_det = fused.inverse_and_log_det(x, c)
    z_ref, log_det_ref = layers.inverse_and_log_det(x, c)
    assert _uses_fused_path(z) and not _uses_fused_path(z_ref)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det, log_det_ref, atol=1e-12, rtol=0)
    w_z, w_ld = torch.randn_like(z), torch.randn_like(log_det)
    for name, objective in (
        ("both", lambda z, ld: (z * w_z).sum() + (ld * w_ld).sum()),
        ("z only", lambda z, ld: (z * w_z).sum()),
        ("log-det only", lambda z, ld: (ld * w_ld).sum()),
    ):
        got = torch.autograd.grad(objective(z, log_det), [x, c, *fused.parameters()], retain_graph=True)
        expected = torch.autograd.grad(
            objective(z_ref, log_det_ref), [x, c, *layers.parameters()], retain_graph=True, allow_unused=True
        )
        names = ["x", "context"] + [n for n, _ in fused.named_parameters()]
        for n, a, b in zip(names, got, expected):
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"{name}: gradient of {n}")


def test_fused_density_with_class_encodings_and_without_grad():
    """The matrix pass's route: class encodings computed once, gathered per row; and under no_grad."""
    flow = make_flow(6, num_blocks=2, fused=True)
    layers = copy.deepcopy(flow)
    layers.fused = False
    classes, index = torch.randn(4, 6, dtype=torch.float64), torch.tensor([3, 0, 0, 2, 1, 3])
    x = torch.randn(6, 6, dtype=torch.float64)
    encoded = flow.encode_context(classes)
    assert isinstance(encoded, torch.Tensor) and encoded.shape == (4, 4 * 16)
    expected = layers.log_prob(x, classes[index])
    torch.testing.assert_close(flow.log_prob(x, encoded=encoded, context_index=index), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(layers.log_prob(x, encoded=encoded, context_index=index), expected, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x, classes[index]), expected, atol=1e-12, rtol=0)


def test_fused_path_applies_only_to_affine_flows_in_the_density_direction():
    x, c = torch.randn(3, 6), torch.randn(3, 6)
    assert ProxyConditionedFlow(6, num_blocks=1, fused=True)._fused_plan(x) is not None
    assert ProxyConditionedFlow(6, num_blocks=1, coupling="spline", fused=True)._fused_plan(x) is None
    assert ProxyConditionedFlow(6, num_blocks=1, fused=False)._fused_plan(x) is None
    assert ProxyConditionedFlow(6, num_blocks=1, fused=True)._fused_plan(x.double()) is None  # float32 weights
    assert ProxyConditionedFlow(6, num_blocks=1)._fused_plan(x.to("meta")) is None  # weights on another device
    flow = ProxyConditionedFlow(6, num_blocks=1, identity_init=False, fused=True)
    assert not _uses_fused_path(flow.forward_and_log_det(x.requires_grad_(), c)[0])  # sampling direction
    flow.flows[0].param_map.mlp.net[1] = torch.nn.Tanh()  # no longer the planned subnet
    assert flow._fused_plan(x) is None


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer_weight_grads", "batched_weight_grads"])
@pytest.mark.parametrize("d", [7, 8])
def test_fused_density_traced_by_torch_compile_equals_eager(d, batched):
    """The traced variant (no strided out=, results joined) gives eager's values and gradients."""
    torch._dynamo.reset()
    flow = make_flow(d, num_blocks=2, num_layers=3, fused=True)
    flow.batched_weight_grads = batched
    x = F.normalize(torch.randn(5, d, dtype=torch.float64), dim=1).requires_grad_()
    c = F.normalize(torch.randn(5, d, dtype=torch.float64), dim=1).requires_grad_()
    compiled = torch.compile(flow.inverse_and_log_det, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (flow.inverse_and_log_det, compiled):
        z, log_det = fn(x, c)
        loss = (z * torch.arange(d, dtype=z.dtype)).sum() + log_det.square().sum()
        results.append((z.detach(), log_det.detach(), *torch.autograd.grad(loss, [x, c, *flow.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
