"""Tests of nir_loss.testing: it passes PML's proxy losses and catches broken ones by name."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from torch import nn

from nir_loss import NIRRegularizer, ProxyAnchorNIRLoss, ProxyConditionedFlow
from nir_loss.flow import ContextAffineCoupling
from nir_loss.testing import check_flow, check_proxy_loss

from .helpers import TINY_FLOW

C, D = 5, 8

PML_LOSSES = {
    "ProxyAnchorLoss": lambda: pml_losses.ProxyAnchorLoss(C, D),
    "ProxyNCALoss": lambda: pml_losses.ProxyNCALoss(C, D),
    "NormalizedSoftmaxLoss": lambda: pml_losses.NormalizedSoftmaxLoss(C, D),
    "ArcFaceLoss": lambda: pml_losses.ArcFaceLoss(C, D),
    "CosFaceLoss": lambda: pml_losses.CosFaceLoss(C, D),
    "LargeMarginSoftmaxLoss": lambda: pml_losses.LargeMarginSoftmaxLoss(C, D),
    "SphereFaceLoss": lambda: pml_losses.SphereFaceLoss(C, D),
    "SubCenterArcFaceLoss": lambda: pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D),
    "SoftTripleLoss": lambda: pml_losses.SoftTripleLoss(C, D, centers_per_class=3),
    "ProxyAnchorNIRLoss": lambda: ProxyAnchorNIRLoss(C, D, flow_options=TINY_FLOW),
    "NIRRegularizer(ProxyNCALoss)": lambda: NIRRegularizer(pml_losses.ProxyNCALoss(C, D), flow_options=TINY_FLOW),
}


# -- losses that pass ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PML_LOSSES))
def test_pml_proxy_losses_pass(name):
    check_proxy_loss(PML_LOSSES[name](), C, D)


def test_p2sgrad_passes_without_miners():
    # P2SGradLoss rejects indices_tuple by design; the check says to pass miners=False.
    with pytest.raises(AssertionError, match=r"(?s)MultiSimilarityMiner.*miners=False"):
        check_proxy_loss(pml_losses.P2SGradLoss(D, C), C, D)
    check_proxy_loss(pml_losses.P2SGradLoss(D, C), C, D, miners=False)


def test_loss_is_not_modified():
    loss = pml_losses.ProxyAnchorLoss(C, D)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    check_proxy_loss(loss, C, D, dtypes=(torch.float64,))
    after = loss.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)


def test_global_rng_is_untouched():
    loss = pml_losses.ProxyNCALoss(C, D)
    state = torch.random.get_rng_state()
    check_proxy_loss(loss, C, D, dtypes=(torch.float32,))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_check_proxy_loss_takes_nir_options():
    quick = {"miners": False, "dtypes": (torch.float32,), "devices": ["cpu"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_proxy_loss(
            pml_losses.ProxyNCALoss(C, D), C, D, **quick, nir_options={"nir_weight": 0.5, "flow_options": TINY_FLOW}
        )
    with pytest.raises(AssertionError, match="nir_options"):  # the removed spelling names its fix
        check_proxy_loss(pml_losses.ProxyNCALoss(C, D), C, D, **quick, nir_options={"weight": 0.5})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_checked():
    check_proxy_loss(pml_losses.ProxyAnchorLoss(C, D), C, D, devices=["cuda"])


# -- broken losses are caught with a message naming the fix ----------------------------------


class _CosineLoss(pml_losses.BaseMetricLossFunction):
    """A correct small proxy loss; the subclasses below break it one way each."""

    def __init__(self, num_classes=C, embedding_size=D):
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size) / 8)

    def used_proxies(self):
        return self.proxies

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        logits = 16 * F.normalize(embeddings, dim=1) @ F.normalize(self.used_proxies().to(embeddings), dim=1).t()
        return {
            "loss": {
                "losses": F.cross_entropy(logits, labels, reduction="none"),
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }


class _DetachedProxies(_CosineLoss):
    def used_proxies(self):
        return self.proxies.detach()


class _BufferProxies(_CosineLoss):
    def __init__(self):
        super().__init__()
        proxies = self.proxies.detach().clone()
        del self.proxies
        self.register_buffer("proxies", proxies)


class _PlainTensorProxies(_CosineLoss):
    def __init__(self):
        super().__init__()
        proxies = self.proxies.detach().clone().requires_grad_(True)
        del self.proxies
        self.proxies = proxies  # not registered: no optimizer, no .to(), no state_dict


class _ReshapedColumns(_CosineLoss):
    """Class proxies are the columns of W (D, C); get_proxies reshapes instead of transposing."""

    def __init__(self):
        super().__init__()
        del self.proxies
        self.W = nn.Parameter(torch.randn(D, C) / 8)

    def used_proxies(self):
        return self.W.t()

    def get_proxies(self):
        return self.W.reshape(C, D)  # right shape, rows mix the classes' columns


class _UnsavedProxies(_CosineLoss):
    """Proxies = a plain tensor attribute + a learned shift: trainable, but state_dict loses the tensor."""

    def __init__(self):
        super().__init__()
        del self.proxies
        self.shift = nn.Parameter(torch.zeros(D))
        self.raw = torch.randn(C, D) / 8

    def used_proxies(self):
        return self.raw + self.shift

    def get_proxies(self):
        return self.used_proxies()


class _Float32Only(_CosineLoss):
    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return super().compute_loss(embeddings.float(), labels, indices_tuple, ref_emb, ref_labels)


class _HardCodedFloat32(_CosineLoss):
    def used_proxies(self):
        return self.proxies.float()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        logits = embeddings @ self.used_proxies().t()  # float64 @ float32 fails
        return {
            "loss": {
                "losses": F.cross_entropy(logits, labels, reduction="none"),
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }


def test_correct_custom_loss_passes():
    check_proxy_loss(_CosineLoss(), C, D)


@pytest.mark.parametrize(
    "loss, message",
    [
        (_DetachedProxies(), r"own loss \(without NIR\) gives no gradient to its proxies.*no \.detach\(\)"),
        (_BufferProxies(), r"not computed from a trainable parameter.*nn\.Parameter"),
        (_PlainTensorProxies(), r"not computed from a trainable parameter.*nn\.Parameter"),
        (pml_losses.ContrastiveLoss(), r"has no class proxies.*How to fix: give the loss a `proxies` nn\.Parameter"),
        (_ReshapedColumns(), r"get_proxies\(_ReshapedColumns\)\[\d\] is not the proxy of class \d.*return W\.t\(\)"),
        (
            _UnsavedProxies(),
            r"load_state_dict does not restore _UnsavedProxies's proxies \(computed from plain tensor "
            r"attributes, which state_dict leaves out: loss\.raw\).*register them with nn\.Parameter",
        ),
    ],
)
def test_broken_proxies_are_caught(loss, message):
    with pytest.raises(AssertionError, match=re.compile(message, re.S)):
        check_proxy_loss(loss, C, D)


def test_wrong_shape_is_caught():
    with pytest.raises(AssertionError, match=r"has shape \(5, 8\); expected \(7, 8\)"):
        check_proxy_loss(_CosineLoss(), 7, D)


@pytest.mark.parametrize(
    "loss, message",
    [
        (_Float32Only(), r"returns torch\.float32 for torch\.float64 embeddings"),
        (_HardCodedFloat32(), r"without NIR on cpu in torch\.float64 raised RuntimeError"),
    ],
)
def test_dtype_problem_is_caught(loss, message):
    with pytest.raises(AssertionError, match=re.compile(message + r".*How to fix: cast the proxies", re.S)):
        check_proxy_loss(loss, C, D)


def test_messages_say_how_to_fix():
    with pytest.raises(AssertionError) as info:
        check_proxy_loss(_DetachedProxies(), C, D)
    assert "\nHow to fix: " in str(info.value)


# -- flows -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flow",
    [
        ProxyConditionedFlow(D, num_blocks=2, hidden_features=16, num_layers=3),
        ProxyConditionedFlow(D, num_blocks=1, hidden_features=16, num_layers=3, coupling="spline"),
        ProxyConditionedFlow(D, num_blocks=1, hidden_features=16, num_layers=3, context_mlp_width=8),
        ContextAffineCoupling(5, context_features=3, hidden_features=8, num_layers=2),
    ],
    ids=["affine", "spline", "context_mlp", "coupling_layer"],
)
def test_library_flows_pass(flow):
    check_flow(flow)


class _HalfLogDet(ProxyConditionedFlow):
    """Log-det wrong in both directions (so forward and inverse still cancel)."""

    def _run(self, x, context, encoded, context_index, density):
        y, log_det = super()._run(x, context, encoded, context_index, density)
        return y, 0.5 * log_det


class _NotInverted(ProxyConditionedFlow):
    def forward_and_log_det(self, z, context=None, **kwargs):
        x, log_det = super().forward_and_log_det(z, context, **kwargs)
        return x + 1e-3, log_det


class _IgnoresContext(ProxyConditionedFlow):
    def encode_context(self, context):
        return super().encode_context(torch.zeros_like(context))


@pytest.mark.parametrize(
    "cls, message",
    [
        (_HalfLogDet, r"log-det is wrong: sample 0 reports .* slogdet of the autograd Jacobian"),
        (_NotInverted, r"is not invertible: forward\(inverse\(x\)\) differs from x"),
        (_IgnoresContext, r"log-density does not depend on its context"),
    ],
)
def test_broken_flows_are_caught(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_flow(cls(D, num_blocks=1, hidden_features=16, num_layers=3))


def test_check_flow_exercises_identity_initialized_flows():
    # With identity_init the log-det is 0 everywhere; the perturbed copy still catches the bug.
    with pytest.raises(AssertionError, match="log-det is wrong"):
        check_flow(_HalfLogDet(D, num_blocks=1, hidden_features=16, num_layers=3, identity_init=True))
