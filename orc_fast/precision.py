"""Mixed precision for the trainer: ``--precision fp32|bf16|fp16|auto`` (docs/design.md §5).

The members' (and the pivot's) forwards run under ``torch.autocast`` in bf16 or fp16; their
logits reach the loss in that dtype and the loss itself is fp32 (the group-KD op reads low
precision logits and accumulates in fp32). Backward and the SGD steps run outside autocast
on the fp32 master weights.

fp16 needs loss scaling. ``LossScaler`` is one dynamic scale for the whole group, kept on
the device and never read by the host: the loss is multiplied by the scale before
backward, the gradients are unscaled in place with a device flag of "some gradient is not
finite" (``torch._amp_foreach_non_finite_check_and_unscale_``, what ``torch.amp.GradScaler``
uses), and the update is a masked SGD step that applies nothing when the flag is set, so a
step with inf/NaN gradients changes no weight and no momentum. The scale halves on such a
step and doubles after ``growth_interval`` finite ones (``torch._amp_update_scale_``).
``torch.amp.GradScaler`` itself reads the flag on the host in ``step()`` and steps
optimizers, not the stacked tensors of the fused strategy, so it fits neither rule.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo's flags: the CPUs where oneDNN runs bf16
    convolutions and matmuls natively (elsewhere bf16 is emulated and slower than fp32)."""
    return bool(cpu_flags(cpuinfo) & {"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return flags


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """(fp32|bf16|fp16, why): ``auto`` becomes bf16 on CUDA sm_80+ and on CPUs with AMX or
    AVX512-BF16, fp32 elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    if name != "auto":
        return name, "asked for"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"auto: CUDA sm_{major}{minor} runs bf16 natively; --precision fp32 for full precision"
        return "fp32", f"auto: CUDA sm_{major}{minor} has no fast bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16", "auto: this CPU has AMX/AVX512-BF16; --precision fp32 for full precision"
    return "fp32", f"auto: no fast bf16 on {device.type}"


def autocast(precision: str, device: torch.device):
    """The context the forwards run in: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16, on the device, without host reads (module docstring)."""

    def __init__(self, device, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale(self, params) -> torch.Tensor:
        """Divide every gradient of ``params`` by the scale, in place; the device flag [] (1.0:
        some gradient is inf/NaN, so this step must not apply)."""
        self.found_inf = torch.zeros_like(self.found_inf)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())
        return self.found_inf

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.cpu(), "growth_tracker": self.growth_tracker.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"].to(self.scale.device, torch.float32)
        self.growth_tracker = state["growth_tracker"].to(self.growth_tracker.device, torch.int32)


def default_channels_last(device: torch.device, precision: str) -> bool:
    """``--channels-last``'s default, where it measured faster (benchmarks/results/precision_cpu_*):
    on CUDA, and on a CPU for fp32 and bf16 (on an AMD EPYC Zen 4 with AVX512-BF16 it is 1.4x
    in fp32 and 1.2x in bf16; on a Zen 3 without bf16 hardware 1.17x and 1.5x). fp16 on a CPU
    is emulated and was not measured, so it keeps the contiguous format."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and precision in ("fp32", "bf16")


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
