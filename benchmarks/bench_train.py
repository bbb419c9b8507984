"""Training throughput of one full group step, every strategy, with and without compile (issue 6).

One step = forward of every member, the ORC losses (one group_kd call), backward, every
member's SGD step, on a CIFAR-100-shaped batch (128 x 3 x 32 x 32, 100 classes). Groups:
4 x resnet32, and 4 x mixed (resnet32, resnet20, wrn_16_2, vgg8). CPU rows always; CUDA
rows when a GPU is present. The data share is the time of the trainer's on-device batch
(gather, random crop + flip, normalise; orc_fast/data.py) over data + step time.

    .venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only \\
        --benchmark-columns=median,iqr,rounds -p no:cacheprovider [-k cpu | -k cuda]

The table at the end gives images/s and the ratio to sequential eager *in the same run*
(timings from different runs or machines are not comparable; DESIGN.md section 7).
``ORC_FAST_BENCH_TABLE=file.md`` also writes it to a file. ``auto`` is timed after its
measurement steps (those run untimed first, like a warm-up), with the strategy it chose.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import pytest
import torch

from orc_fast.data import DeviceDataset, train_batches
from orc_fast.models import build_model
from orc_fast.orc import GroupStep, StepConfig

BATCH, CLASSES, SIZE = 128, 100, 32
GROUPS = {
    "4 x resnet32": ["resnet32"] * 4,
    "4 x mixed": ["resnet32", "resnet20", "wrn_16_2", "vgg8"],
}
STRATEGIES = ["sequential", "streams", "fused", "auto"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The trainer's default on CPU: half the cores (ORC_FAST_BENCH_THREADS overrides).
CPU_THREADS = int(os.environ.get("ORC_FAST_BENCH_THREADS", 0)) or max(1, (os.cpu_count() or 2) // 2)

# (device, group, strategy, compile) -> (median step seconds, strategy that ran)
RESULTS: dict = {}
DATA_SECONDS: dict = {}


def synthetic_cifar100(device, images: int = 2048) -> DeviceDataset:
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (images, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (images,), generator=generator)
    return DeviceDataset(
        name="synthetic-cifar100", classes=[str(c) for c in range(CLASSES)], train_images=train, train_labels=labels,
        test_images=train[:256], test_labels=labels[:256], mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25),
        flip=True,
    ).to(device)


def endless_batches(dataset, device):
    generator = torch.Generator(device=device).manual_seed(0)
    while True:
        yield from train_batches(dataset, BATCH, generator, augment_images=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_group_step(device, archs, strategy, compile):
    torch.manual_seed(0)
    models = [build_model(arch, CLASSES).to(device) for arch in archs]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in models]
    config = StepConfig(method="orc", teacher_size=len(archs) // 2, strategy=strategy, compile=compile)
    return GroupStep(models, optimizers, config, device, torch.Generator(device=device).manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def table(request):
    yield
    text = results_table()
    if not text:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_sep("=", "group training step: images/s, ratio to sequential eager (same run)")
            reporter.write_line(text)
    path = os.environ.get("ORC_FAST_BENCH_TABLE")
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")


@pytest.mark.parametrize("device", DEVICES)
def test_data_batch(benchmark, device):
    """The trainer's on-device batch: gather 128 uint8 images, random crop + flip, normalise."""
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    batches = endless_batches(synthetic_cifar100(device), device)

    def one_batch():
        next(batches)
        sync(device)

    benchmark.pedantic(one_batch, rounds=20 if device == "cpu" else 200, iterations=1, warmup_rounds=3)
    DATA_SECONDS[device] = benchmark.stats.stats.median


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("device", DEVICES)
def test_group_step(benchmark, device, group, strategy, compile):
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    batches = endless_batches(synthetic_cifar100(device), device)
    step = make_group_step(device, GROUPS[group], strategy, compile)
    # Warm-up outside the timing: compile, allocator, cuDNN autotuning, and auto's own
    # measurement steps (it keeps its choice afterwards).
    warmup = 2 if compile or device == "cuda" else 1
    while warmup > 0 or not getattr(step.strategy, "ready", True):
        step(*next(batches))
        warmup -= 1
    sync(device)
    iterations = 1 if device == "cpu" else 10
    x, y = next(batches)

    def group_step():
        for _ in range(iterations):
            step(x, y)
        sync(device)

    rounds = 3 if device == "cpu" else 10
    benchmark.pedantic(group_step, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median / iterations
    RESULTS[(device, group, strategy, compile)] = (median, step.strategy.chosen)
    benchmark.extra_info.update(images_per_s=BATCH / median, ran=step.strategy.chosen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("group", GROUPS)
def test_group_step_cuda_graphs(benchmark, group, strategy, compile):
    """The same step captured whole in a CUDA graph (--cuda-graphs)."""
    from orc_fast.strategies import CudaGraphStep

    batches = endless_batches(synthetic_cifar100("cuda"), "cuda")
    group_step = make_group_step("cuda", GROUPS[group], strategy, compile)
    step = CudaGraphStep(group_step)
    while step.graph is None:  # warm-up steps, auto's measurement, then the capture
        step(*next(batches))
    torch.cuda.synchronize()
    x, y = next(batches)

    def replays():
        for _ in range(10):
            step(x, y)
        torch.cuda.synchronize()

    benchmark.pedantic(replays, rounds=10, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median / 10
    RESULTS[("cuda", group, strategy, "graphs+compile" if compile else "graphs")] = (median, group_step.strategy.chosen)


def results_table() -> str:
    if not RESULTS:
        return ""
    lines = [
        "| device | group | strategy | compile / graphs | ran | step ms (median) | images/s | vs sequential eager | data share |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (device, group, strategy, compile), (median, ran) in RESULTS.items():
        baseline = RESULTS.get((device, group, "sequential", False))
        ratio = f"{baseline[0] / median:.2f}x" if baseline else "n/a"
        data = DATA_SECONDS.get(device)
        share = f"{100 * data / (data + median):.1f}%" if data else "n/a"
        lines.append(
            f"| {device} | {group} | {strategy} | {compile if isinstance(compile, str) else ('yes' if compile else 'no')} | {ran} | {median * 1e3:.0f} | "
            f"{BATCH / median:.0f} | {ratio} | {share} |"
        )
    if DATA_SECONDS:
        lines.append("")
        lines.append("data batch (gather + crop/flip + normalise, 128 images): " + ", ".join(
            f"{device} {seconds * 1e3:.2f} ms" for device, seconds in DATA_SECONDS.items()))
    return "\n".join(lines)


if __name__ == "__main__":  # a quick look without pytest: one eager step per strategy on CPU
    batches = endless_batches(synthetic_cifar100("cpu"), "cpu")
    for strategy in STRATEGIES:
        step = make_group_step("cpu", GROUPS["4 x resnet32"], strategy, False)
        while not getattr(step.strategy, "ready", True):
            step(*next(batches))
        times = []
        for _ in range(3):
            started = time.perf_counter()
            step(*next(batches))
            times.append(time.perf_counter() - started)
        print(f"{strategy:10s} {step.strategy.chosen:10s} {statistics.median(times) * 1e3:8.0f} ms")
