"""orc_fast: online group knowledge distillation (ORC) with fused kernels."""

from .backends import BACKENDS, BackendUnavailableError, available_backends
from .fused_linear import FusedLinearGroupKDLoss, fused_linear_group_kd
from .loss import GroupKDLoss, GroupKDResult, group_kd
from .reference import ERROR_RULES

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ERROR_RULES",
    "BackendUnavailableError",
    "FusedLinearGroupKDLoss",
    "GroupKDLoss",
    "GroupKDResult",
    "available_backends",
    "fused_linear_group_kd",
    "group_kd",
]
