"""Which group-KD backends exist here, and which one a call uses (docs/design.md §4).

``auto`` picks triton on CUDA tensors (cuda if Triton is missing), cpu on CPU tensors,
and reference wherever the compiled extension is not built. ``ORC_FAST_BACKEND``
overrides ``auto``.
"""

from __future__ import annotations

import os

import torch

from .ops import EXTENSION_MISSING, group_kd_fused_op, group_kd_reference_op

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# Backends whose kernels compute in fp32 and have no float64 path.
FP32_ONLY_BACKENDS = ("triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not built, or cannot run on the tensors' device."""


def _load_triton() -> str | None:
    if not (triton_interpreted() or torch.cuda.is_available()):
        return "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 set before importing orc_fast)"
    try:
        from .kernels import group_kd_triton  # noqa: F401  (registers orc_fast::group_kd_triton)
    except ImportError as error:
        return f"Triton kernels are unavailable ({error})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Loaded once, at import: torch.compile may trace the dispatch below, and a first
# registration inside a traced region is not allowed (the ops themselves are registered
# by .ops, the Triton one when its module is imported here).
TRITON_MISSING = _load_triton()
# Which devices the extension has kernels for (the CUDA ones need nvcc at build time).
EXTENSION_DEVICES = frozenset(
    device for device in ("cpu", "cuda")
    if not EXTENSION_MISSING
    and torch._C._dispatch_has_kernel_for_dispatch_key("orc_fast::group_kd_fused", device.upper())
)


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``; None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if EXTENSION_MISSING:
            return EXTENSION_MISSING
        if device.type != backend:
            return f"backend {backend!r} runs on {backend.upper()} tensors, got tensors on {device}"
        if backend not in EXTENSION_DEVICES:
            hint = " (nvcc and a CUDA build of torch are needed at build time)" if backend == "cuda" else ""
            return f"orc_fast._C was built without its {backend.upper()} kernels{hint}"
        return None
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
        return TRITON_MISSING
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_dtype(backend: str, dtype: torch.dtype | None) -> None:
    """float64 logits on a backend that has no float64 math: a ValueError naming it."""
    if dtype == torch.float64 and backend in FP32_ONLY_BACKENDS:
        raise ValueError(
            f"group-KD backend {backend!r} does not take float64 logits (its kernels compute in fp32); "
            "use backend 'reference' (or 'cpu' for CPU tensors), or cast the logits to float32"
        )


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn a backend request into the concrete backend for ``dtype`` logits on ``device``."""
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
            preference = tuple(b for b in preference if not (dtype == torch.float64 and b in FP32_ONLY_BACKENDS))
            return next((b for b in preference if unavailable_reason(b, device) is None), "reference")
    # Before availability: a float64 request is wrong whether or not the backend is built.
    check_dtype(backend, dtype)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"group-KD backend {backend!r} is unavailable: {reason}")
    return backend


def op_for(backend: str, dtype: torch.dtype | None = None):
    """The registered op that implements a concrete backend for ``dtype`` logits.

    float64 on ``cpu`` is the reference op: the C++ kernel computes in fp32, and a float64
    result must not come from fp32 arithmetic; the reference op computes in float64.
    """
    check_dtype(backend, dtype)
    if backend == "reference" or dtype == torch.float64:
        return group_kd_reference_op
    if backend == "triton":
        from .kernels import group_kd_triton

        return group_kd_triton
    return group_kd_fused_op


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
