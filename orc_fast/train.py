"""python -m orc_fast.train: train a group of networks with ORC, or a baseline.

ORC ("Network Group-based Knowledge Distillation using Online Role Change", Choi et al.,
ICCV 2023; docs/design.md §2): every step the best-scoring members become teachers,
refine themselves on the students' error images, and the students distil from the
teachers' mean tempered distribution. With ``--pivot`` (the paper's main setting) a
pre-trained member of an earlier run stays in the teacher group and the best-ranked
students are promoted into it each step. Baselines in the same engine, each at its
published settings: ``independent``, ``kd`` (Hinton KD from the pivot), ``dml`` (Deep
Mutual Learning) and ``kdcl`` (KDCL's MinLogit group teacher); every method is a file in
orc_fast/methods/.

    python -m orc_fast.train                      # 4 x resnet8 on digits, 10 epochs, ~1 min on 2 cores
    python -m orc_fast.train --method independent --num-nets 1 --arch resnet20 --out runs/pivot
    python -m orc_fast.train --pivot runs/pivot   # pivot mode: 4 x resnet8 students, the resnet20 teaches
    python -m orc_fast.train --config configs/cifar100_orc.yaml --data-dir data --download
    python -m orc_fast.train --dataset imagefolder --data-dir ../shared/data/cifar10 \\
        --arch resnet32,resnet20,wrn_16_2,vgg8 --epochs 30 --out runs/mixed

Writes to --out (orc_fast/run_folder.py): metrics.json, latest.pt / best.pt (atomic),
curves.png. Bad input (unknown names, missing or inconsistent data, a wrong checkpoint)
ends with a one-line error and exit code 2 before anything in --out is touched.

The file reads in the order a run happens: ``main`` -> ``run``: start the process, load
the data, build the group, resume, then for each epoch train, evaluate, save, report. The
command line is orc_fast/cli.py, the configuration orc_fast/config.py, the step
orc_fast/group_step.py, what is printed orc_fast/report.py.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed
from .accuracy import accuracy, pivot_accuracy
from .cli import PROG, parse_args
from .config import RunConfig, check_against_data, resolve, resume_changes
from .cuda_graphs import CUDA_GRAPH_WARMUP, CudaGraphStep
from .data import DataError, Source, load_dataset
from .errors import UsageError
from .group_step import GroupStep
from .guard import NonFiniteGuard, NonFiniteLoss, start_momentum
from .models import build_model
from .observe import EpochLog, TensorBoardLog
from .pivot import load_pivot
from .precision import memory_format
from .report import ProgressBar, announce, final_record, interrupted_message, report_epoch, report_final, show_progress
from .run_folder import RunFolder


def main(argv=None) -> int:
    config = None
    try:
        config = resolve(parse_args(argv))
        run(config)
    except (UsageError, DataError, checkpoint.CheckpointError, distributed.LaunchError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, distributed.GroupFailure) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except checkpoint.WriteError as error:  # disk full, read-only, no permission
        kept = RunFolder(config.run.out).kept_checkpoint() if config else "nothing was written"
        print(f"{PROG}: error: {error}; {kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n" + interrupted_message(config.run.out if config else None), file=sys.stderr)
        return 130
    return 0


def run(config: RunConfig) -> dict:
    """The whole run, phase by phase, in the order it happens."""
    placement = start_process(config)
    config = config.updated(**placement.settings())
    folder = RunFolder(config.run.out)
    lock = folder.take() if placement.is_main else None
    try:
        return run_in(config, placement, folder)
    finally:
        if lock is not None:
            folder.unlock(lock)


def run_in(config: RunConfig, placement, folder: RunFolder) -> dict:
    """The run, once its folder is this process's."""
    data = load_data(config)
    check_against_data(config, data)
    config = config.updated(num_classes=data.num_classes, train_size=data.size("train"), val_size=data.size("val"),
                            test_size=data.size("test"))
    training, config = build(config, placement, data)
    config, start_epoch, best_accuracy, metrics = resume(config, training, placement, folder)
    announce(config, placement.describe())
    if training.step.pivot is not None and metrics["pivot"] is None:
        metrics["pivot"] = pivot_accuracy(training.step.pivot, data, config)
        print(f"pivot before training: {100 * metrics['pivot']['pivot_test_acc']:.2f}% test")
    if config.run.overwrite and not config.run.resume and placement.is_main:
        folder.clear_earlier_run()  # every input checked, nothing written yet
    checkpoint.remove_stale_temps(folder.path)  # what a crash in the middle of a save left behind
    last_epoch = min(config.optim.epochs, config.run.stop_after) if config.run.stop_after else config.optim.epochs
    board = (TensorBoardLog(Path(config.run.log_dir), data.steps_per_epoch(config.optim.batch_size), start_epoch)
             if config.run.log_dir is not None and placement.is_main else None)
    try:
        for epoch in range(start_epoch, last_epoch):
            best_accuracy = train_and_save(config, training, data, placement, folder, metrics, epoch, last_epoch,
                                           best_accuracy, board, warmup_steps(config, start_epoch, epoch))
    finally:
        if board is not None:
            board.close()
    finish(config, metrics, last_epoch, placement, folder)
    placement.close()
    return metrics


# ============================================================================ building the run


def start_process(config: RunConfig):
    """Threads, the process group under torchrun (else a one-process placement), seeds."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    elif config.run.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    placement = distributed.setup(config)  # this rank's device and members
    seed = config.run.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return placement


def load_data(config: RunConfig) -> Source:
    """uint8 tensors on the device, augmented there in batches (docs/design.md §5)."""
    d = config.data
    return load_dataset(d.dataset, d.data_dir, d.download, d.image_size, d.train_subset,
                        torch.device(config.run.device), log=lambda message: print(message, flush=True),
                        val_split=d.val_split)


@dataclass
class Training:
    """What trains the group (``step``, which owns members, pivot and optimizers) and what
    runs around each step."""

    step: GroupStep
    run_step: object  # step, or its CUDA-graph capture
    guard: NonFiniteGuard
    data_generator: torch.Generator
    last_roles: torch.Tensor | None = None  # the previous step's roles, for counting role changes


def build(config: RunConfig, placement, data: Source) -> tuple[Training, RunConfig]:
    """One model and one SGD optimizer per member (and the pivot's, when it trains), the group
    step and its NaN guard; the config with what the pivot's checkpoint says."""
    device, o = torch.device(config.run.device), config.optim
    data_generator = torch.Generator(device=device).manual_seed(config.run.seed)
    layout = memory_format(config.run.channels_last)
    num_classes = config.data.num_classes
    models = placement.build_models(config.method.archs, lambda arch: build_model(arch, num_classes), device)
    models = [m.to(memory_format=layout) for m in models]

    def sgd(model):
        return start_momentum(torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                              weight_decay=o.weight_decay))

    pivot, pivot_optimizer = None, None
    if config.method.pivot:
        pivot, info = load_pivot(config.method.pivot, config.method.pivot_member, data)
        pivot = pivot.to(device, memory_format=layout)
        pivot_optimizer = None if config.method.freeze_pivot else sgd(pivot)
        config = config.updated(pivot_member=info["member"], pivot_arch=info["arch"],
                                pivot_source_val_acc=info["val_acc"])
    step = GroupStep(models, [sgd(m) for m in models], config.step_config(), device, data_generator,
                     pivot=pivot, pivot_optimizer=pivot_optimizer, placement=placement.members())
    run_step = CudaGraphStep(step) if config.run.cuda_graphs else step
    guard = NonFiniteGuard(config.method.nan_policy, device, step.state_tensors)
    return Training(step, run_step, guard, data_generator), config


def resume(config: RunConfig, training: Training, placement, folder: RunFolder):
    """Load --resume's checkpoint into the group: (config, epochs done, best validation
    accuracy so far, metrics so far)."""
    metrics = {"config": config.record(), "epochs": [], "final": None, "pivot": None}
    if not config.run.resume:
        return config, 0, -1.0, metrics
    path, state = placement.load_checkpoint(folder, config.run.resume)
    config = resume_changes(state["config"], config, path, state["epoch"])
    try:
        training.step.load_state_dict(state)
        checkpoint.set_rng_state(state["rng"], training.data_generator)
        if state.get("last_roles") is not None:
            training.last_roles = state["last_roles"].to(config.run.device)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit these models: {first_line}") from None
    metrics.update(config=config.record(), epochs=state["metrics"]["epochs"], pivot=state["metrics"].get("pivot"))
    print(f"resumed from {path} after epoch {state['epoch']}")
    return config, state["epoch"], state.get("best_ensemble_acc", -1.0), metrics


# ============================================================================ one epoch


def train_and_save(config: RunConfig, training: Training, data: Source, placement, folder: RunFolder,
                   metrics: dict, epoch: int, last_epoch: int, best_accuracy: float,
                   board: TensorBoardLog | None, warmup: int) -> float:
    """One epoch: train, evaluate (every --eval-every and the last), check the skipped steps,
    save, log, report; returns the best validation accuracy so far."""
    started = time.perf_counter()
    record, seconds, log = train_epoch(config, training, data, epoch, warmup)
    evaluated = (epoch + 1) % config.run.eval_every == 0 or epoch + 1 == last_epoch
    record.update(evaluate_group(config, training, data, placement, evaluated))
    record["seconds"] = time.perf_counter() - started  # training and evaluation: a run's wall time adds these
    metrics["epochs"].append(record)
    check_skipped(config, metrics, log.steps)
    # best.pt is chosen on the validation split only; without one there is no best.pt.
    is_best = record["val_ensemble_acc"] is not None and record["val_ensemble_acc"] > best_accuracy
    if evaluated:
        metrics["final"] = final_record(record)
    if is_best:
        best_accuracy = record["val_ensemble_acc"]
    save_epoch(config, training, data, placement, folder, metrics, epoch + 1, is_best, best_accuracy)
    if board is not None:
        board.steps(epoch, log)
        board.epoch(record)
    report_epoch(config, record, seconds)
    return best_accuracy


def learning_rate(config: RunConfig, epoch: int, step: int, steps: int) -> float:
    o = config.optim
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch + step / steps) / o.epochs))
    return o.lr * o.lr_decay ** sum(epoch >= m for m in o.milestones)


def train_epoch(config: RunConfig, training: Training, data: Source, epoch: int,
                warmup_steps: int = 0) -> tuple[dict, float, EpochLog]:
    """One pass over the training set: the epoch's training record (no accuracies yet), its
    seconds, and its per-step log. The first ``warmup_steps`` steps (compilation, CUDA-graph
    capture) are left out of images/s."""
    device = torch.device(config.run.device)
    training.step.set_train_mode()
    steps = data.steps_per_epoch(config.optim.batch_size)
    log = EpochLog(config.method.num_nets, device, keep_steps=config.run.log_dir is not None)
    bar = ProgressBar(show_progress(config), steps, f"epoch {epoch + 1}/{config.optim.epochs}")
    images_seen, timed_images, started = 0, 0, time.perf_counter()
    run_started = started
    layout = memory_format(config.run.channels_last)
    for step, (images, labels) in enumerate(data.train_batches(config.optim.batch_size, training.data_generator,
                                                                config.data.augment)):
        if step == warmup_steps and warmup_steps:
            if device.type == "cuda":  # once per run: the warm-up's queued work belongs to it
                torch.cuda.synchronize(device)
            timed_images, started = 0, time.perf_counter()
        lr = learning_rate(config, epoch, step, steps)
        training.step.set_lr(lr)
        training.guard.before_step()
        result = training.run_step(images.contiguous(memory_format=layout), labels)
        kept = training.guard.after_step(result.losses, epoch, step)
        log.add(result, kept, training.last_roles, lr)  # the run's first step has no role change
        training.last_roles = result.roles
        images_seen += len(labels)
        timed_images += len(labels)
        bar.update(step + 1, images_seen)
    training.guard.flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finished = time.perf_counter()
    bar.close()
    timed = warmup_steps < steps  # an epoch no longer than its warm-up has no steady speed: all of it counts
    record = {"epoch": epoch + 1, **log.record(), "lr": log.lrs[-1],
              "images_per_s": timed_images / (finished - started) if timed else images_seen / (finished - run_started),
              "warmup_steps": min(warmup_steps, steps) if timed else 0,
              "skipped_steps": training.guard.take_skipped(), "strategy": training.step.strategy.chosen}
    return record, finished - run_started, log


def warmup_steps(config: RunConfig, start_epoch: int, epoch: int) -> int:
    """Steps of this epoch that compile or capture rather than train at speed: the first
    step under --compile, the warm-up and capture steps of --cuda-graphs; only in the first
    epoch this process trains (a resumed run compiles again)."""
    if epoch != start_epoch:
        return 0
    return max(1 if config.run.compile else 0, CUDA_GRAPH_WARMUP + 1 if config.run.cuda_graphs else 0)


def evaluate_group(config: RunConfig, training: Training, data: Source, placement, evaluated: bool) -> dict:
    """The epoch's accuracies (None where not evaluated), and a refined pivot's."""
    record = dict.fromkeys(("test_acc", "ensemble_acc", "val_acc", "val_ensemble_acc"))
    if not evaluated:
        return record
    models = training.step.models
    record["test_acc"], record["ensemble_acc"] = accuracy(models, data, "test", config, placement.exchange)
    if config.data.val_size:
        record["val_acc"], record["val_ensemble_acc"] = accuracy(models, data, "val", config, placement.exchange)
    if training.step.pivot_optimizer is not None:
        record.update(pivot_accuracy(training.step.pivot, data, config))
    return record


def check_skipped(config: RunConfig, metrics: dict, steps: int) -> None:
    """Under skip-step, more skipped steps than --max-skipped-steps (in all, this epoch's
    included) end the run before this epoch is saved: such a run is not training."""
    if config.method.nan_policy != "skip-step":
        return
    limit = max(1, steps // 10) if config.method.max_skipped_steps is None else config.method.max_skipped_steps
    skipped = sum(e["skipped_steps"] for e in metrics["epochs"])
    if skipped > limit:
        last = metrics["epochs"][-1]
        raise NonFiniteLoss(
            f"{skipped} steps were skipped for non-finite losses ({last['skipped_steps']} in epoch {last['epoch']}), "
            f"more than --max-skipped-steps {limit}; the run stopped without saving epoch {last['epoch']}, so the "
            "last checkpoint is the last one saved (lower --lr)"
        )


def save_epoch(config: RunConfig, training: Training, data: Source, placement, folder: RunFolder, metrics: dict,
               epoch: int, is_best: bool, best_accuracy: float) -> None:
    """Checkpoints (atomic; latest.pt, best.pt when best; per rank under torchrun), then
    metrics.json and the plot. A checkpoint carries what using a member needs besides its
    weights: the class names and how images were normalised (orc_fast/trained.py)."""
    folder.path.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch, "config": metrics["config"], **training.step.state_dict(),
        "rng": checkpoint.rng_state(training.data_generator),
        "metrics": {"epochs": metrics["epochs"], "pivot": metrics.get("pivot")}, "best_ensemble_acc": best_accuracy,
        "last_roles": None if training.last_roles is None else training.last_roles.cpu(),
        "data": {"classes": data.classes, "image_size": data.image_size, "mean": data.mean.cpu(),
                 "std": data.std.cpu()},
    }
    placement.save_checkpoint(folder, state, is_best)
    if placement.is_main:
        folder.write_metrics(metrics)


def finish(config: RunConfig, metrics: dict, last_epoch: int, placement, folder: RunFolder) -> None:
    """The final report. A resumed run that had already finished reports that run, and
    rewrites its metrics.json only if a crash between the last checkpoint and that file left
    it short of epochs."""
    if metrics["final"] is None:
        evaluated_epochs = [e for e in metrics["epochs"] if e["test_acc"] is not None]
        if evaluated_epochs:
            metrics["final"] = final_record(evaluated_epochs[-1])
            if placement.is_main:
                folder.complete_metrics(metrics)
    if metrics["final"] is not None:
        report_final(config, metrics["final"], last_epoch, placement.checkpoint_files)


if __name__ == "__main__":
    sys.exit(main())
