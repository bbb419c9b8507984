"""ShuffleNet V1 (Zhang et al. 2018) for CIFAR, groups g = 3, stage widths (240, 480, 960),
(4, 8, 4) units, as in the CIFAR-100 distillation papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        # A downsampling unit concatenates its pooled input, so its branch makes the rest.
        branch = out_channels - in_channels if stride == 2 else out_channels
        mid = branch // 4
        self.first_groups = 1 if in_channels == 24 else groups  # the stem is too narrow to group
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, widths=(240, 480, 960), units=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        layers, channels = [], 24
        for width, count in zip(widths, units):
            for index in range(count):
                layers.append(ShuffleUnit(channels, width, 2 if index == 0 else 1, groups))
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))
