"""orc_fast: online group knowledge distillation (ORC) with fused kernels."""

from .backends import BACKENDS, BackendUnavailableError, available_backends
from .loss import GroupKDLoss, GroupKDResult, group_kd
from .reference import ERROR_RULES

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ERROR_RULES",
    "BackendUnavailableError",
    "GroupKDLoss",
    "GroupKDResult",
    "available_backends",
    "group_kd",
]
