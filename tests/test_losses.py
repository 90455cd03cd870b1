"""PML adapters: every supported loss, drop-in equality, wrappers, errors, state, precision."""

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, reducers

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss, get_proxies

from . import reference
from .conftest import TEST_DEVICE, TEST_DTYPES

FLOW = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)
C, D = 6, 8
# The plain NLL: no training noise, no tail guard (deterministic, as the references compute).
EXACT = dict(noise_std=0.0, guard_radius=math.inf)

SUPPORTED = {
    "ProxyAnchorLoss": lambda: losses.ProxyAnchorLoss(C, D),
    "ProxyNCALoss": lambda: losses.ProxyNCALoss(C, D),
    "NormalizedSoftmaxLoss": lambda: losses.NormalizedSoftmaxLoss(C, D),
    "ArcFaceLoss": lambda: losses.ArcFaceLoss(C, D),
    "CosFaceLoss": lambda: losses.CosFaceLoss(C, D),
    "LargeMarginSoftmaxLoss": lambda: losses.LargeMarginSoftmaxLoss(C, D),
    "SphereFaceLoss": lambda: losses.SphereFaceLoss(C, D),
    "SubCenterArcFaceLoss": lambda: losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D),
    "SoftTripleLoss": lambda: losses.SoftTripleLoss(C, D, centers_per_class=3),
}


def batch(b=12, dtype=torch.float32, requires_grad=True):
    x = torch.randn(b, D, dtype=dtype, device=TEST_DEVICE).requires_grad_(requires_grad)
    return x, torch.arange(b, device=TEST_DEVICE) % C


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_each_supported_loss_wrapped(name):
    base = SUPPORTED[name]()
    loss_fn = NIRRegularizer(base, nir_weight=0.1, flow_options=FLOW).to(TEST_DEVICE)
    proxies = get_proxies(base)
    assert proxies.shape[0] == C and proxies.shape[-1] == D
    x, y = batch()
    loss = loss_fn(F.normalize(x, dim=1), y)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad.abs().sum() > 0
    for p in base.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.flow.parameters())
    assert sum(float(p.grad.abs().sum()) for p in loss_fn.flow.parameters()) > 0
    assert get_proxies(loss_fn) is not None and get_proxies(loss_fn).shape == proxies.shape
    ids = {id(p) for p in loss_fn.parameters()}
    assert {id(p) for p in base.parameters()} <= ids and {id(p) for p in loss_fn.flow.parameters()} <= ids


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_weight_zero_equals_wrapped_loss(name):
    base = SUPPORTED[name]()
    loss_fn = NIRRegularizer(copy.deepcopy(base), nir_weight=0.0, flow_options=FLOW)
    x, y = batch()
    a, b = base(x, y), loss_fn(x, y)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, [x, *base.parameters()])
    gb = torch.autograd.grad(b, [x, *loss_fn.loss.parameters()])
    for u, v in zip(ga, gb):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", TEST_DTYPES + [torch.float16])
@pytest.mark.parametrize("use_miner", [False, True])
def test_proxy_anchor_nir_weight_zero_is_exactly_proxy_anchor(dtype, use_miner):
    plain = losses.ProxyAnchorLoss(C, D, margin=0.5, alpha=1 if dtype == torch.float16 else 32).to(TEST_DEVICE)
    ours = ProxyAnchorNIRLoss(C, D, margin=0.5, alpha=plain.alpha, nir_weight=0, flow_options=FLOW).to(TEST_DEVICE)
    assert isinstance(ours, losses.ProxyAnchorLoss)
    ours.proxies.data = plain.proxies.data.clone().to(dtype)
    plain.proxies.data = plain.proxies.data.to(dtype)
    x, y = batch(dtype=dtype)
    tup = miners.MultiSimilarityMiner(0.2)(x, y) if use_miner else None
    a, b = plain(x, y, tup), ours(x, y, tup)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, [x, plain.proxies])
    gb = torch.autograd.grad(b, [x, ours.proxies])
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    if dtype != torch.float16:
        # and both agree with an independent implementation of Proxy Anchor
        expected = reference.proxy_anchor(x.double(), y, plain.proxies.double(), plain.alpha, 0.5)
        if not use_miner:
            torch.testing.assert_close(b.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.get_logits(x), F.normalize(x) @ F.normalize(ours.proxies).t())


def test_sub_losses_are_named_for_reducers_and_stats():
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=FLOW)
    assert loss_fn.sub_loss_names() == ["pos_loss", "neg_loss", "nir_loss"]
    assert set(loss_fn.reducer.reducers) == {"pos_loss", "neg_loss", "nir_loss"}
    reg = NIRRegularizer(
        losses.ArcFaceLoss(C, D),
        collect_stats=True,
        reducer=reducers.MeanReducer(collect_stats=True),
        flow_options=FLOW,
    )
    assert reg.sub_loss_names() == ["proxy_loss", "nir_loss"]
    x, y = batch()
    reg(x, y)
    assert reg.reducer.reducers["nir_loss"].losses_size == 12
    assert "nir_weight" in reg._record_these


def test_pml_reducers_combine_the_nir_term():
    x, y = batch(dtype=torch.float64)
    plain = ProxyAnchorNIRLoss(C, D, nir_weight=0.0, flow_options=FLOW).double()
    mean_red = ProxyAnchorNIRLoss(
        C, D, nir_weight=0.2, flow_options=FLOW, reducer=reducers.MeanReducer(), **EXACT
    ).double()
    div_red = copy.deepcopy(mean_red)
    div_red.set_reducer(None)
    div_red.reducer = ProxyAnchorNIRLoss(C, D).reducer  # default DivisorReducer
    for m in (mean_red, div_red):
        m.load_state_dict(plain.state_dict(), strict=False)
    nir = 0.2 * mean_red.nir.per_sample_loss(x, mean_red.proxies, y).mean()
    torch.testing.assert_close(div_red(x, y) - plain(x, y), nir)
    sum_red = NIRRegularizer(
        losses.ProxyNCALoss(C, D), nir_weight=0.2, reducer=reducers.SumReducer(), flow_options=FLOW, **EXACT
    ).double()
    base = sum_red.loss(x, y)
    per = sum_red.nir.per_sample_loss(x, get_proxies(sum_red.loss), y)
    torch.testing.assert_close(sum_red(x, y) - base, 0.2 * per.sum())


THRESHOLDING = {
    "ProxyAnchorNIRLoss(reducer=AvgNonZeroReducer())": lambda: ProxyAnchorNIRLoss(
        C, D, flow_options=FLOW, reducer=reducers.AvgNonZeroReducer()
    ),
    "NIRRegularizer(reducer=ThresholdReducer(low=0))": lambda: NIRRegularizer(
        losses.ProxyNCALoss(C, D), reducer=reducers.ThresholdReducer(low=0), flow_options=FLOW
    ),
    "MultipleReducers, thresholding default": lambda: ProxyAnchorNIRLoss(
        C,
        D,
        flow_options=FLOW,
        reducer=reducers.MultipleReducers(
            {"pos_loss": reducers.MeanReducer()}, default_reducer=reducers.AvgNonZeroReducer()
        ),
    ),
}


@pytest.mark.parametrize("name", list(THRESHOLDING))
def test_thresholding_reducers_are_refused_for_the_nir_term(name):
    """They keep only losses > 0 (or within bounds); a trained flow's NLLs are negative: the term would vanish."""
    with pytest.raises(ValueError, match=r"cannot reduce the NIR term.*MultipleReducers\(\{'nir_loss': MeanReducer"):
        THRESHOLDING[name]()
    loss_fn = NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options=FLOW)
    loss_fn.set_reducer(reducers.AvgNonZeroReducer())  # set after construction: refused at the call
    with pytest.raises(ValueError, match="cannot reduce the NIR term"):
        loss_fn(*batch())


def test_thresholding_reducers_work_for_the_proxy_terms():
    """The fixes the error names: the NIR term under a mean, the proxy terms under the threshold."""
    x, y = batch(dtype=torch.float64)
    mixed = ProxyAnchorNIRLoss(
        C,
        D,
        nir_weight=0.2,
        flow_options=FLOW,
        **EXACT,
        reducer=reducers.MultipleReducers(
            {"nir_loss": reducers.MeanReducer()}, default_reducer=reducers.AvgNonZeroReducer()
        ),
    ).double()
    plain = losses.ProxyAnchorLoss(C, D, reducer=reducers.AvgNonZeroReducer()).double()
    plain.load_state_dict({"proxies": mixed.proxies.detach().clone()})
    nir = 0.2 * mixed.nir.per_sample_loss(x, mixed.proxies, y).mean()
    torch.testing.assert_close(mixed(x, y), plain(x, y) + nir)
    inner = NIRRegularizer(
        losses.ProxyNCALoss(C, D, reducer=reducers.AvgNonZeroReducer()), nir_weight=0.2, flow_options=FLOW
    )
    inner(*batch()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner.flow.parameters())


def test_multiple_losses_and_distributed_wrapper_in_single_process():
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    nir = NIRRegularizer(losses.ProxyNCALoss(C, D), nir_weight=0.1, flow_options=FLOW, **EXACT)
    combo = losses.MultipleLosses([nir, losses.TripletMarginLoss()], weights=[1.0, 0.5])
    x, y = batch()
    total = combo(x, y)
    torch.testing.assert_close(total, nir(x, y) + 0.5 * losses.TripletMarginLoss()(x, y))
    with pytest.warns(UserWarning, match="non-distributed"):
        torch.testing.assert_close(DistributedLossWrapper(nir)(x, y), nir(x, y))


class CustomParamLoss(losses.BaseMetricLossFunction):
    def __init__(self):
        super().__init__()
        self.proxies = torch.nn.Parameter(torch.randn(C, D))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        d = 1 - F.normalize(embeddings, dim=1) @ F.normalize(self.proxies, dim=1).t()
        return {
            "loss": {
                "losses": d[torch.arange(len(labels)), labels],
                "indices": torch.arange(len(labels)),
                "reduction_type": "element",
            }
        }


class CustomGetterLoss(CustomParamLoss):
    def get_proxies(self):
        return self.proxies.view(C, 1, D)


@pytest.mark.parametrize("cls", [CustomParamLoss, CustomGetterLoss])
def test_custom_losses_with_proxies(cls):
    base = cls()
    loss_fn = NIRRegularizer(base, nir_weight=0.1, flow_options=FLOW)
    x, y = batch()
    loss_fn(x, y).backward()
    assert base.proxies.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [losses.ContrastiveLoss(), losses.TripletMarginLoss(), losses.NTXentLoss()])
def test_loss_without_proxies_is_a_type_error(loss):
    with pytest.raises(TypeError, match="has no class proxies"):
        NIRRegularizer(loss)


def test_bad_proxies_shape_is_a_type_error():
    class Bad(CustomParamLoss):
        def get_proxies(self):
            return self.proxies.flatten()

    with pytest.raises(TypeError, match=r"expected a tensor of shape \(C, D\)"):
        NIRRegularizer(Bad())


@pytest.mark.parametrize(
    "embeddings, labels, message",
    [
        (torch.randn(4, D), torch.tensor([0, 1, 2, 3], dtype=torch.int32), "labels.long()"),
        (torch.randn(4, D), torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels.long()"),
        (torch.randn(4, D), torch.tensor([0, 1, 2, C]), rf"lie in \[0, {C}\)"),
        (torch.randn(4, D), torch.tensor([0, -1, 2, 3]), rf"lie in \[0, {C}\)"),
        (torch.randn(4, D + 1), torch.tensor([0, 1, 2, 3]), f"embedding_size={D}"),
        (torch.randn(4, 2, D), torch.tensor([0, 1, 2, 3]), "2-D"),
        (torch.full((4, D), float("nan")), torch.tensor([0, 1, 2, 3]), "NaN"),
        (torch.full((4, D), float("inf")), torch.tensor([0, 1, 2, 3]), "NaN or inf"),
        (torch.randint(0, 3, (4, D)), torch.tensor([0, 1, 2, 3]), "floating point"),
    ],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyAnchorNIRLoss(C, D, flow_options=FLOW),
        lambda: NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options=FLOW),
    ],
)
def test_bad_input_is_a_clear_value_error(embeddings, labels, message, make):
    with pytest.raises(ValueError, match=message):
        make()(embeddings, labels)


def test_missing_labels_and_methods_validate():
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=FLOW)
    with pytest.raises(ValueError, match="needs labels"):
        loss_fn.log_likelihood(torch.randn(3, D), None)
    with pytest.raises(ValueError, match="lie in"):
        loss_fn.sample(torch.tensor([C]))
    with pytest.raises(ValueError, match=r"labels must be 1-D .* got shape \(\)\. Use labels\.view\(-1\)"):
        loss_fn.sample(torch.tensor(1))
    with pytest.raises(ValueError, match=r"labels must be 1-D .* got shape \(2, 1\)"):
        loss_fn.sample(torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="embedding_size"):
        loss_fn.log_likelihood_matrix(torch.randn(3, D + 2))


def test_validation_can_be_switched_off():
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=FLOW, validate=False)
    nan = torch.full((2, D), float("nan"))
    assert torch.isnan(loss_fn.log_likelihood(nan, torch.tensor([0, 1]))).all()  # no ValueError
    with pytest.raises(ValueError, match="labels.long()"):  # free checks stay on
        loss_fn(torch.randn(2, D), torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyAnchorNIRLoss(C, D, flow_options=FLOW, validate=False),
        lambda: NIRRegularizer(losses.ProxyNCALoss(C, D), validate=False, flow_options=FLOW),
    ],
)
def test_device_mismatch_is_an_error_and_moves_nothing(make):
    """Embeddings on another device (here "meta", where a move would lose the weights): an error naming the fix."""
    loss_fn = make()
    before = copy.deepcopy(loss_fn.state_dict())
    x, y = torch.randn(4, D, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    calls = {
        "loss": lambda: loss_fn(x, y),
        "log_likelihood": lambda: loss_fn.log_likelihood(x, y),
        "log_likelihood_matrix": lambda: loss_fn.log_likelihood_matrix(x),
        "nir.log_likelihood": lambda: loss_fn.nir.log_likelihood(x, get_proxies(loss_fn), y),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"embeddings are on meta but .* is on cpu: .*loss_fn\.to\('meta'\)"):
            call()
        after = loss_fn.state_dict()
        assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items()), name
    assert torch.isfinite(loss_fn(*batch()))  # still usable on its own device


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyAnchorNIRLoss(C, D, flow_options=FLOW),
        lambda: ProxyAnchorNIRLoss(C, D, flow_options=FLOW, reducer=reducers.MeanReducer()),
        lambda: NIRRegularizer(losses.ArcFaceLoss(C, D, reducer=reducers.MeanReducer()), flow_options=FLOW),
        lambda: NIRRegularizer(losses.ProxyNCALoss(C, D), reducer=reducers.MeanReducer(), flow_options=FLOW),
    ],
)
def test_empty_batch_gives_zero_loss_on_the_graph(make):
    x = torch.randn(0, D, requires_grad=True)
    loss = make()(x, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert x.grad.shape == (0, D)


def test_state_dict_deepcopy_pickle_and_device_move():
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=FLOW, **EXACT)
    x, y = batch(requires_grad=False)
    expected = loss_fn(x, y)
    other = ProxyAnchorNIRLoss(C, D, flow_options=FLOW, **EXACT)
    other.load_state_dict(loss_fn.state_dict())
    buffer = io.BytesIO()
    torch.save(loss_fn, buffer)
    buffer.seek(0)
    for clone in (
        other,
        copy.deepcopy(loss_fn),
        pickle.loads(pickle.dumps(loss_fn)),
        torch.load(buffer, weights_only=False),
        copy.deepcopy(loss_fn).to("cpu"),
    ):
        torch.testing.assert_close(clone(x, y), expected)


@pytest.mark.parametrize("objective", ["nll", "exp_nll"])
def test_autocast_keeps_nir_math_in_float32(objective):
    model = torch.nn.Linear(16, D)
    loss_fn = ProxyAnchorNIRLoss(C, D, nir_weight=0.1, objective=objective, flow_options=FLOW)
    x, y = torch.randn(12, 16), torch.arange(12) % C
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = F.normalize(model(x), dim=1)
        assert emb.dtype == torch.bfloat16
        per_sample = loss_fn.nir.per_sample_loss(emb, loss_fn.proxies, y)
        loss = loss_fn(emb.float(), y)
    assert per_sample.dtype == torch.float32 and torch.isfinite(per_sample).all()
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.weight.grad).all()


def test_param_groups_cover_every_parameter_once():
    loss_fn = NIRRegularizer(
        losses.SoftTripleLoss(C, D, centers_per_class=2), flow_options={**FLOW, "context_mlp_width": 4}
    )
    groups = loss_fn.param_groups(1e-5, proxy_lr_mult=4000, flow_lr_mult=50)
    assert [g["lr"] for g in groups] == pytest.approx([4e-2, 5e-4])
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in loss_fn.parameters())
    torch.optim.Adam(groups)


def test_log_likelihood_compiles_fullgraph():
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=FLOW)
    x, y = batch(requires_grad=False)
    compiled = torch.compile(loss_fn.log_likelihood, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), loss_fn.log_likelihood(x, y))


def test_whole_loss_compiles_with_inductor():
    """``torch.compile(loss_fn)``, the speed recipe in the docs, gives the eager loss and gradients."""
    # No training noise: inductor draws its own random numbers (the default guard stays on).
    loss_fn = ProxyAnchorNIRLoss(C, D, validate=False, flow_options=FLOW, noise_std=0.0)
    compiled = torch.compile(loss_fn)
    x, y = batch(requires_grad=False)
    grads = []
    for fn in (loss_fn, compiled):
        emb = F.normalize(x, dim=1).requires_grad_()
        loss = fn(emb, y)
        grads.append(torch.autograd.grad(loss, [emb, *loss_fn.parameters()]))
        grads[-1] = (loss.detach(), *grads[-1])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


def test_compile_nir_compiles_the_term_and_the_matrix_pass_once_each():
    """One line switches the NIR term to torch.compile (fullgraph, static shape): same values and
    gradients, one graph for the training term and one for the matrix pass however often called."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    eager = ProxyAnchorNIRLoss(C, D, validate=False, flow_options=FLOW, noise_std=0.0)
    compiled = copy.deepcopy(eager).compile_nir(backend=counter)
    for _ in range(3):
        x, y = batch(requires_grad=False)
        results = []
        for fn in (eager, compiled):
            emb = F.normalize(x, dim=1).requires_grad_()
            loss = fn(emb, y)
            results.append((loss.detach(), *torch.autograd.grad(loss, [emb, *fn.parameters()])))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    with torch.no_grad():
        torch.testing.assert_close(compiled.log_likelihood_matrix(x, chunk_size=3), eager.log_likelihood_matrix(x))
    assert counter.frame_count == 2  # the per-pass function: all passes have one shape
    default = ProxyAnchorNIRLoss(C, D, flow_options=FLOW).compile_nir(backend=counter)  # noise, guard, validation
    default(F.normalize(x, dim=1).requires_grad_(), y).backward()
    assert counter.frame_count == 3
    compiled.compile_nir(False)
    compiled(F.normalize(x, dim=1), y)
    assert counter.frame_count == 3


def test_training_steps_change_proxies_and_flow():
    loss_fn = ProxyAnchorNIRLoss(C, D, nir_weight=1.0, flow_options=FLOW)
    opt = torch.optim.Adam(loss_fn.param_groups(1e-3))
    before = copy.deepcopy(loss_fn.state_dict())
    x, y = batch(requires_grad=False)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(F.normalize(x, dim=1), y).backward()
        opt.step()
    after = loss_fn.state_dict()
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])]
    assert "proxies" in changed and any(k.startswith("nir.flow") for k in changed)


def test_default_weight_scales_with_embedding_width():
    from nir_loss import default_nir_weight

    assert ProxyAnchorNIRLoss(C, 128).nir_weight == pytest.approx(0.01)
    assert NIRRegularizer(losses.ProxyNCALoss(C, 512)).nir_weight == pytest.approx(0.0025)
    assert NIRRegularizer(losses.ProxyNCALoss(C, D), objective="exp_nll").nir_weight == pytest.approx(1 / 0.0075)
    assert ProxyAnchorNIRLoss(C, D, nir_weight=0.3).nir_weight == 0.3
    assert default_nir_weight(64) == pytest.approx(0.02)


def test_exp_nll_stays_finite_for_unnormalized_embeddings():
    """Norm >= 13 at D = 128: exp(NLL) overflows float32; the loss, gradients and a few steps stay finite."""
    model = torch.nn.Linear(32, 128)
    with torch.no_grad():
        model.weight.mul_(2.6)  # embedding norms 13-15
    loss_fn = ProxyAnchorNIRLoss(10, 128, objective="exp_nll")  # the default flow, weight and noise
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *loss_fn.param_groups(1e-3)])
    x, y = torch.randn(16, 32), torch.arange(16) % 10
    for _ in range(4):
        emb = model(x)
        loss = loss_fn(emb, y)
        optimizer.zero_grad()
        loss.backward()
        assert emb.norm(dim=1).min() >= 13 and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for g in optimizer.param_groups for p in g["params"])
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *loss_fn.parameters()])
