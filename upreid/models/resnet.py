"""ResNet 18/34/50/101 written in the package (there is no CPU build of torchvision here).

State-dict keys follow torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...) so that an ImageNet weights file loads with :func:`load_torchvision_weights`. ReID options:
``last_stride`` (1 doubles the resolution of layer 4, the BoT / LUPerson choice) and IBN-a (Pan et al.,
ECCV 2018: the first BN of every block in layers 1-3 is half InstanceNorm, half BatchNorm; keys
``bn1.IN.*`` / ``bn1.BN.*`` as in the IBN-Net release). The forward returns the layer-4 feature map;
pooling and heads live in :mod:`upreid.models.heads` and the UP-ReID module.
"""
from __future__ import annotations

import os
from typing import Type, Union

import torch
from torch import Tensor, nn

ARCHS = {  # depth -> (block, blocks per layer)
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class IBN(nn.Module):
    """IBN-a normalisation: InstanceNorm on the first ``ratio`` of the channels, BatchNorm on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


def _norm(planes: int, ibn: bool) -> nn.Module:
    return IBN(planes) if ibn else nn.BatchNorm2d(planes)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 ibn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes, ibn)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 ibn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(planes, ibn)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk: ``forward(x [B, 3, H, W]) -> [B, C, H/32, W/32]`` (``H/16`` with last_stride 1),
    ``C = out_channels`` (512 for depth 18/34, 2048 for 50/101). ``width`` is the stem's channel count
    (64 in every published ResNet; the layers have 1, 2, 4 and 8 times as many): a narrow ResNet of the
    same structure is a fast stand-in in tests."""

    def __init__(self, depth: int = 50, last_stride: int = 2, ibn: bool = False,
                 zero_init_residual: bool = False, width: int = 64):
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"ResNet: depth must be one of {sorted(ARCHS)}, got {depth}")
        if last_stride not in (1, 2):
            raise ValueError(f"ResNet: last_stride must be 1 or 2, got {last_stride}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 2 or width % 2:
            raise ValueError(f"ResNet: width must be an even integer >= 2, got {width!r}")
        kind, layers = ARCHS[depth]
        block: Type[Union[BasicBlock, Bottleneck]] = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.last_stride, self.ibn, self.width = depth, last_stride, ibn, width
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1, ibn)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2, ibn)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2, ibn)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], last_stride, False)  # IBN-a: not in layer 4
        self.out_channels = 8 * width * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as identity (Goyal et al.)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, ibn: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # IBN-a (as released): Bottleneck of 512 planes keeps plain BN; BasicBlock uses IBN throughout 1-3.
        use_ibn = ibn and not (block is Bottleneck and planes == 8 * self.width)
        layers = [block(self.inplanes, planes, stride, downsample, use_ibn)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, use_ibn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))   # [B, 64, H/4, W/4]
        x = self.layer1(x)                                      # [B, 64|256, H/4, W/4]
        x = self.layer2(x)                                      # [B, 128|512, H/8, W/8]
        x = self.layer3(x)                                      # [B, 256|1024, H/16, W/16]
        return self.layer4(x)                                   # [B, C, H/32 | H/16, ...]


def check_trunk(trunk: nn.Module, owner: str) -> int:
    """The channel count C of an injected trunk (a module mapping [B, 3, H, W] to a feature map
    [B, C, h, w] that names C in ``out_channels``, as :class:`ResNet` does)."""
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"{owner}: trunk must be an nn.Module, got {type(trunk).__name__}")
    c = getattr(trunk, "out_channels", None)
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"{owner}: the trunk ({type(trunk).__name__}) must set out_channels, the channel "
                         f"count of its [B, C, h, w] output, to a positive int; got {c!r}")
    return c


def resnet(depth: int = 50, **kwargs) -> ResNet:
    return ResNet(depth, **kwargs)


def load_torchvision_weights(model: ResNet, source: Union[str, os.PathLike, dict]) -> list:
    """Load a torchvision ResNet state dict (a file or a dict) into ``model``; the ``fc`` classifier is
    dropped. Returns the keys the file lacks (IBN keys when loading a plain ResNet into an IBN one).
    Raises ``ValueError`` naming the offending keys on unexpected keys or shape mismatches."""
    state = source if isinstance(source, dict) else torch.load(source, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"load_torchvision_weights: {len(unexpected)} keys not in a depth-{model.depth} "
                         f"ResNet, e.g. {unexpected[:5]} (is the file for another depth?)")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"load_torchvision_weights: shape mismatch (key, file, model): {bad[:5]}")
    missing = model.load_state_dict(state, strict=False).missing_keys
    return missing
