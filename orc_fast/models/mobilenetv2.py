"""MobileNetV2 (Sandler et al. 2018) for CIFAR, as in the CIFAR-100 distillation papers:
expansion 6, width multiplier 0.5 (the "0.81M" MobileNetV2 of their tables), a strided
stem and a 1280-wide last 1x1 conv.
"""

from __future__ import annotations

from torch import nn

from .init import init_weights

# (expansion, output channels, blocks, first stride) at width 1.0
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu(in_channels, out_channels, kernel, stride=1, groups=1):
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            *conv_bn_relu(in_channels, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width: float = 0.5, last_channels: int = 1280):
        super().__init__()
        channels = int(32 * width)
        layers = conv_bn_relu(3, channels, 3, stride=2)
        for expansion, out, blocks, stride in SETTINGS:
            out = int(out * width)
            for index in range(blocks):
                layers.append(InvertedResidual(channels, out, stride if index == 0 else 1, expansion))
                channels = out
        layers += conv_bn_relu(channels, last_channels, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_weights(self, linear="normal")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
