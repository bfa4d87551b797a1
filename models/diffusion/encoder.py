"""ResNet-family image encoder (1 input channel): the clean slice -> the condition vector c of cDDPM.

Built from scratch (no torchvision) with GroupNorm in place of BatchNorm, for two reasons: a slice's code must not
depend on which other slices share its batch (inference runs a whole volume, training random slices), and the EMA
copy of the weights then needs no running statistics to be re-estimated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.diffusion.config import EncoderConfig

NORM_GROUPS = 32


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with gcd(32, channels) groups: 32 for standard widths, still valid for narrow test widths."""
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride, 1, bias=False),
            _norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 3, 1, 1, bias=False),
            _norm(out),
        )
        self.shortcut = _shortcut(in_channels, out, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            _norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            _norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            _norm(out),
        )
        self.shortcut = _shortcut(in_channels, out, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection (ResNet option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _norm(out_channels))


class ImageEncoder(nn.Module):
    """(B,1,H,W) image -> (B, out_dim) vector: stem, 4 stages of widths base·(1,2,4,8), global average pool, linear."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        width = config.base_width
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, 2, 3, bias=False),
            _norm(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        channels = width
        for index, count in enumerate(config.layers):
            stage_width = width * 2**index
            for n in range(count):
                stride = 2 if index > 0 and n == 0 else 1
                stages.append(block(channels, stage_width, stride))
                channels = stage_width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, config.out_dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.stages:
            # Start each residual branch at zero so the deep encoder begins close to its shortcut path (Goyal 2017).
            last_norm = module.body[-1]
            nn.init.zeros_(last_norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))
        return self.head(torch.flatten(h.mean(dim=(2, 3)), 1))
