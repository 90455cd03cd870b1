"""The NIR computation never reads tensor values on the host: it runs on the meta device.

Meta tensors carry shapes but no data, so any ``.item()``, ``bool(tensor)``, data-dependent
shape or host copy inside the computation raises. Passing here means no host sync on CUDA.
"""

import pytest
import torch
from pytorch_metric_learning import losses, reducers

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss
from nir_loss.validation import blocking_checks, check_embeddings, check_labels

FLOW = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)
META = torch.device("meta")


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
    else:
        x[2, 0] = float("nan")
    with pytest.raises(RuntimeError, match="lie in|NaN"):
        check_embeddings(x, 8, check_values=True, blocking=False)
        check_labels(y, 3, 7, check_values=True, blocking=False)


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
