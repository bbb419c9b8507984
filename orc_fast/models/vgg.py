"""VGG with batch norm for CIFAR (the distillation papers' variant: no large FC layers).

Five conv stages; 2x2 max pooling between the first four; the last stage runs at 2x2
and is averaged globally into a single 512 -> classes linear layer.
"""

from __future__ import annotations

from torch import nn

from .init import init_weights

STAGES = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    def __init__(self, stages, num_classes: int):
        super().__init__()
        layers, channels = [], 3
        for index, stage in enumerate(stages):
            if index > 0 and index < 4:
                layers.append(nn.MaxPool2d(2, 2))
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, linear="normal")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg(depth: int, num_classes: int) -> VGG:
    return VGG(STAGES[depth], num_classes)
