"""Proxy access: custom losses' proxies reach NIR, and losses without usable proxies are refused."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from nir_loss import NIRRegularizer

from .helpers import FLOW, C, D, batch


class CustomParamLoss(losses.BaseMetricLossFunction):
    def __init__(self):
        super().__init__()
        self.proxies = torch.nn.Parameter(torch.randn(C, D))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        d = 1 - F.normalize(embeddings, dim=1) @ F.normalize(self.proxies, dim=1).t()
        return {
            "loss": {
                "losses": d[torch.arange(len(labels)), labels],
                "indices": torch.arange(len(labels)),
                "reduction_type": "element",
            }
        }


class CustomGetterLoss(CustomParamLoss):
    def get_proxies(self):
        return self.proxies.view(C, 1, D)


@pytest.mark.parametrize("cls", [CustomParamLoss, CustomGetterLoss])
def test_custom_losses_with_proxies(cls):
    base = cls()
    loss_fn = NIRRegularizer(base, nir_weight=0.1, flow_options=FLOW)
    x, y = batch()
    loss_fn(x, y).backward()
    assert base.proxies.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [losses.ContrastiveLoss(), losses.TripletMarginLoss(), losses.NTXentLoss()])
def test_loss_without_proxies_is_a_type_error(loss):
    with pytest.raises(TypeError, match="has no class proxies"):
        NIRRegularizer(loss)


def test_bad_proxies_shape_is_a_type_error():
    class Bad(CustomParamLoss):
        def get_proxies(self):
            return self.proxies.flatten()

    with pytest.raises(TypeError, match=r"expected a tensor of shape \(C, D\)"):
        NIRRegularizer(Bad())
