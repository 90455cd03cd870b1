"""Non-isotropy Regularization (NIR) for proxy-based deep metric learning, on PML and normflows.

The top level holds what a training script uses: the losses, the flow, ``get_proxies``, the
defaults and the distributed wrapper. Building blocks live in their modules: ``nir_loss.nir``
(``NIRTerm``, its options and objectives, the tail guard), ``nir_loss.losses`` (the PML
adapters and their miner weights) and ``nir_loss.flow`` (the coupling layer and its helpers);
test helpers in ``nir_loss.testing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .distributed import DistributedLossWrapper
from .flow import ProxyConditionedFlow
from .losses import DEFAULT_FLOW_LR_MULT, DEFAULT_PROXY_LR_MULT, NIRRegularizer, ProxyAnchorNIRLoss
from .nir import DEFAULT_OBJECTIVE, default_guard_radius, default_nir_weight, default_noise_std
from .proxies import get_proxies

__version__ = "0.3.0"

__all__ = [
    "DEFAULT_FLOW_LR_MULT",
    "DEFAULT_OBJECTIVE",
    "DEFAULT_PROXY_LR_MULT",
    "DistributedLossWrapper",
    "NIRRegularizer",
    "ProxyAnchorNIRLoss",
    "ProxyConditionedFlow",
    "default_guard_radius",
    "default_nir_weight",
    "default_noise_std",
    "get_proxies",
]

# Building blocks exported here up to 0.2.0 (with a DeprecationWarning up to 0.3.0), and the
# module each is imported from now: named in the AttributeError.
_MODULE_OF = {
    "ContextAffineCoupling": "flow",
    "soft_clamp": "flow",
    "standard_normal_log_prob": "flow",
    "NIRTerm": "nir",
    "OBJECTIVES": "nir",
    "guarded_energy": "nir",
    "miner_weights": "losses",
    "weighted_element_losses": "losses",
}


def __dir__() -> list[str]:
    """What ``dir(nir_loss)`` lists: the API, the version and the modules (not this file's imports)."""
    modules = ["distributed", "flow", "losses", "nir", "proxies", "testing", "validation"]
    return sorted([*__all__, "__version__", *modules])


if not TYPE_CHECKING:  # type checkers should see only the names above

    def __getattr__(name: str) -> Any:
        message = f"module 'nir_loss' has no attribute {name!r}"
        if name in _MODULE_OF:
            module = f"nir_loss.{_MODULE_OF[name]}"
            message += f"; since 0.4.0 it is imported from its module: from {module} import {name}"
        raise AttributeError(message)
