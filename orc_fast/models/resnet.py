"""CIFAR ResNets (He et al. 2016, section 4.2) as used by the CIFAR-100 distillation papers.

Depth 6n + 2 with basic blocks in three stages; the stage widths are (16, 32, 64) for
resnet8..resnet110 and (64, 128, 256) after a 32-wide stem for the "x4" variants.
Projection shortcuts (1x1 conv + BN) where the shape changes. Global average pooling
makes any input size work; 32x32 is the one the published numbers use.
"""

from __future__ import annotations

from torch import nn

from .init import init_weights


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem, *stages = widths
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        layers, channels = [], stem
        for index, width in enumerate(stages):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


def resnet(depth: int, num_classes: int, widths=NARROW) -> CifarResNet:
    return CifarResNet(depth, widths, num_classes)
