"""What the loss benchmarks time, as data: shapes, backends per device, and one step.

A step is forward + backward of docs/design.md §3's loss with reduction "mean" on
fresh-looking inputs (S students, G teachers, batch B, C classes, fp32 by default):

* ``reference-eager``: orc_fast.reference.group_kd_math + the mean, plain PyTorch autograd.
* ``reference-compiled``: the same plain-torch function through torch.compile (the
  custom ops are opaque to the compiler, so the compiled baseline is the math itself).
* any concrete orc_fast backend (``cpu``, ``reference`` op, ``triton``, ``cuda``):
  ``GroupKDLoss(backend=...)``.

bench_loss.py (CPU) and bench_loss_gpu.py (CUDA) parametrize over these; conftest.py
prints every timed case as a table with its ratio to reference-eager in the same run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import orc_fast
from orc_fast import GroupKDLoss
from orc_fast.reference import group_kd_math

TEMPERATURE = 4.0
ALPHA = 0.9
IGNORE_INDEX = -100

BASELINE = "reference-eager"
PLAIN_TORCH_BACKENDS = ("reference-eager", "reference-compiled")


@dataclass(frozen=True)
class Case:
    students: int
    teachers: int
    batch: int
    classes: int
    rounds: int  # timed rounds per backend; small for the large shapes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.students, self.teachers, self.batch, self.classes)

    @property
    def label(self) -> str:
        return "S{}-G{}-B{}-C{}".format(*self.shape)


CPU_CASES = (
    Case(2, 2, 128, 100, rounds=200),
    Case(2, 2, 256, 1000, rounds=50),
    Case(2, 2, 1024, 32000, rounds=5),
    Case(1, 1, 4096, 32000, rounds=5),
)


def backends_for(device: str) -> list[str]:
    """The baselines plus every orc_fast backend that runs on ``device`` here.

    The orc_fast ``reference`` op is left out: it is the eager math with a closed-form
    gradient, and the two plain-torch baselines already bracket it.
    """
    fused = [b for b in orc_fast.available_backends(device) if b != "reference"]
    if device == "cpu":
        fused = [b for b in fused if b != "triton"]  # interpreted Triton is no benchmark
    return [*PLAIN_TORCH_BACKENDS, *fused]


def make_inputs(case: Case, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.classes)
    student = (torch.randn((case.students, *shape), generator=generator) * 3).to(device=device, dtype=dtype)
    teachers = (torch.randn((case.teachers, *shape), generator=generator) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, case.classes, (case.batch,), generator=generator).to(device)
    return student.requires_grad_(True), teachers, target


def _plain_torch_loss(student, teachers, target, weights, alpha, members):
    loss = group_kd_math(student, teachers, target, weights, alpha, members, TEMPERATURE, IGNORE_INDEX, 0)[0]
    return loss.sum() / (target != IGNORE_INDEX).sum()


@functools.cache
def _compiled_plain_torch_loss():
    return torch.compile(_plain_torch_loss, dynamic=False)


def make_step(backend: str, student, teachers, target):
    """A zero-argument callable running one forward + backward; grads are reset each call."""
    if backend in PLAIN_TORCH_BACKENDS:
        num_students, num_teachers = student.shape[0], teachers.shape[0]
        weights = torch.full((num_teachers,), 1.0 / num_teachers, device=student.device)
        alpha = torch.full((num_students,), ALPHA, device=student.device)
        members = torch.ones(num_students, device=student.device)
        loss_fn = _compiled_plain_torch_loss() if backend == "reference-compiled" else _plain_torch_loss

        def step():
            student.grad = None
            loss_fn(student, teachers, target, weights, alpha, members).backward()
    else:
        criterion = GroupKDLoss(temperature=TEMPERATURE, alpha=ALPHA, reduction="mean", backend=backend)

        def step():
            student.grad = None
            criterion(student, teachers, target).backward()

    if student.device.type == "cuda":
        def synced_step(inner=step):
            inner()
            torch.cuda.synchronize()

        return synced_step
    return step


# Filled by the benchmarks, printed by conftest.py at the end of the session:
# (device, case label, backend) -> (median seconds, fastest round seconds).
RESULTS: dict[tuple[str, str, str], tuple[float, float]] = {}


def run_case(benchmark, device: str, case: Case, backend: str, dtype: torch.dtype = torch.float32):
    student, teachers, target = make_inputs(case, device, dtype)
    step = make_step(backend, student, teachers, target)
    benchmark.group = f"{device} {case.label}"
    benchmark.extra_info.update(device=device, shape=case.shape, backend=backend, dtype=str(dtype))
    # Warm-up compiles (torch.compile) and faults in the allocator's pages; not timed.
    benchmark.pedantic(step, rounds=case.rounds, iterations=1, warmup_rounds=2 if case.rounds < 10 else 5)
    RESULTS[(device, case.label, backend)] = (benchmark.stats.stats.median, benchmark.stats.stats.min)


def results_table() -> str:
    """Median (and fastest) times per case and backend, with the median's ratio to both baselines."""
    if not RESULTS:
        return ""
    lines = [
        "| device | shape (S, G, B, C) | backend | median ms | min ms | speed-up vs reference-eager "
        "| speed-up vs reference-compiled |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    cases = list(dict.fromkeys((device, label) for device, label, _ in RESULTS))
    for device, label in cases:
        eager = RESULTS.get((device, label, BASELINE), (None,))[0]
        compiled = RESULTS.get((device, label, "reference-compiled"), (None,))[0]
        for (row_device, row_label, backend), (median, fastest) in RESULTS.items():
            if (row_device, row_label) != (device, label):
                continue
            versus_eager = f"{eager / median:.2f}x" if eager else "n/a"
            versus_compiled = f"{compiled / median:.2f}x" if compiled else "n/a"
            lines.append(f"| {device} | {label} | {backend} | {median * 1e3:.3f} | {fastest * 1e3:.3f} "
                         f"| {versus_eager} | {versus_compiled} |")
    return "\n".join(lines)
