"""Peer benchmark: one Hinton KD job in orc_fast and in torchdistill 1.1.5, images/s as a ratio.

The job, the same on both sides: a resnet56 teacher (frozen, eval mode) -> a resnet20
student (CIFAR ResNets, 0.86 M / 0.27 M parameters on both sides), batch 128, SGD lr 0.1
momentum 0.9 weight decay 5e-4, temperature 4, loss 0.1 CE + 0.9 tau^2 KL, on a fixed
2,000-image class-balanced subset of the CIFAR-10 JPEG ImageFolder
(``/work/shared/data/cifar10`` or ``$ORC_FAST_PEER_DATA``), random crop 32 with 4-pixel
padding and horizontal flip, the same torch thread count, one process each. Measured:
images/s of whole training steps (data, teacher forward, student forward, loss, backward,
SGD step) over the passes after the first (warm-up), each side in its own natural form:

- orc_fast: the real trainer, ``python -m orc_fast.train --method kd --pivot CKPT --arch
  resnet20 --num-nets 1 --dataset imagefolder ...`` as a subprocess; images/s per epoch from
  its metrics.json (epochs after the first). With the trainer's defaults and with
  ``--precision fp32``; where the default (``auto``) runs as fp32 on this processor anyway, the
  two are the same run and only the defaults run (``--both`` runs each). The pivot is a 1-epoch
  resnet56 checkpoint of the same trainer on the same images (accuracy does not matter).
- torchdistill: its ``DistillationBox`` built from ``benchmarks/peer_torchdistill.yaml`` (a
  config in the layout of its own CIFAR-10 KD samples: torchvision ImageFolder + transforms,
  a DataLoader with worker processes, ``torchdistill.models`` resnet56/resnet20, its
  ``KDLoss``), driven by the loop of its example ``examples/torchvision/image_classification.py``
  (``pre_epoch_process``, then per batch ``forward_process`` + ``post_forward_process`` +
  ``loss.item()``, then ``post_epoch_process``), in a subprocess of this file.

The two are run interleaved, A, B, A, B, ... (``--rounds``, at least 3 for the committed
table), so a change of load on a shared machine hits both; the table gives each side's
min / median / max images/s and orc_fast / torchdistill of the medians, mins and maxes.

    .venv/bin/pip install --no-deps -r benchmarks/requirements-peer.txt   # torchdistill, not torch
    .venv/bin/python benchmarks/bench_peer.py            # writes results/peer_torchdistill_<cpu>.md
    .venv/bin/python -m pytest benchmarks/bench_peer.py --benchmark-only -p no:cacheprovider -s

Both skip (pytest) or stop with a message (the script) when torchdistill is not installed
or the CIFAR-10 folder is absent. Work files (the subset tree of symlinks, its decode cache,
the pivot, run folders) go to ``$ORC_FAST_PEER_WORK`` (default: <tmp>/orc_fast_peer); the
pivot and the tree are reused by later runs. ``ORC_FAST_PEER_ROUNDS``,
``ORC_FAST_PEER_EPOCHS``, ``ORC_FAST_PEER_THREADS`` and ``ORC_FAST_PEER_WORKERS`` set the
pytest run's rounds, passes per measurement, torch threads and torchdistill DataLoader
workers; ``ORC_FAST_BENCH_TABLE=file.md`` also writes its table to a file.

Why a subset tree: the trainer always measures the pivot on the test split before training
and evaluates at its last epoch, and CIFAR-10's 10,000 test images through a resnet56 cost
minutes on 2 cores. The benchmark builds ``<work>/data/{train,test}/<class>/`` of symlinks:
train/ holds exactly the 2,000 images ``--train-subset 2000`` picks from the full folder
(orc_fast.data.class_balanced_subset), test/ 10 images per class. Both sides read train/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from table_report import show_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = HERE / "peer_torchdistill.yaml"
DATA_DIR = Path(os.environ.get("ORC_FAST_PEER_DATA", "/work/shared/data/cifar10"))
WORK_DIR = Path(os.environ.get("ORC_FAST_PEER_WORK") or Path(tempfile.gettempdir()) / "orc_fast_peer")
TORCHDISTILL_VERSION = "1.1.5"
IMAGES, BATCH, TEST_PER_CLASS = 2000, 128, 10
STEPS = IMAGES // BATCH  # both sides drop the last partial batch: 15 steps, 1,920 images a pass
CORES = os.cpu_count() or 2
# orc_fast's own CPU default (--threads 0): half the cores. The same count on both sides.
DEFAULT_THREADS = max(1, CORES // 2)
# torchdistill's CIFAR-10 sample configs use 16 DataLoader workers; capped at the cores.
DEFAULT_WORKERS = min(16, CORES)
RESULT_MARK = "PEER_RESULT "


# ============================================================================ what is here


def skip_reason() -> str | None:
    """Why the comparison cannot run here, or None."""
    if importlib.util.find_spec("torchdistill") is None:
        return (f"torchdistill is not installed (pip install --no-deps torchdistill=={TORCHDISTILL_VERSION}, "
                "see benchmarks/requirements-peer.txt)")
    if not (DATA_DIR / "train").is_dir() or not (DATA_DIR / "test").is_dir():
        return f"the CIFAR-10 ImageFolder {DATA_DIR} (train/<class>/*.jpg, test/<class>/*.jpg) is absent"
    return None


def processor() -> dict:
    """model name, family, model and bf16/AMX flags from /proc/cpuinfo, and a file-name slug."""
    info = {"model_name": "unknown", "family": None, "model": None, "flags": set()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and info["model_name"] == "unknown":
                info["model_name"] = value
            elif key == "cpu family" and info["family"] is None:
                info["family"] = int(value)
            elif key == "model" and info["model"] is None:
                info["model"] = int(value)
            elif key == "flags" and not info["flags"]:
                info["flags"] = set(value.split())
    flags = info.pop("flags")
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx"] = sorted(f for f in flags if f.startswith("amx"))
    info["avx512f"] = "avx512f" in flags
    info["cores"] = CORES
    info["core"] = amd_core(info["model_name"], info["family"], info["model"])
    name = info["core"] or re.sub(r"[^a-z0-9]+", "_", info["model_name"].lower()).strip("_")
    info["slug"] = f"{name}_{CORES}core"
    return info


def amd_core(model_name: str, family: int | None, model: int | None) -> str | None:
    """AMD's core generation from family/model (None for other vendors or unknown ones)."""
    if "AMD" not in model_name or family is None or model is None:
        return None
    if family == 23:
        return "zen2" if model >= 0x30 else "zen1"
    if family == 25:
        return "zen4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF) else "zen3"
    if family == 26:
        return "zen5"
    return None


def describe_processor(info: dict) -> str:
    amx = ", ".join(info["amx"]) if info["amx"] else "no"
    core = f" ({info['core'].replace('zen', 'Zen ')})" if info["core"] else ""
    return (f"{info['model_name']}, cpu family {info['family']} model {info['model']}{core}, {info['cores']} cores; "
            f"avx512_bf16: {'yes' if info['avx512_bf16'] else 'no'}, AMX: {amx}, "
            f"avx512f: {'yes' if info['avx512f'] else 'no'}")


def versions() -> dict:
    import torch
    import torchvision

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__}
    with contextlib.suppress(Exception):
        import torchdistill

        found["torchdistill"] = torchdistill.__version__
    with contextlib.suppress(Exception):
        found["orc_fast commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                                  capture_output=True, check=True).stdout.strip()
    return found


# ============================================================================ the shared data and the pivot


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["ORC_FAST_CACHE"] = str(WORK_DIR / "cache")  # the subset tree's decode cache stays in the work folder
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def build_tree(work: Path) -> Path:
    """<work>/data: train/ = symlinks to the 2,000 images ``--train-subset 2000`` picks from the
    full folder; test/ = the first TEST_PER_CLASS test images of each class. Reused when the
    same images are already linked."""
    import torch

    from orc_fast.data import class_balanced_subset, scan_class_folders

    listing = scan_class_folders(DATA_DIR / "train")
    classes = list(listing)
    files = [(c, path) for c in classes for path in listing[c]]
    labels = torch.tensor([classes.index(c) for c, _ in files])
    chosen = [files[i] for i in class_balanced_subset(labels, IMAGES, len(classes)).tolist()]
    test_listing = scan_class_folders(DATA_DIR / "test")
    test = [(c, path) for c in classes for path in test_listing[c][:TEST_PER_CLASS]]
    manifest = {"source": str(DATA_DIR.resolve()), "train": [[c, str(p)] for c, p in chosen],
                "test": [[c, str(p)] for c, p in test]}
    tree = work / "data"
    stamp = tree / "manifest.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == manifest:
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    for split, entries in (("train", chosen), ("test", test)):
        for c, path in entries:
            link = tree / split / c / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    stamp.write_text(json.dumps(manifest))
    return tree


def base_flags(tree: Path, threads: int) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(tree), "--train-subset", str(IMAGES), "--val-split", "0",
            "--batch-size", str(BATCH), "--threads", str(threads), "--eval-every", "1000", "--progress", "off",
            "--overwrite"]


def make_pivot(work: Path, tree: Path, threads: int) -> Path:
    """A 1-epoch resnet56 checkpoint of the trainer on the same images (--val-split 0 like the
    KD runs: the pivot must carry the same normalisation statistics); reused when present."""
    out = work / "pivot"
    stamp = out / "made_for.json"
    made_for = {"tree": json.loads((tree / "manifest.json").read_text())["train"][:5], "images": IMAGES}
    if (out / "latest.pt").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == made_for:
        return out / "latest.pt"
    command = [sys.executable, "-m", "orc_fast.train", "--method", "independent", "--num-nets", "1", "--arch",
               "resnet56", "--epochs", "1", "--out", str(out), *base_flags(tree, threads)]
    print("making the pivot:", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=subprocess_env(), text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"pivot run failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    stamp.write_text(json.dumps(made_for))
    return out / "latest.pt"


def prepare(threads: int) -> dict:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tree = build_tree(WORK_DIR)
    return {"tree": tree, "pivot": make_pivot(WORK_DIR, tree, threads)}


# ============================================================================ the two sides


def default_precision() -> str:
    """--precision's default as the trainer's --help states it now."""
    done = subprocess.run([sys.executable, "-m", "orc_fast.train", "--help"], cwd=ROOT, env=subprocess_env(),
                          text=True, capture_output=True, check=True)
    text = " ".join(done.stdout.split())
    found = re.search(r"--precision \{[^}]*\} .*?\(default: ([a-z0-9]+)\)", text)
    return found.group(1) if found else "unknown"


def resolved_precision(name: str) -> str | None:
    """What ``--precision name`` runs as on this machine's CPU (None where orc_fast cannot say)."""
    try:
        import torch

        from orc_fast.precision import resolve_precision

        return resolve_precision(name, torch.device("cpu"))[0]
    except Exception:  # noqa: BLE001 - an older or newer orc_fast: run both variants
        return None


def orc_fast_variants(both: bool = False) -> dict[str, list[str]]:
    """label -> extra trainer flags: the defaults, and --precision fp32 unless the default runs
    as fp32 on this processor anyway (then the two commands are the same run; ``both`` still
    runs each)."""
    default = default_precision()
    resolved = resolved_precision(default)
    if default == "fp32":
        return {"orc_fast defaults (fp32)": []}
    label = f"orc_fast defaults ({default} -> {resolved or '?'})"
    if resolved == "fp32" and not both:
        return {f"{label} = --precision fp32": []}
    return {label: [], "orc_fast --precision fp32": ["--precision", "fp32"]}


def harmonic(rates: list[float]) -> float:
    """images/s over several equal-sized passes: total images over total seconds."""
    return len(rates) / sum(1.0 / r for r in rates)


def run_orc_fast(paths: dict, extra: list[str], epochs: int, threads: int) -> dict:
    out = WORK_DIR / "orc_fast_run"
    command = [sys.executable, "-m", "orc_fast.train", "--method", "kd", "--pivot", str(paths["pivot"]), "--arch",
               "resnet20", "--num-nets", "1", "--epochs", str(epochs), "--out", str(out),
               *base_flags(paths["tree"], threads), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=subprocess_env(), text=True, capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"orc_fast run failed (exit {done.returncode}): {' '.join(command)}\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    per_epoch = [e["images_per_s"] for e in metrics["epochs"]]
    announce = next((line.strip() for line in done.stdout.splitlines() if " on cpu" in line or " on cuda" in line), "")
    return {"images_per_s": harmonic(per_epoch[1:]), "per_epoch": per_epoch, "wall_s": wall, "announce": announce,
            "command": command}


def run_torchdistill(paths: dict, epochs: int, threads: int, workers: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--torchdistill-worker", "--epochs", str(epochs),
               "--threads", str(threads), "--workers", str(workers)]
    env = subprocess_env()
    env["ORC_FAST_PEER_TRAIN_DIR"] = str(paths["tree"] / "train")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"torchdistill run failed (exit {done.returncode}): {' '.join(command)}\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    per_epoch = result["per_epoch"]
    return {"images_per_s": harmonic(per_epoch[1:]), "per_epoch": per_epoch, "wall_s": wall,
            "announce": result["announce"], "command": command}


def torchdistill_worker(epochs: int, threads: int, workers: int) -> None:
    """torchdistill's own training loop (examples/torchvision/image_classification.py's
    train() / train_one_epoch(), evaluation left out) on peer_torchdistill.yaml; prints one
    RESULT_MARK line of JSON: images/s of every pass."""
    import torch

    torch.set_num_threads(threads)
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.models.registry import get_model

    set_seed(0)
    device = torch.device("cpu")
    config = yaml_util.load_yaml_file(str(CONFIG))
    train_config = config["train"]
    train_config["num_epochs"] = epochs
    train_config["train_data_loader"]["kwargs"]["num_workers"] = workers
    models = config["models"]
    teacher = get_model(models["teacher_model"]["key"], **models["teacher_model"]["kwargs"]).to(device)
    student = get_model(models["student_model"]["key"], **models["student_model"]["kwargs"]).to(device)
    box = get_distillation_box(teacher, student, config["datasets"], train_config, device, None, False, 1)
    # The example never switches the teacher out of train mode (its batch norms would use
    # batch statistics and move their running ones under no_grad). The job's teacher is
    # frozen: eval mode, as orc_fast's kd pivot.
    box.teacher_model.eval()
    per_epoch = []
    for epoch in range(epochs):
        started = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        images = 0
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            value = loss.item()  # the example logs it every step
            if not math.isfinite(value):
                raise ValueError(f"loss = {value}")
            images += sample_batch.shape[0]
        box.post_epoch_process()
        seconds = time.perf_counter() - started
        per_epoch.append(images / seconds)
        print(f"pass {epoch + 1}/{epochs}: {images} images, {seconds:.1f} s, {images / seconds:.1f} img/s, "
              f"last loss {value:.3f}", flush=True)
    announce = (f"DistillationBox {type(box).__name__}, teacher {models['teacher_model']['key']} "
                f"(training={box.teacher_model.training}), student {models['student_model']['key']}, "
                f"criterion {' '.join(str(box.criterion).split())}, {len(box.train_data_loader.dataset)} images, "
                f"{workers} DataLoader workers, {torch.get_num_threads()} torch threads")
    print(RESULT_MARK + json.dumps({"per_epoch": per_epoch, "announce": announce}), flush=True)


# ============================================================================ the comparison


TORCHDISTILL = "torchdistill 1.1.5"


def compare(rounds: int, epochs: int, threads: int, workers: int, both: bool = False, log=print) -> dict:
    """Interleaved rounds (each orc_fast variant, then torchdistill); per-round results."""
    paths = prepare(threads)
    sides = {label: (lambda extra=extra: run_orc_fast(paths, extra, epochs, threads))
             for label, extra in orc_fast_variants(both).items()}
    sides[TORCHDISTILL] = lambda: run_torchdistill(paths, epochs, threads, workers)
    results = {label: [] for label in sides}
    load_before = os.getloadavg()
    started = time.perf_counter()
    for index in range(rounds):
        for label, run in sides.items():
            result = run()
            results[label].append(result)
            log(f"round {index + 1}/{rounds} {label}: {result['images_per_s']:.1f} img/s "
                f"(passes: {', '.join(f'{r:.1f}' for r in result['per_epoch'])}; {result['wall_s']:.0f} s)")
    return {"results": results, "rounds": rounds, "epochs": epochs, "threads": threads, "workers": workers,
            "load_before": load_before, "load_after": os.getloadavg(), "seconds": time.perf_counter() - started,
            "paths": paths}


def summary(run: dict) -> dict:
    """label -> {min, median, max}; and orc_fast variant -> ratios to torchdistill."""
    stats = {}
    for label, results in run["results"].items():
        rates = [r["images_per_s"] for r in results]
        stats[label] = {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}
    base = stats[TORCHDISTILL]
    ratios = {}
    for label in stats:
        if label == TORCHDISTILL:
            continue
        paired = [a["images_per_s"] / b["images_per_s"]
                  for a, b in zip(run["results"][label], run["results"][TORCHDISTILL])]
        ratios[label] = {"median": stats[label]["median"] / base["median"], "min": stats[label]["min"] / base["min"],
                         "max": stats[label]["max"] / base["max"], "paired_min": min(paired),
                         "paired_max": max(paired)}
    return {"stats": stats, "ratios": ratios}


def summary_table(run: dict) -> str:
    numbers = summary(run)
    lines = ["| side | min img/s | median img/s | max img/s | orc_fast / torchdistill: medians | mins | maxes "
             "| same-round ratios |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, s in numbers["stats"].items():
        r = numbers["ratios"].get(label)
        ratio = (f"**{r['median']:.2f}x** | {r['min']:.2f}x | {r['max']:.2f}x | "
                 f"{r['paired_min']:.2f}x - {r['paired_max']:.2f}x") if r else "1.00x | 1.00x | 1.00x | -"
        lines.append(f"| {label} | {s['min']:.1f} | {s['median']:.1f} | {s['max']:.1f} | {ratio} |")
    return "\n".join(lines)


def rounds_table(run: dict) -> str:
    lines = ["| round | side | img/s (passes after the first) | every pass, img/s (first = warm-up) | "
             "subprocess wall s |", "| ---: | --- | ---: | --- | ---: |"]
    for index in range(run["rounds"]):
        for label, results in run["results"].items():
            r = results[index]
            passes = ", ".join(f"{x:.1f}" for x in r["per_epoch"])
            lines.append(f"| {index + 1} | {label} | {r['images_per_s']:.1f} | {passes} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def markdown(run: dict, info: dict, command: str) -> str:
    found = versions()
    first = {label: results[0] for label, results in run["results"].items()}
    orc_commands = [" ".join(Path(c).name if c == sys.executable else c for c in r["command"])
                    for label, r in first.items() if label != TORCHDISTILL]
    announces = "\n".join(f"- {label}: `{r['announce']}`" for label, r in first.items())
    images = STEPS * BATCH
    passes = "pass 2" if run["epochs"] == 2 else f"passes 2-{run['epochs']}"
    return f"""# Peer benchmark: Hinton KD in orc_fast vs torchdistill {found.get('torchdistill', '?')} ({info['slug']})

The same knowledge-distillation job in both, each in its own natural form, as subprocesses
run interleaved (one of each per round, {run['rounds']} round{'s' if run['rounds'] != 1 else ''}). Produced by
`benchmarks/bench_peer.py` (the method is in its docstring; the torchdistill config is
`benchmarks/peer_torchdistill.yaml`).

    {command}

Processor: **{describe_processor(info)}**.
Versions: {', '.join(f'{k} {v}' for k, v in found.items())}.
Date: {datetime.date.today().isoformat()}. Load average (1/5/15 min) before:
{'/'.join(f'{x:.2f}' for x in run['load_before'])}, after: {'/'.join(f'{x:.2f}' for x in run['load_after'])}
(the machine is shared: absolute numbers carry that noise, the interleaving spreads it over
both sides). Whole comparison: {run['seconds'] / 60:.1f} min.

## Settings

- Job: resnet56 teacher (frozen, eval mode, no_grad) -> resnet20 student, batch {BATCH}, SGD lr 0.1
  momentum 0.9 weight decay 5e-4, temperature 4, loss 0.1 CE + 0.9 tau^2 KL.
- Data: a fixed {IMAGES}-image class-balanced subset of {DATA_DIR}/train (the images
  `--train-subset {IMAGES}` picks), random crop 32 (4-pixel padding) + horizontal flip; both sides
  drop the last partial batch: {STEPS} steps = {images} images per pass.
- {run['epochs']} passes per measurement, the first a warm-up; images/s is over {passes}
  (orc_fast: `images_per_s` of those epochs in metrics.json; torchdistill: images over the
  wall time of each pass, DataLoader start-up included, as the trainer's epoch includes
  its batch building).
- {run['threads']} torch thread{'s' if run['threads'] != 1 else ''} on both sides (`--threads` / `torch.set_num_threads`);
  torchdistill's DataLoader: {run['workers']} worker processes (its CIFAR-10 samples use 16;
  capped at the machine's cores), which decode and augment the JPEGs each pass in processes
  of their own; orc_fast decodes once into uint8 tensors and augments whole batches in the
  training process, on its torch threads.

orc_fast command (first round; `--precision` default at this commit: `{default_precision()}`):

    {orc_commands[0] if orc_commands else ''}

What each side reported it ran:
{announces}

## Result

{summary_table(run)}

Ratios > 1: orc_fast trains more images per second. "same-round ratios": orc_fast over
torchdistill of the same round, lowest and highest.

## Every round

{rounds_table(run)}

## Where the two differ (besides speed)

- Data path: orc_fast holds the decoded subset as uint8 tensors and builds each augmented
  batch with one gather in the training process; torchdistill (torchvision `ImageFolder` +
  `transforms` in DataLoader workers) decodes every JPEG with PIL each pass. Both are each
  framework's standard path; the difference is part of what is measured.
- Teacher weights: orc_fast's pivot is a 1-epoch resnet56 of the trainer; torchdistill's
  teacher is a freshly initialised `torchdistill.models` resnet56 (the same architecture and
  parameter count). Weights do not change the cost of a step.
- Teacher mode: torchdistill's example loop never calls `eval()` on the teacher; the benchmark
  does once (the job's teacher is frozen), as orc_fast's `kd` does.
- KD weights: torchdistill's `KDLoss` alpha weights the CE term (its samples' alpha 0.9 is
  0.9 CE + 0.1 tau^2 KL); the config sets alpha 0.1, beta 0.9 for the job's 0.1 CE + 0.9 tau^2 KL.
- Learning-rate schedule (no effect on speed): orc_fast's default per-step cosine; torchdistill
  the samples' epoch-wise MultiStepLR (no milestone is reached). Normalisation: orc_fast the
  subset's own statistics, torchdistill the samples' CIFAR-10 constants.
- Memory format: orc_fast's CPU fp32 default is channels-last; torchdistill runs NCHW.
"""


# ============================================================================ pytest


PYTEST_RUN: dict = {}


@pytest.fixture(scope="module", autouse=True)
def table(request):
    yield
    if not PYTEST_RUN:
        return
    show_table(request, "Hinton KD resnet56 -> resnet20: orc_fast vs torchdistill, images/s (same run)",
               summary_table(PYTEST_RUN))


def test_peer_kd(benchmark):
    """One round = a subprocess of each side (A, B); pytest-benchmark's figure is the round,
    the per-side images/s go to extra_info and the table."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    rounds = int(os.environ.get("ORC_FAST_PEER_ROUNDS", 3))
    epochs = int(os.environ.get("ORC_FAST_PEER_EPOCHS", 2))
    threads = int(os.environ.get("ORC_FAST_PEER_THREADS", 0)) or DEFAULT_THREADS
    workers = int(os.environ.get("ORC_FAST_PEER_WORKERS", 0)) or DEFAULT_WORKERS
    paths = prepare(threads)
    sides = {label: (lambda extra=extra: run_orc_fast(paths, extra, epochs, threads))
             for label, extra in orc_fast_variants().items()}
    sides[TORCHDISTILL] = lambda: run_torchdistill(paths, epochs, threads, workers)
    results = {label: [] for label in sides}
    load_before = os.getloadavg()

    def one_round():
        for label, run in sides.items():
            results[label].append(run())

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    PYTEST_RUN.update(results=results, rounds=rounds, epochs=epochs, threads=threads, workers=workers,
                      load_before=load_before, load_after=os.getloadavg(), seconds=0.0, paths=paths)
    numbers = summary(PYTEST_RUN)
    benchmark.extra_info.update({label: s for label, s in numbers["stats"].items()})
    benchmark.extra_info["ratios"] = numbers["ratios"]
    assert all(r["median"] > 0 for r in numbers["ratios"].values())


# ============================================================================ script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="passes per measurement, the first a warm-up (default 2)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch threads on both sides (default: half the cores, {DEFAULT_THREADS} here)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"torchdistill DataLoader workers (default: min(16, cores), {DEFAULT_WORKERS} here)")
    parser.add_argument("--both", action="store_true",
                        help="run the defaults and --precision fp32 even where the default runs as fp32 here")
    parser.add_argument("--out", help="results file (default benchmarks/results/peer_torchdistill_<processor>.md)")
    parser.add_argument("--torchdistill-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torchdistill_worker:
        torchdistill_worker(args.epochs, args.threads, args.workers)
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first pass is a warm-up)")
    reason = skip_reason()
    if reason:
        print(f"bench_peer: cannot compare: {reason}", file=sys.stderr)
        return 2
    info = processor()
    out = Path(args.out) if args.out else HERE / "results" / f"peer_torchdistill_{info['slug']}.md"
    command = "python benchmarks/bench_peer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"processor: {describe_processor(info)}", flush=True)
    run = compare(args.rounds, args.epochs, args.threads, args.workers, args.both,
                  log=lambda message: print(message, flush=True))
    out.write_text(markdown(run, info, command.strip()))
    print(summary_table(run))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
