"""Non-isotropy Regularization (NIR) for proxy-based deep metric learning, on PML and normflows."""

from .distributed import DistributedLossWrapper
from .flow import ContextAffineCoupling, ProxyConditionedFlow, soft_clamp, standard_normal_log_prob
from .losses import (
    DEFAULT_FLOW_LR_MULT,
    DEFAULT_OBJECTIVE,
    DEFAULT_PROXY_LR_MULT,
    NIRRegularizer,
    ProxyAnchorNIRLoss,
    default_nir_weight,
)
from .nir import (
    OBJECTIVES,
    NIRTerm,
    default_guard_radius,
    default_noise_std,
    guarded_energy,
    miner_weights,
    weighted_element_losses,
)
from .proxies import get_proxies

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_FLOW_LR_MULT",
    "DEFAULT_OBJECTIVE",
    "DEFAULT_PROXY_LR_MULT",
    "ContextAffineCoupling",
    "DistributedLossWrapper",
    "NIRRegularizer",
    "NIRTerm",
    "OBJECTIVES",
    "ProxyAnchorNIRLoss",
    "ProxyConditionedFlow",
    "default_guard_radius",
    "default_nir_weight",
    "default_noise_std",
    "get_proxies",
    "guarded_energy",
    "miner_weights",
    "soft_clamp",
    "standard_normal_log_prob",
    "weighted_element_losses",
]
