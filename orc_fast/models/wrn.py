"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR: WRN-depth-k, pre-activation blocks.

Depth 6n + 4; stage widths (16k, 32k, 64k) after a 16-wide stem; no dropout.
"""

from __future__ import annotations

from torch import nn

from .init import init_weights


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.equal = in_channels == out_channels and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        # As in the original: a projection shortcut takes the pre-activated input.
        return out + (x if self.equal else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, channels = [], 16
        for index, width in enumerate(widths):
            for block in range(blocks_per_stage):
                layers.append(PreActBlock(channels, width, 2 if index > 0 and block == 0 else 1))
                channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, linear="zero_bias")

    def forward(self, x):
        return self.fc(self.head(self.features(self.stem(x))).flatten(1))


def wrn(depth: int, widen_factor: int, num_classes: int) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes)
