"""Which group-KD backends exist here, and which one a call uses (DESIGN.md section 4).

``auto`` picks triton on CUDA tensors (cuda if Triton is missing), cpu on CPU tensors,
and reference wherever the compiled extension is not built. ``ORC_FAST_BACKEND``
overrides ``auto``.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not built, or cannot run on the tensors' device."""


@functools.cache
def _extension_error() -> str | None:
    """Load the C++ extension once; return why it is missing, or None when it loaded."""
    try:
        from . import _C  # noqa: F401  (registers orc_fast::group_kd_fused)
    except ImportError as error:
        return f"the C++ extension orc_fast._C is not built ({error}); reinstall with a C++ compiler present"
    from .ops import register_autograd_and_fake

    register_autograd_and_fake(torch.ops.orc_fast.group_kd_fused.default)
    return None


@functools.cache
def _triton_error() -> str | None:
    try:
        from .kernels import group_kd_triton  # noqa: F401
    except ImportError as error:
        return f"Triton kernels are unavailable ({error})"
    return None


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("orc_fast::group_kd_fused", dispatch_key)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``; None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        missing = _extension_error()
        if missing:
            return missing
        if device.type != backend:
            return f"backend {backend!r} runs on {backend.upper()} tensors, got tensors on {device}"
        if not _has_kernel(backend.upper()):
            hint = " (nvcc and a CUDA build of torch are needed at build time)" if backend == "cuda" else ""
            return f"orc_fast._C was built without its {backend.upper()} kernels{hint}"
        return None
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
        return _triton_error()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a backend request into the concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get("ORC_FAST_BACKEND")
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"ORC_FAST_BACKEND must be one of {BACKENDS}, got {override!r}")
            backend = override
        else:
            preference = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
            return next((b for b in preference if unavailable_reason(b, device) is None), "reference")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"group-KD backend {backend!r} is unavailable: {reason}")
    return backend


def op_for(backend: str):
    """The registered op that implements a concrete backend."""
    if backend == "reference":
        from .ops import group_kd_reference_op

        return group_kd_reference_op
    if backend == "triton":
        from .kernels import group_kd_triton

        return group_kd_triton
    return torch.ops.orc_fast.group_kd_fused.default


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
