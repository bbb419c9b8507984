"""The group-KD loss on a CUDA GPU: every backend, achieved bandwidth, peak memory.

Run on a GPU machine (skipped without CUDA):

    TRITON_INTERPRET=0 python -m pytest benchmarks/bench_loss_gpu.py --benchmark-only

Rows per shape (S, G, B, C):

* ``reference-eager`` / ``reference-compiled``: orc_fast.reference.group_kd_math + the
  mean, plain PyTorch autograd, eager and through torch.compile;
* ``triton`` / ``cuda``: the fused backends through the public ``group_kd`` (``validate``
  off: no host sync, as inside a compiled training step); ``cuda-rows`` is the CUDA
  backend with its sm_90 cluster kernel off (ORC_FAST_CUDA_SPLIT=0: one block a row);
* ``liger-kl`` / ``liger-kd`` where S = G = 1 and liger-kernel is installed:
  ``LigerKLDIVLoss`` alone on log-probabilities and probabilities made beforehand (less
  work than ours), and the whole Hinton KD loss from logits with Liger's cross entropy
  and KL (torch softmaxes in between).

Times are medians from ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
run), forward + backward. The fused backends' forward op alone is also timed and turned
into GB/s under docs/design.md §4's byte model (read (G + S)·B·C·e, write S·B·C·e),
next to the card's device-to-device copy bandwidth measured in the same run (bytes read +
written). Peak memory is torch.cuda.max_memory_allocated over one step, less what the
inputs already held. The table is printed at the end and written to
benchmarks/results/gpu_loss_<card>.{json,md}. ``ORC_FAST_BENCH_COMPILE_BUDGET_S=N`` skips
the remaining reference-compiled rows once their compile warm-ups have taken N seconds.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the GPU loss benchmark needs a CUDA GPU", allow_module_level=True)

# The loss benchmarks' shared module (conftest.py imports it too): the loss's constants,
# the plain-torch baselines both benchmarks time, and the summary table's results.
from loss_cases import ALPHA, IGNORE_INDEX, TEMPERATURE, _compiled_plain_torch_loss, _plain_torch_loss  # noqa: E402
from loss_cases import RESULTS as SHARED_RESULTS  # noqa: E402

import orc_fast  # noqa: E402
from orc_fast import group_kd  # noqa: E402
from orc_fast.backends import op_for, unavailable_reason  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (S, G, B, C, dtype)
SHAPES = [
    (2, 2, 128, 100, torch.float32),
    (2, 2, 256, 1000, torch.float32),
    (1, 4, 8192, 32000, torch.bfloat16),
    (1, 4, 8192, 128256, torch.bfloat16),
    (1, 1, 16384, 131072, torch.float32),
]
BACKENDS = ["reference-eager", "reference-compiled", "triton", "cuda", "cuda-rows", "liger-kl", "liger-kd"]
# Seconds of torch.compile warm-up (reference-compiled, one compile per shape) allowed in
# one run; once spent, the remaining reference-compiled rows are skipped, so a time-boxed
# run (benchmarks/gpu_check.sh) still reaches the fused backends' rows. Unset: no cap.
COMPILE_BUDGET_S = float(os.environ.get("ORC_FAST_BENCH_COMPILE_BUDGET_S", "inf"))
COMPILE_SPENT_S = [0.0]

ROWS: list[dict] = []  # one per (shape, backend), in run order
CONTEXT: dict = {}


def _label(shape) -> str:
    S, G, B, C, dtype = shape
    return f"S{S}-G{G}-B{B}-C{C}-{str(dtype).replace('torch.', '')}"


def _median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


@functools.cache
def copy_bandwidth_gbs() -> float:
    """The card's device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    destination = torch.empty_like(source)
    ms = _median_ms(functools.partial(destination.copy_, source))
    del source, destination
    torch.cuda.empty_cache()
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def _model_bytes(shape) -> int:
    S, G, B, C, dtype = shape
    element = torch.empty((), dtype=dtype).element_size()
    return (G + S) * B * C * element + S * B * C * element


def _inputs(shape, seed=0):
    S, G, B, C, dtype = shape
    generator = torch.Generator(device="cuda").manual_seed(seed)
    student = (torch.randn((S, B, C), generator=generator, device="cuda") * 3).to(dtype)
    teachers = (torch.randn((G, B, C), generator=generator, device="cuda") * 3).to(dtype)
    target = torch.randint(0, C, (B,), generator=generator, device="cuda")
    return student.requires_grad_(True), teachers, target


def _liger_available() -> str | None:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install --no-deps liger-kernel)"
    return None


def _make_step(backend: str, student, teachers, target):
    """(forward + backward step, forward-only op call or None)."""
    S, G = student.shape[0], teachers.shape[0]
    if backend in ("reference-eager", "reference-compiled"):
        weights = torch.full((G,), 1.0 / G, device="cuda")
        alpha = torch.full((S,), ALPHA, device="cuda")
        members = torch.ones(S, device="cuda")
        loss_fn = _compiled_plain_torch_loss() if backend == "reference-compiled" else _plain_torch_loss

        def step():
            student.grad = None
            loss_fn(student, teachers, target, weights, alpha, members).backward()

        return step, None
    if backend in ("triton", "cuda"):
        def step():
            student.grad = None
            group_kd(student, teachers, target, temperature=TEMPERATURE, alpha=ALPHA, backend=backend,
                     validate=False).loss.backward()

        op = op_for(backend)
        args = (student.detach(), teachers, target, torch.full((G,), 1.0 / G, device="cuda"),
                torch.full((S,), ALPHA, device="cuda"), torch.ones(S, device="cuda"), TEMPERATURE, IGNORE_INDEX, 0)
        return step, (lambda: op(*args))
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl_loss = LigerKLDIVLoss(reduction="batchmean")
    if backend == "liger-kl":
        # The KL alone, on inputs made outside the timed step: less work than the fused loss.
        log_q = torch.log_softmax(student.detach().float() / TEMPERATURE, -1).to(student.dtype).requires_grad_(True)
        p = torch.softmax(teachers[0].float() / TEMPERATURE, -1).to(student.dtype)

        def step():
            log_q.grad = None
            kl_loss(log_q.view(-1, log_q.shape[-1]), p.view(-1, p.shape[-1])).backward()

        return step, None
    ce_loss = LigerCrossEntropyLoss()

    def step():  # the whole Hinton KD loss from logits
        student.grad = None
        logits = student[0]
        log_q = torch.log_softmax(logits.float() / TEMPERATURE, -1)
        p = torch.softmax(teachers[0].float() / TEMPERATURE, -1)
        loss = (1 - ALPHA) * ce_loss(logits, target) + ALPHA * TEMPERATURE**2 * kl_loss(log_q, p)
        loss.backward()

    return step, None


def _skip_reason(backend: str, shape) -> str | None:
    if backend == "cuda-rows":
        if shape[3] < 32000:
            return "the same kernel as cuda below LLM vocabularies"
        return unavailable_reason("cuda", torch.device("cuda"))
    if backend in ("triton", "cuda"):
        return unavailable_reason(backend, torch.device("cuda"))
    if backend.startswith("liger"):
        if shape[0] != 1 or shape[1] != 1:
            return "Liger's KL is comparable only for S = G = 1"
        return _liger_available()
    return None


def _write_results(terminal):
    if not ROWS:
        return
    card = torch.cuda.get_device_name()
    lines = [
        f"GPU: {card}; measured device-to-device copy bandwidth {CONTEXT['copy_gbs']:.0f} GB/s (read + write)",
        "",
        "| shape | backend | fwd+bwd ms | vs eager | vs compiled | fwd op ms | fwd GB/s (model) | % of copy | peak extra GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in ROWS:
        base = {r["backend"]: r for r in ROWS if r["shape"] == row["shape"]}

        def ratio(name, row=row, base=base):
            other = base.get(name, {}).get("step_ms")
            return f"{other / row['step_ms']:.2f}x" if other and row.get("step_ms") else "n/a"

        if row.get("step_ms") is None:
            lines.append(f"| {row['shape']} | {row['backend']} | {row.get('error', 'n/a')} | | | | | | |")
            continue
        fwd = f"{row['op_ms']:.3f}" if row.get("op_ms") else ""
        gbs = f"{row['op_gbs']:.0f}" if row.get("op_gbs") else ""
        pct = f"{100 * row['op_gbs'] / CONTEXT['copy_gbs']:.0f}%" if row.get("op_gbs") else ""
        lines.append(
            f"| {row['shape']} | {row['backend']} | {row['step_ms']:.3f} | {ratio('reference-eager')} "
            f"| {ratio('reference-compiled')} | {fwd} | {gbs} | {pct} | {row['peak_extra_gib']:.2f} |"
        )
    for shape, timings in CONTEXT.get("triton_sweep", {}).items():
        lines += ["", f"Triton tile sweep, forward op, {shape}:"]
        lines += [f"- {name}: {value}" for name, value in timings.items()]
    table = "\n".join(lines)
    if terminal is not None:
        terminal.write_sep("=", "group-KD loss on the GPU (median, CUDA events)")
        terminal.write_line(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = os.path.join(RESULTS_DIR, "gpu_loss_" + re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_"))
    meta = dict(card=card, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                orc_fast=orc_fast.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), **CONTEXT)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(stem + ".json", "w") as handle:
        json.dump(dict(meta=meta, rows=ROWS), handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(f"# group-KD loss on {card}\n\n{table}\n\n"
                     f"torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta.get('triton')}, {meta['date']}.\n")


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    CONTEXT["copy_gbs"] = copy_bandwidth_gbs()
    yield
    _write_results(request.config.pluginmanager.get_plugin("terminalreporter"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_label)
def test_loss_gpu(benchmark, monkeypatch, shape, backend):
    reason = _skip_reason(backend, shape)
    if reason:
        pytest.skip(reason)
    if backend == "reference-compiled" and COMPILE_SPENT_S[0] >= COMPILE_BUDGET_S:
        pytest.skip(f"compile warm-up budget spent ({COMPILE_SPENT_S[0]:.0f} s of ORC_FAST_BENCH_COMPILE_BUDGET_S)")
    if backend == "cuda-rows":
        monkeypatch.setenv("ORC_FAST_CUDA_SPLIT", "0")
    torch.cuda.empty_cache()
    row = dict(shape=_label(shape), backend=backend, model_bytes=_model_bytes(shape))
    ROWS.append(row)
    try:
        student, teachers, target = _inputs(shape)
        step, forward_op = _make_step("cuda" if backend == "cuda-rows" else backend, student, teachers, target)
        started = time.perf_counter()
        step()  # compile / autotune / first-touch, not timed
        torch.cuda.synchronize()
        if backend == "reference-compiled":
            COMPILE_SPENT_S[0] += time.perf_counter() - started
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
        row["step_ms"] = _median_ms(step)
        if forward_op is not None:
            row["op_ms"] = _median_ms(forward_op)
            row["op_gbs"] = row["model_bytes"] / (row["op_ms"] * 1e-3) / 1e9
    except torch.OutOfMemoryError as error:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(error)[:200]}")
    SHARED_RESULTS[("cuda", row["shape"], backend)] = row["step_ms"] * 1e-3

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"cuda {row['shape']}"
    benchmark.extra_info.update(row)
    rounds = 20 if row["step_ms"] < 50 else 3
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)


# Tile sweep of the Triton kernel on the large shapes: which block_c / num_warps to pick.
SWEEP = [dict(block_c=b, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] >= 32000], ids=_label)
def test_triton_tile_sweep(benchmark, shape):
    reason = unavailable_reason("triton", torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    from orc_fast.kernels.group_kd import group_kd_triton_launch, launch_config

    S, G, B, C, dtype = shape
    student, teachers, target = _inputs(shape)
    args = (student.detach(), teachers, target, torch.full((G,), 1.0 / G, device="cuda"),
            torch.full((S,), ALPHA, device="cuda"), torch.ones(S, device="cuda"), TEMPERATURE, IGNORE_INDEX, 0)
    timings = {"heuristic " + str(launch_config(S, G, B, C, student.element_size())):
               _median_ms(lambda: group_kd_triton_launch(*args))}
    for tiles in SWEEP:
        try:
            timings[str(tiles)] = _median_ms(lambda tiles=tiles: group_kd_triton_launch(*args, **tiles))
        except Exception as error:  # noqa: BLE001 - a tile that does not compile is a result too
            timings[str(tiles)] = f"failed: {type(error).__name__}"
    CONTEXT.setdefault("triton_sweep", {})[_label(shape)] = {
        name: (f"{ms:.3f} ms, {_model_bytes(shape) / (ms * 1e-3) / 1e9:.0f} GB/s" if isinstance(ms, float) else ms)
        for name, ms in timings.items()
    }
    benchmark.extra_info.update(CONTEXT["triton_sweep"][_label(shape)])
    benchmark.pedantic(lambda: (group_kd_triton_launch(*args), torch.cuda.synchronize()), rounds=3, iterations=1)
