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
