"""Model zoo: ``build_model(name, num_classes)`` and the names it knows.

The CIFAR definitions follow the CIFAR-100 knowledge-distillation literature (CRD, DML,
ORC): parameter counts for 100 classes are in ``PUBLISHED_PARAMS`` and tested. The
ImageNet ResNet18/34 of ORC's ImageNet pair are torchvision's own definitions
(``IMAGENET_PARAMS``, 1000 classes).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn

from .mobilenetv2 import MobileNetV2
from .resnet import WIDE, resnet
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import ShuffleNetV2
from .vgg import vgg
from .wrn import wrn

MODELS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{depth}": partial(resnet, depth) for depth in (8, 14, 20, 26, 32, 44, 56, 110)},
    "resnet8x4": lambda num_classes: resnet(8, num_classes, WIDE),
    "resnet32x4": lambda num_classes: resnet(32, num_classes, WIDE),
    "wrn_16_2": lambda num_classes: wrn(16, 2, num_classes),
    "wrn_40_2": lambda num_classes: wrn(40, 2, num_classes),
    "vgg8": lambda num_classes: vgg(8, num_classes),
    "vgg11": lambda num_classes: vgg(11, num_classes),
    "vgg13": lambda num_classes: vgg(13, num_classes),
    "mobilenetv2": lambda num_classes: MobileNetV2(num_classes),
    "shufflenetv1": lambda num_classes: ShuffleNetV1(num_classes),
    "shufflenetv2": lambda num_classes: ShuffleNetV2(num_classes),
    # ImageNet ResNets (He et al. 2016, torchvision): ORC's ImageNet pair, ResNet34 -> ResNet18.
    "resnet18": lambda num_classes: torchvision.models.resnet18(num_classes=num_classes),
    "resnet34": lambda num_classes: torchvision.models.resnet34(num_classes=num_classes),
}

# Millions of parameters with 100 classes, as published (CRD, Tian et al. 2020, and the
# ResNet/WRN papers); the tests hold build_model to these within rounding.
PUBLISHED_PARAMS = {
    "resnet8": 0.08,
    "resnet20": 0.28,
    "resnet26": 0.38,  # ORC's CIFAR-10 pivot; no published count: the 6n + 2 family at n = 4
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}

# Millions of parameters with 1000 classes (He et al. 2016, Table 3; torchvision's model cards).
IMAGENET_PARAMS = {"resnet18": 11.69, "resnet34": 21.80}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; raises ValueError for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes)


__all__ = ["IMAGENET_PARAMS", "MODELS", "PUBLISHED_PARAMS", "build_model", "model_names"]
