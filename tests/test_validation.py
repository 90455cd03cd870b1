"""Input checks: bad input is a ValueError naming the fix, thresholding reducers are refused for the
NIR term, and value checks read values on the host only where that costs no sync."""

import copy

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, reducers

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss, get_proxies
from nir_loss.validation import blocking_checks, check_embeddings, check_labels

from .helpers import EXACT, FLOW, META, C, D, batch


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
    nir = 0.2 * mixed.nir.per_sample_loss(F.normalize(x, dim=1), mixed.proxies, y).mean()
    torch.testing.assert_close(mixed(x, y), plain(x, y) + nir)
    inner = NIRRegularizer(
        losses.ProxyNCALoss(C, D, reducer=reducers.AvgNonZeroReducer()), nir_weight=0.2, flow_options=FLOW
    )
    inner(*batch()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner.flow.parameters())


# -- value checks that never block: on the device, or not at all on meta tensors --------------


def test_blocking_checks_only_where_reading_values_is_free_or_on_the_first_call():
    assert blocking_checks("cpu", 0) and blocking_checks("cpu", 10**6)
    assert blocking_checks(torch.device("cuda"), 0) and not blocking_checks(torch.device("cuda"), 1)
    assert not blocking_checks(META, 0)


def test_blocking_checks_read_values_and_device_checks_do_not():
    x, y = torch.empty(4, 8, device=META), torch.empty(4, dtype=torch.long, device=META)
    check_embeddings(x, 8, check_values=True, blocking=False)
    check_labels(y, 4, 7, check_values=True, blocking=False)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_embeddings(x, 8, check_values=True, blocking=True)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_labels(y, 4, 7, check_values=True, blocking=True)


@pytest.mark.parametrize("bad", ["labels", "embeddings"])
def test_device_side_checks_still_fail_on_bad_values(bad):
    """On CPU torch._assert_async raises at once; on CUDA it fails the next synchronizing call."""
    x, y = torch.zeros(3, 8), torch.tensor([0, 1, 2])
    if bad == "labels":
        y[1] = 7
        check_embeddings(x, 8, check_values=True, blocking=False)  # the good one passes
        with pytest.raises(RuntimeError, match="lie in"):
            check_labels(y, 3, 7, check_values=True, blocking=False)
    else:
        x[2, 0] = float("nan")
        check_labels(y, 3, 7, check_values=True, blocking=False)
        with pytest.raises(RuntimeError, match="NaN"):
            check_embeddings(x, 8, check_values=True, blocking=False)
