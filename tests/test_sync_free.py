"""The NIR computation never reads tensor values on the host: it runs on the meta device.

Meta tensors carry shapes but no data, so any ``.item()``, ``bool(tensor)``, data-dependent
shape or host copy inside the computation raises. Passing here means no host sync on CUDA.
"""

import pytest
import torch
from pytorch_metric_learning import losses

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss

FLOW = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)
META = torch.device("meta")


@pytest.mark.parametrize("objective", ["nll", "exp_nll"])
@pytest.mark.parametrize("make", [
    lambda o: ProxyAnchorNIRLoss(7, 8, objective=o, flow_options=FLOW, validate=False),
    lambda o: NIRRegularizer(losses.SoftTripleLoss(7, 8, centers_per_class=2), objective=o, validate=False, **FLOW),
])
def test_nir_term_runs_on_meta_tensors(make, objective):
    loss_fn = make(objective).to(META)
    x = torch.empty(12, 8, device=META, requires_grad=True)
    y = torch.empty(12, dtype=torch.long, device=META)
    pairs = tuple(torch.empty(5, dtype=torch.long, device=META) for _ in range(4))
    for tup in (None, pairs):
        entry = loss_fn._nir_loss_entry(x, y, tup)
        assert entry["losses"].shape == (12,) and entry["losses"].device == META
        entry["losses"].sum().backward()
    assert loss_fn.log_likelihood(x, y).shape == (12,)
    assert loss_fn.log_likelihood_matrix(x, chunk_size=5).shape == (12, 7)


def test_validation_is_what_needs_the_host():
    loss_fn = ProxyAnchorNIRLoss(7, 8, flow_options=FLOW).to(META)  # validate=True
    x = torch.empty(4, 8, device=META)
    with pytest.raises((RuntimeError, NotImplementedError)):
        loss_fn.log_likelihood(x, torch.empty(4, dtype=torch.long, device=META))
