"""What each method's training step costs, at the CPU protocol's settings
(configs/protocols/cifar10_cpu.yaml: 4 x resnet8 students, a resnet26 pivot, CIFAR-10-shaped
batches of 128, one thread, fp32): images/s of the trainer's whole group step, and the
forward passes each network runs per training image, counted (they do not depend on the
machine).

    .venv/bin/python -m pytest benchmarks/bench_method_cost.py --benchmark-only -p no:cacheprovider -s
    .venv/bin/python benchmarks/bench_method_cost.py [ROUNDS]     # the table alone

The variants are timed round-robin, a few steps each per round, so a change of load hits
them alike; the table gives each one's fastest round (robust to load spikes) and median,
and the ratios to ``kd`` and ``independent`` from the same rounds. ``orc pivot, every member
runs the error batch`` is the step before only the teachers ran it (``sync_free``), kept as
the measured baseline of that change.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from orc_fast.data import DeviceDataset
from orc_fast.group_step import GroupStep, StepConfig
from orc_fast.models import build_model

BATCH, CLASSES, SIZE, MEMBERS = 128, 10, 32, 4
STUDENT, PIVOT = "resnet8", "resnet26"
# name -> (StepConfig settings, pivot: None, "frozen" or "refined")
VARIANTS = {
    "independent": ({"method": "independent"}, None),
    "dml": ({"method": "dml"}, None),
    "kdcl": ({"method": "kdcl"}, None),
    "orc peer": ({"method": "orc"}, None),
    "kd": ({"method": "kd"}, "frozen"),
    "orc pivot": ({"method": "orc"}, "refined"),
    "orc pivot, every member runs the error batch": ({"method": "orc", "sync_free": True}, "refined"),
}


def synthetic_cifar10(images: int = 1024) -> DeviceDataset:
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (images, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (images,), generator=generator)
    return DeviceDataset(name="synthetic-cifar10", classes=[str(c) for c in range(CLASSES)], train_images=train,
                         train_labels=labels, test_images=train[:0], test_labels=labels[:0], val_images=train[:0],
                         val_labels=labels[:0], mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25), flip=True)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def make_step(settings: dict, pivot_kind: str | None) -> tuple[GroupStep, list[int]]:
    """The group step, and a counter of forward calls per network (members, then the pivot)."""
    torch.manual_seed(0)
    models = [build_model(STUDENT, CLASSES).to(memory_format=torch.channels_last) for _ in range(MEMBERS)]
    pivot = pivot_optimizer = None
    if pivot_kind is not None:
        pivot = build_model(PIVOT, CLASSES).to(memory_format=torch.channels_last)
        pivot_optimizer = sgd(pivot) if pivot_kind == "refined" else None
        pivot.train(pivot_optimizer is not None)
    counts = [0] * (MEMBERS + 1)
    for index, network in enumerate([*models, *([pivot] if pivot is not None else [])]):
        network.register_forward_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    step = GroupStep(models, [sgd(m) for m in models], StepConfig(**settings), "cpu",
                     torch.Generator().manual_seed(0), pivot=pivot, pivot_optimizer=pivot_optimizer)
    return step, counts


def measure(rounds: int = 5, steps_per_round: int = 2) -> dict:
    """{variant: (fastest s/step, median s/step, forwards per image per network)} from rounds of
    the variants in turn."""
    torch.set_num_threads(1)
    np.random.seed(0)
    data = synthetic_cifar10()
    generator = torch.Generator().manual_seed(0)
    batches = [(x.contiguous(memory_format=torch.channels_last), y)
               for x, y in data.train_batches(BATCH, generator)]
    built = {name: make_step(*variant) for name, variant in VARIANTS.items()}
    for step, counts in built.values():  # warm-up: allocator, first-call costs
        for images, labels in batches[:2]:
            step(images, labels)
        counts[:] = [0] * len(counts)
    times: dict = {name: [] for name in built}
    calls = dict.fromkeys(built, 0)
    for round_index in range(rounds):
        for name, (step, _) in built.items():
            started = time.perf_counter()
            for i in range(steps_per_round):
                images, labels = batches[(round_index * steps_per_round + i) % len(batches)]
                step(images, labels)
            times[name].append((time.perf_counter() - started) / steps_per_round)
            calls[name] += steps_per_round
    return {name: (min(times[name]), statistics.median(times[name]),
                   [count / calls[name] for count in built[name][1]]) for name in built}


def table(results: dict) -> str:
    kd, independent = results["kd"][0], results["independent"][0]
    lines = ["| method | images/s (fastest round) | median | x kd | x independent | forwards per image: "
             "each student / pivot |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, (fastest, median, forwards) in results.items():
        students = " ".join(f"{f:g}" for f in forwards[:MEMBERS])
        lines.append(f"| {name} | {BATCH / fastest:.0f} | {BATCH / median:.0f} | {kd / fastest:.2f} | "
                     f"{independent / fastest:.2f} | {students} / {forwards[MEMBERS]:g} |")
    return "\n".join(lines)


def test_method_cost(benchmark):
    results = benchmark.pedantic(measure, kwargs={"rounds": 3}, rounds=1, iterations=1)
    print("\n" + table(results))
    assert set(results) == set(VARIANTS)


if __name__ == "__main__":
    print(table(measure(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
