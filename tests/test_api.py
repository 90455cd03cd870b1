"""The public API: one spelling for both losses, a small top level, and the deprecated spellings."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

import nir_loss
from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss

C, D = 5, 8
FLOW = {"num_blocks": 1, "hidden_features": 8, "num_layers": 2}


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
    reg = NIRRegularizer(losses.ProxyAnchorLoss(C, D), nir_weight=0.3, flow_options=FLOW)
    pa = ProxyAnchorNIRLoss(C, D, nir_weight=0.3, flow_options=FLOW)
    assert reg.nir_weight == pa.nir_weight == 0.3
    assert [p.shape for p in reg.flow.parameters()] == [p.shape for p in pa.flow.parameters()]
    assert len(reg.flow.flows) == 3  # one block: a permutation and two couplings


def test_old_weight_keyword_warns_and_gives_the_same_loss():
    base = losses.ProxyNCALoss(C, D)
    new = NIRRegularizer(base, nir_weight=0.5, flow_options=FLOW)
    with pytest.warns(DeprecationWarning, match=r"weight=\.\.\.\) is deprecated.*use nir_weight="):
        old = NIRRegularizer(base, weight=0.5, flow_options=FLOW)
    old.load_state_dict(new.state_dict())
    assert old.nir_weight == 0.5
    embeddings, labels = _batch()
    torch.testing.assert_close(_value(old, embeddings, labels), _value(new, embeddings, labels), rtol=0, atol=0)


def test_old_flow_keywords_warn_and_give_the_same_loss():
    base = losses.ProxyNCALoss(C, D)
    new = NIRRegularizer(base, nir_weight=0.5, flow_options=FLOW)
    with pytest.warns(DeprecationWarning, match=r"num_blocks=.*is deprecated.*flow_options=\{\.\.\.\}"):
        old = NIRRegularizer(base, nir_weight=0.5, **FLOW)
    old.load_state_dict(new.state_dict())  # same architecture, or this raises
    embeddings, labels = _batch()
    torch.testing.assert_close(_value(old, embeddings, labels), _value(new, embeddings, labels), rtol=0, atol=0)


def test_old_spelling_warns_at_the_callers_line():
    with pytest.warns(DeprecationWarning) as record:
        NIRRegularizer(losses.ProxyNCALoss(C, D), weight=0.5, **FLOW)
    assert len(record) == 2
    assert {w.filename for w in record} == {__file__}


def test_new_spelling_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NIRRegularizer(losses.ProxyNCALoss(C, D), nir_weight=0.5, flow_options=FLOW)
        NIRRegularizer(losses.ProxyNCALoss(C, D), 0.5)  # positional, as before


def test_both_spellings_of_the_weight_is_an_error():
    with pytest.raises(TypeError, match=r"both nir_weight=0.1 and weight=0.2; .*pass nir_weight= only"):
        NIRRegularizer(losses.ProxyNCALoss(C, D), nir_weight=0.1, weight=0.2)


def test_both_spellings_of_flow_options_is_an_error():
    with pytest.raises(TypeError, match=r"flow_options= and flow options as keywords \['num_layers'\]"):
        NIRRegularizer(losses.ProxyNCALoss(C, D), flow_options={"num_blocks": 1}, num_layers=2)


def test_unknown_keyword_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['nir_wieght'\].*hidden_features"):
        NIRRegularizer(losses.ProxyNCALoss(C, D), nir_wieght=0.1)


def test_top_level_is_what_users_call():
    assert sorted(nir_loss.__all__) == sorted(
        [
            "NIRRegularizer",
            "ProxyAnchorNIRLoss",
            "ProxyConditionedFlow",
            "get_proxies",
            "DistributedLossWrapper",
            "DEFAULT_OBJECTIVE",
            "DEFAULT_PROXY_LR_MULT",
            "DEFAULT_FLOW_LR_MULT",
            "default_nir_weight",
            "default_noise_std",
            "default_guard_radius",
        ]
    )
    assert all(hasattr(nir_loss, name) for name in nir_loss.__all__)
    assert isinstance(nir_loss.__version__, str)


@pytest.mark.parametrize(
    "name, module",
    [
        (name, module)
        for module, names in [
            ("flow", ["ContextAffineCoupling", "soft_clamp", "standard_normal_log_prob"]),
            ("nir", ["NIRTerm", "OBJECTIVES", "guarded_energy", "miner_weights", "weighted_element_losses"]),
        ]
        for name in names
    ],
)
def test_building_blocks_moved_to_their_modules_still_import_from_the_top_with_a_warning(name, module):
    submodule = getattr(nir_loss, module)
    assert name in submodule.__all__ and name not in nir_loss.__all__
    with pytest.warns(DeprecationWarning, match=rf"nir_loss\.{name} is deprecated.*from nir_loss\.{module} import"):
        value = getattr(nir_loss, name)
    assert value is getattr(submodule, name)


def test_unknown_top_level_name_is_an_attribute_error():
    assert not hasattr(nir_loss, "no_such_name")
    with pytest.raises(ImportError):
        from nir_loss import no_such_name  # noqa: F401


def test_check_proxy_loss_takes_nir_options_in_either_spelling():
    from nir_loss.testing import check_proxy_loss

    quick = {"miners": False, "dtypes": (torch.float32,), "devices": ["cpu"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_proxy_loss(
            losses.ProxyNCALoss(C, D), C, D, **quick, nir_options={"nir_weight": 0.5, "flow_options": FLOW}
        )
    with pytest.warns(DeprecationWarning) as record:
        check_proxy_loss(losses.ProxyNCALoss(C, D), C, D, **quick, nir_options={"weight": 0.5, "num_blocks": 1})
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "(weight=...)" in messages[0] and "num_blocks=..." in messages[1]
