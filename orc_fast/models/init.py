"""The weight initialisation the CIFAR zoo shares (He init for convolutions, unit
batch-norm), with the classifier treatment each family's reference code uses."""

from torch import nn

LINEAR_INITS = ("default", "zero_bias", "normal")


def init_weights(model: nn.Module, linear: str = "default") -> None:
    """Convolutions: Kaiming normal (fan_out), biases 0; batch norm: weight 1, bias 0.
    Linear layers: PyTorch's default, or a zero bias, or N(0, 0.01) weights and a zero bias."""
    if linear not in LINEAR_INITS:
        raise ValueError(f"linear must be one of {LINEAR_INITS}, got {linear!r}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
