"""PML adapters: every supported loss, drop-in equality, reducers, state, precision, the keywords'
spelling (the old one removed, with an error naming the fix), and a short real-data training."""

import copy
import dataclasses
import inspect
import io
import math
import pathlib
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, reducers
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits

import nir_loss
from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss, get_proxies
from nir_loss.losses import miner_weights, weighted_element_losses
from nir_loss.nir import NIROptions, NIRTerm

from . import reference
from .conftest import TEST_DEVICE, TEST_DTYPES
from .helpers import EXACT, FLOW, META, TINY_FLOW, C, D, batch

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
    unit = F.normalize(x, dim=1)  # what the losses' cosine distances compare, and the flow models
    nir = 0.2 * mean_red.nir.per_sample_loss(unit, mean_red.proxies, y).mean()
    torch.testing.assert_close(div_red(x, y) - plain(x, y), nir)
    sum_red = NIRRegularizer(
        losses.ProxyNCALoss(C, D), nir_weight=0.2, reducer=reducers.SumReducer(), flow_options=FLOW, **EXACT
    ).double()
    base = sum_red.loss(x, y)
    per = sum_red.nir.per_sample_loss(unit, get_proxies(sum_red.loss), y)
    torch.testing.assert_close(sum_red(x, y) - base, 0.2 * per.sum())


def test_multiple_losses_and_distributed_wrapper_in_single_process():
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    nir = NIRRegularizer(losses.ProxyNCALoss(C, D), nir_weight=0.1, flow_options=FLOW, **EXACT)
    combo = losses.MultipleLosses([nir, losses.TripletMarginLoss()], weights=[1.0, 0.5])
    x, y = batch()
    total = combo(x, y)
    torch.testing.assert_close(total, nir(x, y) + 0.5 * losses.TripletMarginLoss()(x, y))
    with pytest.warns(UserWarning, match="non-distributed"):
        torch.testing.assert_close(DistributedLossWrapper(nir)(x, y), nir(x, y))


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


@pytest.mark.parametrize("name", ["ProxyAnchorNIRLoss", "NIRRegularizer"])
def test_whole_module_pickled_by_an_older_release_says_to_load_its_state_dict(name):
    """tests/data/nir_0.2.0_whole_modules.pt: both losses saved whole by nir-loss 0.2.0 (small flows).

    They used to load and then fail with AttributeError on each attribute added since; now loading
    fails at once, saying how to move the loss across releases (its state dict loads)."""
    with pytest.raises(RuntimeError, match=r"saved whole .* by nir-loss 0.3.0 or earlier.*load_state_dict"):
        torch.load(pathlib.Path(__file__).parent / "data" / "nir_0.2.0_whole_modules.pt", weights_only=False)
    current = pickle.loads(pickle.dumps(ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW)))
    state = current.__getstate__()
    assert state["_nir_loss_release"] == nir_loss.__version__
    state["_nir_loss_release"] = "0.3.1"
    with pytest.raises(RuntimeError, match=r"by nir-loss 0.3.1; this is nir-loss"):
        ProxyAnchorNIRLoss.__new__(ProxyAnchorNIRLoss).__setstate__(state)


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


def test_param_groups_take_the_models_learning_rate_and_warn_when_the_proxies_would_get_1():
    """A PML user passed the loss optimizer's usual lr (0.01) and got proxies at 1.0, silently."""
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = loss_fn.param_groups(model_lr=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("proxies", pytest.approx(1e-2)), ("flow", 1e-4)]
    with pytest.warns(UserWarning, match=r"param_groups\(model_lr=0.01\) trains the proxies at lr 1 .*model_lr=1e-4"):
        loss_fn.param_groups(0.01)
    with pytest.warns(DeprecationWarning, match=r"param_groups\(lr=...\) is deprecated"):
        old = loss_fn.param_groups(lr=1e-4)
    assert [g["lr"] for g in old] == [g["lr"] for g in groups]
    with pytest.raises(TypeError, match="param_groups\\(\\) got both model_lr=0.001 and lr=0.001"):
        loss_fn.param_groups(1e-3, lr=1e-3)
    with pytest.raises(TypeError, match="param_groups\\(\\) needs model_lr="):
        loss_fn.param_groups()


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


def test_compile_nir_recompiles_new_shapes_and_copies_past_the_recompile_limit():
    """torch.compile allows a code object 8 compiled variants (here 2, to keep the test short);
    with fullgraph=True one more raised FailOnRecompileLimitHit. Every term and copy now has a cache
    of its own, and a full cache is replaced: new batch sizes, copies, train/eval and dtypes run."""
    with torch._dynamo.config.patch(recompile_limit=2):
        loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW).compile_nir(backend="eager")
        for b in range(2, 7):  # 5 batch sizes
            x = F.normalize(torch.randn(b, D), dim=1).requires_grad_()
            loss_fn(x, torch.arange(b) % C).backward()
            assert torch.isfinite(x.grad).all()
        copies = [copy.deepcopy(loss_fn) for _ in range(4)]
        copies.append(ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW).compile_nir(backend="eager"))
        for clone in copies:  # every copy compiles its own
            clone(F.normalize(torch.randn(4, D), dim=1), torch.arange(4) % C).backward()
        x, y = F.normalize(torch.randn(4, D), dim=1), torch.arange(4) % C
        loss_fn.eval()
        eager = copy.deepcopy(loss_fn).compile_nir(False)
        torch.testing.assert_close(loss_fn(x, y), eager(x, y))
        loss_fn.train()
        loss_fn.double()
        eager.double()
        torch.testing.assert_close(loss_fn.log_likelihood_matrix(x.double()), eager.log_likelihood_matrix(x.double()))


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

    # exp_nll (the default): the reference's CUB weight at every D; nll: 1.28 / D.
    assert ProxyAnchorNIRLoss(C, 128).nir_weight == pytest.approx(1 / 0.0075)
    assert NIRRegularizer(losses.ProxyNCALoss(C, 512)).nir_weight == pytest.approx(1 / 0.0075)
    assert ProxyAnchorNIRLoss(C, 128, objective="nll").nir_weight == pytest.approx(0.01)
    assert NIRRegularizer(losses.ProxyNCALoss(C, 512), objective="nll").nir_weight == pytest.approx(0.0025)
    assert ProxyAnchorNIRLoss(C, D, nir_weight=0.3).nir_weight == 0.3
    assert default_nir_weight(64, "nll") == pytest.approx(0.02) and default_nir_weight(64) == pytest.approx(1 / 0.0075)


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


# -- no host sync: the NIR part of a loss call runs on meta tensors ---------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyAnchorNIRLoss(7, 8, flow_options=FLOW),
        lambda: NIRRegularizer(losses.SoftTripleLoss(7, 8, centers_per_class=2), flow_options=FLOW),
        lambda: NIRRegularizer(losses.ProxyNCALoss(7, 8), objective="exp_nll", flow_options=FLOW),
    ],
)
def test_nir_part_of_a_default_loss_call_runs_on_meta_tensors(make):
    """Defaults (validate=True, training mode: noise and tail guard): validation, the term, its reduction.

    The wrapped PML loss is left out: PML's own losses and reducers read values on the host.
    """
    loss_fn = make().to(META)
    x = torch.empty(12, 8, device=META, requires_grad=True)
    y = torch.empty(12, dtype=torch.long, device=META)
    for _ in range(3):  # every call, not only the first
        loss_fn._checked_proxies(x, y)
        entry = loss_fn._nir_loss_entry(x, y, None)
        total = loss_fn.reducer({"nir_loss": entry}, x, y)
        assert total.shape == () and total.device == META
        total.backward()
    if isinstance(loss_fn, ProxyAnchorNIRLoss):  # reduced by nir-loss, not by DivisorReducer's isnan check
        assert entry["reduction_type"] == "already_reduced"


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


def test_divisor_reducer_collecting_stats_gets_the_element_losses():
    x, y = torch.randn(6, 8), torch.randint(0, 7, (6,))
    plain = ProxyAnchorNIRLoss(7, 8, flow_options=FLOW, noise_std=0.0)
    stats = ProxyAnchorNIRLoss(
        7, 8, flow_options=FLOW, noise_std=0.0, reducer=reducers.DivisorReducer(collect_stats=True)
    )
    stats.load_state_dict(plain.state_dict())
    assert stats._nir_loss_entry(x, y, None)["reduction_type"] == "element"
    assert plain._nir_loss_entry(x, y, None)["reduction_type"] == "already_reduced"
    assert torch.equal(stats(x, y), plain(x, y))


# -- one spelling of the NIR keywords in both losses; the old one is an error naming the fix --


def _batch():
    return F.normalize(torch.randn(10, D), dim=1), torch.arange(10) % C


def _value(loss_fn, embeddings, labels):
    loss_fn.eval()  # no training noise: values comparable across instances
    return loss_fn(embeddings, labels)


@pytest.mark.parametrize(
    "name",
    ["nir_weight", "objective", "flow", "flow_options", "detach_proxies", "noise_std", "guard_radius", "validate"],
)
def test_both_losses_spell_nir_arguments_alike(name):
    for loss_class in (NIRRegularizer, ProxyAnchorNIRLoss):
        assert name in inspect.signature(loss_class).parameters, f"{loss_class.__name__} lacks {name}="


def test_nir_weight_and_flow_options_build_the_same_term_in_both_losses():
    reg = NIRRegularizer(losses.ProxyAnchorLoss(C, D), nir_weight=0.3, flow_options=TINY_FLOW)
    pa = ProxyAnchorNIRLoss(C, D, nir_weight=0.3, flow_options=TINY_FLOW)
    assert reg.nir_weight == pa.nir_weight == 0.3
    assert [p.shape for p in reg.flow.parameters()] == [p.shape for p in pa.flow.parameters()]
    assert len(reg.flow.flows) == 3  # one block: a permutation and two couplings


def test_nir_options_are_the_same_keywords_with_the_same_defaults_in_both_losses():
    """Both losses and NIRTerm take NIROptions' fields as keywords; its docstring documents each once."""
    fields = {f.name: f for f in dataclasses.fields(NIROptions)}
    for owner in (NIRRegularizer, ProxyAnchorNIRLoss, NIRTerm):
        parameters = inspect.signature(owner).parameters
        for name, field in fields.items():
            if name == "flow_options" and owner is NIRTerm:
                continue  # NIRTerm takes them as keywords of its own (**flow_options)
            default = field.default_factory() if callable(field.default_factory) else field.default
            assert parameters[name].default == (None if name == "flow_options" else default), (owner, name)
    for owner in (NIRRegularizer, ProxyAnchorNIRLoss):
        assert "[`NIROptions`][nir_loss.nir.NIROptions]" in owner.__doc__
        assert all(f"``{name}``" in owner.__doc__ for name in fields)
    documented = re.findall(r"^        (\w+): ", NIROptions.__doc__, re.M)
    assert documented == list(fields)


def test_new_spelling_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NIRRegularizer(losses.ProxyNCALoss(C, D), nir_weight=0.5, flow_options=TINY_FLOW)
        NIRRegularizer(losses.ProxyNCALoss(C, D), 0.5)  # positional, as before


def test_old_weight_keyword_is_an_error_naming_nir_weight():
    """NIRRegularizer(weight=) was deprecated in 0.3.0 and removed in 0.4.0."""
    with pytest.raises(
        TypeError, match=r"NIRRegularizer got unexpected keyword arguments \['weight'\]; weight= is nir_weight="
    ):
        NIRRegularizer(losses.ProxyNCALoss(C, D), weight=0.5, flow_options=TINY_FLOW)


def test_old_flow_keywords_are_an_error_showing_flow_options():
    """Flow options as NIRRegularizer keywords were deprecated in 0.3.0 and removed in 0.4.0."""
    with pytest.raises(
        TypeError, match=r"arguments \['num_blocks'\]; flow options go inside .*flow_options=\{'num_blocks': 1\}\.$"
    ):
        NIRRegularizer(losses.ProxyNCALoss(C, D), nir_weight=0.5, num_blocks=1)
    with pytest.raises(TypeError, match=r"\['hidden_features', 'weight'\]; weight= is nir_weight=.*flow_options="):
        NIRRegularizer(losses.ProxyNCALoss(C, D), weight=0.5, hidden_features=8)


def test_unknown_keyword_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['nir_wieght'\].*hidden_features"):
        NIRRegularizer(losses.ProxyNCALoss(C, D), nir_wieght=0.1)


def test_proxy_anchor_unknown_keyword_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"keyword arguments \['num_blocks'\].*flow_options=\{...\} \(.*num_blocks"):
        ProxyAnchorNIRLoss(C, D, num_blocks=2)
    with pytest.raises(TypeError, match=r"\['nir_wieght'\]; expected its own parameters \(.*nir_weight.*reducer"):
        ProxyAnchorNIRLoss(C, D, nir_wieght=0.1)
    ProxyAnchorNIRLoss(C, D, reducer=reducers.DivisorReducer(), embedding_reg_weight=1)  # PML's own pass


@pytest.mark.parametrize(
    "make",
    [
        lambda opts: ProxyAnchorNIRLoss(C, D, flow_options=opts),
        lambda opts: NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options=opts),
    ],
)
def test_unknown_flow_option_names_the_valid_ones(make):
    with pytest.raises(TypeError, match=r"unknown flow_options \['num_block'\]; .*: clamp, .*num_blocks"):
        make({"num_block": 2})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, -1e-9, "heavy"])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW, **kw),
        lambda **kw: NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options=TINY_FLOW, **kw),
    ],
)
def test_nir_weight_must_be_finite_and_not_negative(make, bad):
    """NaN or inf gave a NaN loss and a negative weight maximised the NLL, silently."""
    with pytest.raises(ValueError, match=r"nir_weight must be a finite number >= 0 \(0: no NIR term\), got"):
        make(nir_weight=bad)
    loss_fn = make(nir_weight=0.5)
    with pytest.raises(ValueError, match="nir_weight must be a finite number >= 0"):
        loss_fn.nir_weight = bad
    assert loss_fn.nir_weight == 0.5
    loss_fn.nir_weight = 0
    assert loss_fn.nir_weight == 0.0 and make(nir_weight=torch.tensor(0.25)).nir_weight == 0.25


def test_passed_as_a_pml_regularizer_it_says_that_it_wraps_a_loss():
    """PML calls an embedding_regularizer with the embeddings only: "NIR needs labels" was wrong."""
    for nir in (NIRRegularizer(losses.ProxyAnchorLoss(C, D)), ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW)):
        host = losses.ProxyAnchorLoss(C, D, embedding_regularizer=nir)
        x, y = batch()
        with pytest.raises(ValueError, match=r"embedding_regularizer=, .*NIRRegularizer\(ProxyAnchorLoss\(...\)\)"):
            host(x, y)
    with pytest.raises(ValueError, match="NIR needs labels"):  # called directly without labels
        NIRRegularizer(losses.ProxyAnchorLoss(C, D))(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyAnchorNIRLoss(C, D, flow_options=FLOW),
        lambda: NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options=FLOW),
        lambda: NIRRegularizer(losses.ArcFaceLoss(C, D), flow_options=FLOW),
    ],
)
def test_nir_models_the_normalized_embeddings_the_proxy_loss_compares(make):
    """PML's distances normalize by default, so users pass raw model outputs: NIR models the unit
    vectors the proxy loss compares, not the raw ones (norm ~28 here)."""
    loss_fn = make().eval()  # no training noise: the recorded NLL is deterministic
    assert loss_fn._compared_distance().normalize_embeddings
    raw, y = 10 * torch.randn(12, D, dtype=torch.float64), torch.arange(12) % C
    unit = F.normalize(raw, dim=1)
    loss_fn.double()
    torch.testing.assert_close(loss_fn.log_likelihood(raw, y), loss_fn.log_likelihood(unit, y))
    torch.testing.assert_close(loss_fn.log_likelihood_matrix(raw), loss_fn.log_likelihood_matrix(unit))
    torch.testing.assert_close(loss_fn(raw, y), loss_fn(unit, y))
    from_raw = loss_fn.nir_nll_mean
    loss_fn(unit, y)
    torch.testing.assert_close(from_raw, loss_fn.nir_nll_mean)
    direct = loss_fn.nir.log_likelihood(unit, loss_fn.get_proxies(), y)
    torch.testing.assert_close(loss_fn.log_likelihood(raw, y), direct)


def test_nir_takes_embeddings_as_they_are_when_the_distance_does_not_normalize():
    from pytorch_metric_learning.distances import LpDistance

    distance = LpDistance(normalize_embeddings=False, power=2)
    loss_fn = NIRRegularizer(losses.ProxyNCALoss(C, D, distance=distance), flow_options=FLOW).eval()
    raw, y = 3 * torch.randn(12, D), torch.arange(12) % C
    direct = loss_fn.nir.log_likelihood(raw, loss_fn.get_proxies(), y)
    torch.testing.assert_close(loss_fn.log_likelihood(raw, y), direct)
    assert not torch.allclose(loss_fn.log_likelihood(raw, y), loss_fn.log_likelihood(F.normalize(raw, dim=1), y))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW),
        lambda: NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options=TINY_FLOW),
    ],
)
def test_empty_batch_records_nan_nll_statistics(make):
    """They kept the previous batch's tensors: a trainer summing them per step counted it twice."""
    loss_fn = make()
    x, y = batch()
    loss_fn(x, y)
    assert math.isfinite(float(loss_fn.nir_nll_mean)) and math.isfinite(float(loss_fn.nir_nll_max))
    loss_fn(torch.randn(0, D), torch.zeros(0, dtype=torch.long))
    assert math.isnan(loss_fn.nir_nll_mean) and math.isnan(loss_fn.nir_nll_max)
    loss_fn(x, y)
    loss_fn.nir_weight = 0  # not computed either
    loss_fn(x, y)
    assert math.isnan(loss_fn.nir_nll_mean) and math.isnan(loss_fn.nir_nll_max)


def test_chunk_size_must_be_a_positive_int():
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW)
    x, _ = batch(requires_grad=False)
    for bad in (2.5, 0, -1, True, "4"):
        with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1 \(None: the default\), got"):
            loss_fn.log_likelihood_matrix(x, chunk_size=bad)
    assert loss_fn.log_likelihood_matrix(x, chunk_size=5).shape == (12, C)


def test_a_dtype_change_after_training_is_refused_before_anything_is_recast():
    """A float64 call after float32 Adam steps recast the flow (and PML the proxies) in place,
    leaving the optimizer's state in float32. Now it is an error, and nothing is recast."""
    loss_fn = ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW)
    opt = torch.optim.Adam(loss_fn.param_groups(1e-3))
    x, y = batch(requires_grad=False)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(x, y).backward()
        opt.step()
    for call in (lambda: loss_fn(x.double(), y), lambda: loss_fn.log_likelihood(x.double(), y)):
        with pytest.raises(ValueError, match=r"are torch.float64 but the NIR flow has trained in torch.float32"):
            call()
    assert {p.dtype for p in loss_fn.parameters()} == {torch.float32}
    opt.zero_grad()
    loss_fn(x, y).backward()
    opt.step()  # the optimizer still matches its parameters
    loss_fn.double()  # an explicit cast is the caller's choice
    opt = torch.optim.Adam(loss_fn.param_groups(1e-3))
    loss_fn(x.double(), y).backward()
    opt.step()
    fresh = ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW)  # before training, a call's dtype is taken
    assert fresh.log_likelihood(x.double(), y).dtype == torch.float64


# -- a short real-data training: the NIR likelihood rises, held-out retrieval improves --------


def digits_split():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    # Class-independent nuisance features: an untrained net mixes them in, a trained one learns
    # to ignore them, which shows on classes it never saw.
    noise = torch.randn(len(x), 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, noise], dim=1)
    train = y < 5
    return x[train], y[train], x[~train], y[~train] - 5


def recall_at_1(model, x, y):
    with torch.no_grad():
        emb = F.normalize(model(x), dim=1)
    calc = AccuracyCalculator(include=("precision_at_1",), k=1, knn_func=CustomKNN(CosineSimilarity()))
    return calc.get_accuracy(emb, y)["precision_at_1"]


def test_short_training_on_digits():
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    flow_options = dict(num_blocks=2, num_layers=4, hidden_features=64)
    loss_fn = ProxyAnchorNIRLoss(5, 32, nir_weight=0.01, flow_options=flow_options)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *loss_fn.param_groups(1e-3)])
    untrained = recall_at_1(model, x_te, y_te)
    nll = []
    for _ in range(300):
        idx = torch.randint(0, len(x_tr), (64,))
        emb = F.normalize(model(x_tr[idx]), dim=1)
        loss = loss_fn(emb, y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        nll.append(-loss_fn.log_likelihood(emb.detach(), y_tr[idx]).mean().item())
    trained = recall_at_1(model, x_te, y_te)
    assert sum(nll[-20:]) / 20 < sum(nll[:20]) / 20 - 5.0  # the flow learns the class-conditional density
    assert trained > untrained + 0.02, (untrained, trained)  # held-out classes, measured
