"""Training throughput of one full group step, every strategy, with and without compile,
and every precision x memory format (``test_precision_step``).

One step = forward of every member, the ORC losses (one group_kd call), backward, every
member's SGD step, on a CIFAR-100-shaped batch (128 x 3 x 32 x 32, 100 classes). Groups:
4 x resnet32, and 4 x mixed (resnet32, resnet20, wrn_16_2, vgg8). CPU rows always; CUDA
rows when a GPU is present. The data share is the time of the trainer's on-device batch
(gather, random crop + flip, normalise; orc_fast/data.py) over data + step time.

    .venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only \\
        --benchmark-columns=median,iqr,rounds -p no:cacheprovider [-k cpu | -k cuda]

The variants of one group are timed round-robin (see ``test_group_step``). The table at the
end gives images/s and the ratio to sequential eager *in the same rounds*, from each
variant's fastest round (robust to a shared machine's load spikes; medians shown too);
timings from different runs or machines are not comparable (docs/design.md §7).
``ORC_FAST_BENCH_TABLE=file.md`` also writes it to a file. ``auto`` is timed after its own
measurement steps (those run untimed first, like a warm-up), with the strategy it chose.
``ORC_FAST_BENCH_WARMUP_BUDGET_S=N`` caps the build + warm-up time of one group: once N
seconds are spent, its remaining compiled variants are skipped (named under the table).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from table_report import show_table

from orc_fast.data import DeviceDataset
from orc_fast.group_step import GroupStep, StepConfig
from orc_fast.models import build_model

BATCH, CLASSES, SIZE = 128, 100, 32
GROUPS = {
    "4 x resnet32": ["resnet32"] * 4,
    "4 x mixed": ["resnet32", "resnet20", "wrn_16_2", "vgg8"],
}
STRATEGIES = ["sequential", "streams", "fused", "auto"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The trainer's default on CPU: half the cores (ORC_FAST_BENCH_THREADS overrides).
CPU_THREADS = int(os.environ.get("ORC_FAST_BENCH_THREADS", 0)) or max(1, (os.cpu_count() or 2) // 2)

# (device, group, strategy, flag) -> (fastest step s, median step s, strategy that ran, auto's own timings)
RESULTS: dict = {}
DATA_SECONDS: dict = {}
# Compile warm-ups dominate a run; a time-boxed run (benchmarks/gpu_check.sh) caps them so
# the eager and CUDA-graph rows of every strategy still get timed. Unset: no cap.
WARMUP_BUDGET_S = float(os.environ.get("ORC_FAST_BENCH_WARMUP_BUDGET_S", "inf"))
SKIPPED: dict = {}  # (device, group) -> variants skipped for the warm-up budget


def synthetic_cifar100(device, images: int = 2048) -> DeviceDataset:
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (images, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (images,), generator=generator)
    return DeviceDataset(
        name="synthetic-cifar100", classes=[str(c) for c in range(CLASSES)], train_images=train, train_labels=labels,
        test_images=train[:256], test_labels=labels[:256], val_images=train[:0], val_labels=labels[:0],
        mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25),
        flip=True,
    ).to(device)


def endless_batches(dataset, device):
    generator = torch.Generator(device=device).manual_seed(0)
    while True:
        yield from dataset.train_batches(BATCH, generator, augment_images=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_group_step(device, archs, strategy, compile, precision="fp32", channels_last=False):
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    models = [build_model(arch, CLASSES).to(device, memory_format=layout) for arch in archs]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in models]
    config = StepConfig(method="orc", teacher_size=len(archs) // 2, strategy=strategy, compile=compile,
                        precision=precision)
    return GroupStep(models, optimizers, config, device, torch.Generator(device=device).manual_seed(0))


# The trainer's default group, every precision x memory format (fp16 only on CUDA: CPUs
# emulate fp16 convolutions, 10x+ slower than fp32).
PRECISION_GROUP = ["resnet8"] * 4
PRECISION_RESULTS: dict = {}  # (device, precision, channels_last) -> (fastest s, median s)


def precision_variants(device):
    precisions = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
    return [(p, cl) for p in precisions for cl in (False, True)]


@pytest.mark.parametrize("device", DEVICES)
def test_precision_step(benchmark, device):
    """4 x resnet8 (the trainer's default group), sequential eager, each precision x memory
    format, timed round-robin like ``test_group_step``; ratios to fp32 NCHW of the same rounds."""
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    batches = endless_batches(synthetic_cifar100(device), device)
    x, y = next(batches)
    steps = {}
    for precision, channels_last in precision_variants(device):
        step = make_group_step(device, PRECISION_GROUP, "sequential", False, precision, channels_last)
        images = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for _ in range(2):
            step(images, y)
        steps[(precision, channels_last)] = (step, images)
    sync(device)
    times = {key: [] for key in steps}
    iterations = 1 if device == "cpu" else 10

    def one_round():
        for key, (step, images) in steps.items():
            sync(device)
            started = time.perf_counter()
            for _ in range(iterations):
                step(images, y)
            sync(device)
            times[key].append((time.perf_counter() - started) / iterations)

    benchmark.pedantic(one_round, rounds=6 if device == "cpu" else 10, iterations=1, warmup_rounds=1)
    for key in steps:
        samples = times[key][1:]
        PRECISION_RESULTS[(device, *key)] = (min(samples), statistics.median(samples))


@pytest.fixture(scope="module", autouse=True)
def table(request):
    yield
    text = results_table()
    if not text:
        return
    show_table(request, "group training step: images/s, ratio to sequential eager (same run)", text)


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


def variants(device):
    """(strategy, flag) pairs timed on ``device``; flag is eager, compile, graphs, graphs+compile."""
    flags = ["eager", "compile"] + (["graphs", "graphs+compile"] if device == "cuda" else [])
    return [(strategy, flag) for strategy in STRATEGIES for flag in flags]


def build_variant(device, archs, strategy, flag):
    """(callable step, GroupStep): the step warmed up, auto decided, a CUDA graph captured."""
    from orc_fast.cuda_graphs import CudaGraphStep

    group_step = make_group_step(device, archs, strategy, compile="compile" in flag)
    step = CudaGraphStep(group_step) if "graphs" in flag else group_step
    return step, group_step


def warm_up(step, group_step, batches, minimum: int):
    # Compile, allocator, cuDNN autotuning, auto's own measurement steps (it keeps its
    # choice afterwards) and the CUDA-graph capture all happen here, untimed.
    done = 0
    while done < minimum or not group_step.strategy.ready or getattr(step, "graph", True) is None:
        step(*next(batches))
        done += 1


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("device", DEVICES)
def test_group_step(benchmark, device, group):
    """Every strategy x compile (x CUDA graphs) of one group, timed round-robin.

    Each benchmark round runs every variant once (CUDA: 10 steps) and times each on its
    own; interleaving makes a change of machine load hit every variant alike, so the
    ratios to sequential eager hold on a shared machine. pytest-benchmark's figure is the
    whole round; the per-variant times go to the table and to extra_info.
    """
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    batches = endless_batches(synthetic_cifar100(device), device)
    steps = {}
    started = time.perf_counter()
    for strategy, flag in variants(device):
        if "compile" in flag and time.perf_counter() - started >= WARMUP_BUDGET_S:
            SKIPPED.setdefault((device, group), []).append(f"{strategy}/{flag}")
            continue
        step, group_step = build_variant(device, GROUPS[group], strategy, flag)
        warm_up(step, group_step, batches, minimum=1 if flag == "eager" and device == "cpu" else 3)
        steps[(strategy, flag)] = (step, group_step)
    sync(device)
    x, y = next(batches)
    iterations = 1 if device == "cpu" else 10
    times = {key: [] for key in steps}

    def one_round():
        for key, (step, _) in steps.items():
            sync(device)
            started = time.perf_counter()
            for _ in range(iterations):
                step(x, y)
            sync(device)
            times[key].append((time.perf_counter() - started) / iterations)

    benchmark.pedantic(one_round, rounds=5 if device == "cpu" else 10, iterations=1, warmup_rounds=1)
    for (strategy, flag), (_, group_step) in steps.items():
        samples = times[(strategy, flag)][1:]  # the warm-up round is not counted
        RESULTS[(device, group, strategy, flag)] = (min(samples), statistics.median(samples), group_step.strategy.chosen,
                                                    getattr(group_step.strategy, "measured", {}))
    benchmark.extra_info.update({f"{s}/{f}": RESULTS[(device, group, s, f)][0] for s, f in steps})


def precision_table() -> list[str]:
    if not PRECISION_RESULTS:
        return []
    lines = ["", f"precision x memory format: {' x '.join(PRECISION_GROUP)}, sequential eager, batch {BATCH}",
             "", "| device | precision | memory format | step ms (fastest) | step ms (median) | images/s | vs fp32 NCHW |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for (device, precision, channels_last), (fastest, median) in PRECISION_RESULTS.items():
        baseline = PRECISION_RESULTS[(device, "fp32", False)][0]
        lines.append(f"| {device} | {precision} | {'channels-last' if channels_last else 'NCHW'} | {fastest * 1e3:.1f} | "
                     f"{median * 1e3:.1f} | {BATCH / fastest:.0f} | {baseline / fastest:.2f}x |")
    return lines


def results_table() -> str:
    if not RESULTS:
        return "\n".join(precision_table()).strip()
    lines = [
        "| device | group | strategy | compile / graphs | ran | step ms (fastest) | step ms (median) | images/s "
        "| vs sequential eager | data share |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    auto_lines = []
    for (device, group, strategy, flag), (fastest, median, ran, measured) in RESULTS.items():
        baseline = RESULTS[(device, group, "sequential", "eager")]
        data = DATA_SECONDS.get(device)
        share = f"{100 * data / (data + fastest):.1f}%" if data else "n/a"
        lines.append(
            f"| {device} | {group} | {strategy} | {flag} | {ran} | {fastest * 1e3:.1f} | {median * 1e3:.1f} | "
            f"{BATCH / fastest:.0f} | {baseline[0] / fastest:.2f}x | {share} |"
        )
        if strategy == "auto":
            own = ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in measured.items()) or \
                "nothing to measure: only sequential applies"
            auto_lines.append(f"| {device} | {group} | {flag} | {ran} | {own} | {baseline[0] / fastest:.2f}x / "
                              f"{baseline[1] / median:.2f}x |")
    lines += ["", "auto: what it measured on its first steps (best step, ms) and what it chose",
              "", "| device | group | compile / graphs | chose | measured | vs sequential eager (fastest / median) |",
              "| --- | --- | --- | --- | --- | ---: |", *auto_lines]
    for (device, group), names in SKIPPED.items():
        lines += ["", f"skipped on {device}, {group} (warm-up budget ORC_FAST_BENCH_WARMUP_BUDGET_S="
                  f"{WARMUP_BUDGET_S:g} s spent): {', '.join(names)}"]
    if DATA_SECONDS:
        lines.append("")
        lines.append("data batch (gather + crop/flip + normalise, 128 images): " + ", ".join(
            f"{device} {seconds * 1e3:.2f} ms" for device, seconds in DATA_SECONDS.items()))
    return "\n".join(lines + precision_table())


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
