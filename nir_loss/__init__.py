"""Non-isotropy Regularization (NIR) for proxy-based deep metric learning, on PML and normflows.

The top level holds what a training script uses: the losses, the flow, ``get_proxies``, the
defaults and the distributed wrapper. Building blocks live in their modules: ``nir_loss.nir``
(``NIRTerm``, objectives, miner weights, the tail guard) and ``nir_loss.flow`` (the coupling
layer and its helpers); test helpers in ``nir_loss.testing``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .distributed import DistributedLossWrapper
from .flow import ProxyConditionedFlow
from .losses import (
    DEFAULT_FLOW_LR_MULT,
    DEFAULT_OBJECTIVE,
    DEFAULT_PROXY_LR_MULT,
    NIRRegularizer,
    ProxyAnchorNIRLoss,
    default_nir_weight,
)
from .nir import default_guard_radius, default_noise_std
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

# Exported here up to 0.2.0; still found here, with a DeprecationWarning, until 0.4.0.
_MOVED = {
    "ContextAffineCoupling": "flow",
    "soft_clamp": "flow",
    "standard_normal_log_prob": "flow",
    "NIRTerm": "nir",
    "OBJECTIVES": "nir",
    "guarded_energy": "nir",
    "miner_weights": "nir",
    "weighted_element_losses": "nir",
}


def __dir__() -> list[str]:
    """What ``dir(nir_loss)`` lists: the API, the version and the modules (not this file's imports)."""
    modules = ["distributed", "flow", "losses", "nir", "proxies", "testing", "validation"]
    return sorted([*__all__, "__version__", *modules])


if not TYPE_CHECKING:  # type checkers should see only the names above

    def __getattr__(name: str) -> Any:
        if name not in _MOVED:
            raise AttributeError(f"module 'nir_loss' has no attribute {name!r}")
        module = f"nir_loss.{_MOVED[name]}"
        warnings.warn(
            f"nir_loss.{name} is deprecated and will be removed in 0.4.0: use from {module} import {name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
