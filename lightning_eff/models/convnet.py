"""ConvNet: the standard network of dataset-distillation benchmarks.

Introduced with dataset condensation (Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching",
ICLR 2021) and used unchanged by DM, MTT, NCFM and their successors: ``depth`` blocks of
``3x3 conv -> norm -> activation -> 2x2 pooling`` followed by one linear layer. The "instance" norm of that
code is ``nn.GroupNorm(width, width, affine=True)`` (one group per channel), reproduced here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.utils.checks import check_choice, check_int

__all__ = ["ConvNet"]

_NORMS = ("instance", "batch", "layer", "none")
_ACTIVATIONS = ("relu", "leakyrelu", "gelu", "sigmoid")
_POOLINGS = ("avg", "max", "none")


def make_activation(name: str) -> nn.Module:
    """Activation module by name: ``relu``, ``leakyrelu`` (slope 0.01), ``gelu`` or ``sigmoid``."""
    if name == "relu":
        return nn.ReLU()
    if name == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    if name == "gelu":
        return nn.GELU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"`activation` must be one of {_ACTIVATIONS}, got {name!r}.")


def _make_norm(name: str, width: int) -> nn.Module:
    if name == "instance":
        return nn.GroupNorm(width, width, affine=True)
    if name == "batch":
        return nn.BatchNorm2d(width)
    if name == "layer":
        return nn.GroupNorm(1, width, affine=True)
    return nn.Identity()


def _make_pool(name: str) -> nn.Module:
    if name == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if name == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


class ConvNet(nn.Module):
    """The ConvNet-``depth`` of dataset distillation (DC/DM/MTT/NCFM).

    ``depth`` blocks of [3x3 conv (padding 1, ``width`` channels), norm, activation, 2x2 pooling], flattened
    into a ``feature_dim``-dimensional embedding, then a linear ``classifier``.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        width: channels of every conv layer.
        depth: number of conv blocks.
        norm: ``"instance"`` (``GroupNorm(width, width)``, the distillation default), ``"batch"``,
            ``"layer"`` (``GroupNorm(1, width)``) or ``"none"``.
        activation: ``"relu"``, ``"leakyrelu"``, ``"gelu"`` or ``"sigmoid"``.
        pooling: ``"avg"``, ``"max"`` (2x2, stride 2) or ``"none"``.
        image_size: side of the square input images.

    Example::

        >>> net = ConvNet(in_channels=1, num_classes=10, width=32, depth=3, image_size=8)
        >>> net.feature_dim
        32
        >>> x = torch.randn(4, 1, 8, 8)
        >>> net.features(x).shape, net(x).shape
        (torch.Size([4, 32]), torch.Size([4, 10]))
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        activation: str = "relu",
        pooling: str = "avg",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(in_channels, "in_channels", minimum=1, owner=name)
        self.num_classes = check_int(num_classes, "num_classes", minimum=1, owner=name)
        self.width = check_int(width, "width", minimum=1, owner=name)
        self.depth = check_int(depth, "depth", minimum=1, owner=name)
        self.norm = check_choice(norm, "norm", _NORMS, owner=name)
        self.activation = check_choice(activation, "activation", _ACTIVATIONS, owner=name)
        self.pooling = check_choice(pooling, "pooling", _POOLINGS, owner=name)
        self.image_size = check_int(image_size, "image_size", minimum=1, owner=name)

        side = image_size
        if pooling != "none":
            side = image_size // 2**depth
            if side < 1:
                raise ValueError(
                    f"{name}: `image_size`={image_size} is too small for `depth`={depth} with pooling={pooling!r}: "
                    f"{depth} 2x2 poolings need image_size >= {2**depth} (or use a smaller depth or pooling='none')."
                )
        self.feature_side = side
        self.feature_dim = width * side * side

        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                _make_norm(norm, width),
                make_activation(activation),
                _make_pool(pooling),
            ]
            channels = width
        self.encoder = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (so the network can be rebuilt, e.g. from a checkpoint)."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "width": self.width,
            "depth": self.depth,
            "norm": self.norm,
            "activation": self.activation,
            "pooling": self.pooling,
            "image_size": self.image_size,
        }

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}: expected input of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), got {got}."
            )

    def features(self, x: Tensor) -> Tensor:
        """Flattened penultimate embedding ``[B, feature_dim]`` of images ``[B, in_channels, S, S]``."""
        self._check_input(x)
        return torch.flatten(self.encoder(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``: ``classifier(features(x))``."""
        return self.classifier(self.features(x))
