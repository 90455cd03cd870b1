"""The package's top level: what it exports, and the old top-level names of the building blocks."""

from __future__ import annotations

import pytest

import nir_loss


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
            ("nir", ["NIRTerm", "OBJECTIVES", "guarded_energy"]),
            ("losses", ["miner_weights", "weighted_element_losses"]),
        ]
        for name in names
    ],
)
def test_building_blocks_removed_from_the_top_level_name_their_module(name, module):
    """Found at the top level up to 0.3.0 (deprecated since 0.3.0); the error says where they are."""
    submodule = getattr(nir_loss, module)
    assert name in submodule.__all__ and name not in nir_loss.__all__
    with pytest.raises(AttributeError, match=rf"has no attribute '{name}'; .*from nir_loss\.{module} import {name}$"):
        getattr(nir_loss, name)
    assert not hasattr(nir_loss, name)


def test_defaults_moved_to_nir_still_import_from_losses():
    assert nir_loss.losses.DEFAULT_OBJECTIVE is nir_loss.nir.DEFAULT_OBJECTIVE is nir_loss.DEFAULT_OBJECTIVE
    assert nir_loss.losses.default_nir_weight is nir_loss.nir.default_nir_weight is nir_loss.default_nir_weight


def test_unknown_top_level_name_is_an_attribute_error():
    assert not hasattr(nir_loss, "no_such_name")
    with pytest.raises(ImportError):
        from nir_loss import no_such_name  # noqa: F401


def test_dir_lists_the_api_not_the_modules_imports():
    listed = set(dir(nir_loss))
    assert set(nir_loss.__all__) <= listed and "__version__" in listed
    assert not listed & {"Any", "TYPE_CHECKING", "importlib", "warnings"}


def test_signatures_show_the_defaults_values_and_they_are_the_constants():
    """The API page shows a signature's defaults as written: values, not constant names."""
    import inspect

    groups = inspect.signature(nir_loss.ProxyAnchorNIRLoss.param_groups).parameters
    assert groups["proxy_lr_mult"].default == nir_loss.DEFAULT_PROXY_LR_MULT
    assert groups["flow_lr_mult"].default == nir_loss.DEFAULT_FLOW_LR_MULT
    for fn in (
        nir_loss.ProxyAnchorNIRLoss,
        nir_loss.NIRRegularizer,
        nir_loss.default_nir_weight,
        nir_loss.nir.NIRTerm,
        nir_loss.nir.NIROptions,
    ):
        assert inspect.signature(fn).parameters["objective"].default == nir_loss.DEFAULT_OBJECTIVE
    for module in (nir_loss.losses, nir_loss.nir):  # signatures and fields, not the constants' definitions
        lines = inspect.getsource(module).splitlines()
        assert not [line for line in lines if "= DEFAULT_" in line and not line.startswith("DEFAULT_")]
    assert "-> _Loss" not in inspect.getsource(nir_loss.losses)
