"""ShuffleNet V2 (Ma et al. 2018) 1.0x for CIFAR: stage widths (116, 232, 464), a
1024-wide last conv, a 1x1 stem without max pooling, as in the CIFAR-100 distillation
papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .shufflenetv1 import channel_shuffle


def conv_bn(in_channels, out_channels, kernel, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicUnit(nn.Module):
    """Split channels in half; transform one half; concatenate; shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = conv_bn(half, half, 1)
        self.conv2 = conv_bn(half, half, 3, groups=half)
        self.conv3 = conv_bn(half, half, 1)

    def forward(self, x):
        keep, change = x.chunk(2, dim=1)
        change = F.relu(self.conv3(self.conv2(F.relu(self.conv1(change)))))
        return channel_shuffle(torch.cat([keep, change], 1), 2)


class DownUnit(nn.Module):
    """Both branches stride 2; output channels doubled by concatenation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.left = nn.ModuleList([conv_bn(in_channels, in_channels, 3, 2, groups=in_channels), conv_bn(in_channels, half, 1)])
        self.right = nn.ModuleList([conv_bn(in_channels, half, 1), conv_bn(half, half, 3, 2, groups=half), conv_bn(half, half, 1)])

    def forward(self, x):
        left = F.relu(self.left[1](self.left[0](x)))
        right = F.relu(self.right[2](self.right[1](F.relu(self.right[0](x)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, widths=(116, 232, 464), units=(3, 7, 3), last_channels: int = 1024):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 24, 1), nn.ReLU(inplace=True))
        layers, channels = [], 24
        for width, count in zip(widths, units):
            layers.append(DownUnit(channels, width))
            layers += [BasicUnit(width) for _ in range(count)]
            channels = width
        layers += [conv_bn(channels, last_channels, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))
