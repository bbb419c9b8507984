"""What the trainer prints: the opening lines, a progress bar, one line per epoch, the final
result, and what a Ctrl-C leaves. Also the run's final record (``final_record``), which
metrics.json and the tools that read a run share."""

from __future__ import annotations

import sys
import time

from . import checkpoint
from .run_folder import RunFolder


class ProgressBar:
    """A one-line bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.start = self.last = time.perf_counter()

    def update(self, done: int, images: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        rate = images / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {rate:7.0f} img/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def show_progress(config) -> bool:
    return config.run.progress == "on" or (config.run.progress == "auto" and sys.stderr.isatty())


def percent(values) -> str:
    return " ".join(f"{100 * v:5.2f}" for v in values)


def _runs(archs):
    """Run-length groups of an arch list, for printing: [(arch, count), ...]."""
    groups = []
    for arch in archs:
        if groups and groups[-1][0] == arch:
            groups[-1][1] += 1
        else:
            groups.append([arch, 1])
    return groups


def announce(config, placement_description: str | None) -> None:
    """The run's opening lines: data, group, device and precision; the pivot; the loss."""
    m, data, run = config.method, config.data, config.run
    method = m.impl
    names = ", ".join(f"{count} x {arch}" for arch, count in _runs(m.archs))
    described = method.describe(config)
    print(
        f"{m.method} on {data.dataset} ({data.train_size} train / {data.val_size} validation / {data.test_size} test "
        f"images, {data.num_classes} classes): {names} on {run.device}, loss backend {m.backend_used}, "
        f"{run.precision} ({run.precision_reason}), {'channels-last' if run.channels_last else 'NCHW'}"
        + (f", {described}" if described else "")
    )
    if m.pivot:
        known = f", {100 * m.pivot_source_val_acc:.2f}% on its run's validation split" if m.pivot_source_val_acc is not None else ""
        print(f"pivot teacher: {m.pivot_arch}, member {m.pivot_member} of {m.pivot}{known}; {method.pivot_role(config)}"
              + (", error mixup" if m.error_mixup else ""))
    if method.distils:
        scale, alpha = m.kd_scale, m.alpha
        where = "overridden by " + ", ".join(m.loss_overrides) if m.loss_overrides else m.loss_source
        print(f"loss: {scale * (1 - alpha):g} CE + {scale * alpha:g} tau^2 KL, tau = {m.temperature:g} ({where})")
    if placement_description:
        print(placement_description)


def report_epoch(config, record: dict, seconds: float) -> None:
    """The epoch's line: each member's CE (and, for methods that distil, its tau^2 KL term
    apart), accuracies, the teacher shares and role changes of a method with roles, speed."""
    method = config.method.impl
    member_acc, ensemble_acc = record["test_acc"], record["ensemble_acc"]
    evaluated = member_acc is not None
    accuracy = f"acc {percent(member_acc)}  ens {100 * ensemble_acc:5.2f}" if evaluated else "acc (not evaluated)"
    teacher = ("  teacher " + " ".join(f"{t:.2f}" for t in record["teacher_fraction"])
               + f"  role changes/step {record['role_changes']:.2f}") if method.has_roles else ""
    if record.get("val_ensemble_acc") is not None:
        accuracy += f"  val ens {100 * record['val_ensemble_acc']:5.2f}"
    if record.get("pivot_test_acc") is not None:
        accuracy += f"  pivot {100 * record['pivot_test_acc']:5.2f}"
    terms = "ce " + " ".join(f"{v:.3f}" for v in record["train_ce"])
    if method.distils:
        terms += "  kd " + " ".join(f"{v:.3f}" for v in record["train_kd"])
    speed = f"  {record['images_per_s']:.0f} img/s"
    if record["warmup_steps"]:
        speed += f" (after {record['warmup_steps']} warm-up steps)"
    skipped = record["skipped_steps"]
    print(
        f"epoch {record['epoch']:3d}/{config.optim.epochs}  {terms}  {accuracy}{teacher}{speed}  {seconds:.1f}s"
        + (f"  ({skipped} non-finite steps skipped)" if skipped else ""),
        flush=True,
    )


def final_record(record: dict) -> dict:
    """The run's result after an evaluated epoch: test accuracies, and the best member as the
    validation split ranks it (None without a validation split)."""
    val_acc = record.get("val_acc")
    best_member = None if val_acc is None else max(range(len(val_acc)), key=val_acc.__getitem__)
    return {"test_acc": record["test_acc"], "ensemble_acc": record["ensemble_acc"], "val_acc": val_acc,
            "val_ensemble_acc": record.get("val_ensemble_acc"), "best_member": best_member}


def report_final(config, final: dict, last_epoch: int, checkpoint_files: str) -> None:
    stopped = last_epoch < config.optim.epochs
    print(f"{'test accuracy after epoch ' + str(last_epoch) if stopped else 'final test accuracy'}"
          f" ({config.method.method}, {config.data.dataset}):")
    for i, (arch, acc) in enumerate(zip(config.method.archs, final["test_acc"])):
        print(f"  member {i} ({arch}): {100 * acc:.2f}%")
    print(f"  ensemble: {100 * final['ensemble_acc']:.2f}%")
    if final["best_member"] is not None:
        best = final["best_member"]
        print(f"  best member on validation: {best} ({100 * final['test_acc'][best]:.2f}% test)")
    print(f"outputs in {config.run.out}/ (metrics.json, {checkpoint_files}, curves.png)")


def interrupted_message(out: str | None) -> str:
    """What a Ctrl-C leaves: the epoch the last complete checkpoint holds, or that there is
    none to resume."""
    if out is None:
        return "interrupted before the run started; nothing was written"
    folder = RunFolder(out)
    try:
        epoch = folder.saved_epoch()
    except checkpoint.CheckpointError:
        return f"interrupted; {folder.checkpoint_file()} cannot be read, so there is nothing to resume"
    if epoch is None:
        return ("interrupted before the first checkpoint was written, so there is nothing to resume: run the same "
                "command again (without --resume)")
    return (f"interrupted; {folder.checkpoint_file()} holds epoch {epoch}: continue with the same command and "
            f"--resume --out {out}")
