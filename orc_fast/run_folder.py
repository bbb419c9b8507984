"""A run's folder (``--out``): the one place that knows the names of the files in it.

    metrics.json            per-epoch record and the final result
    latest.pt, best.pt      one-process checkpoints (best.pt: best validation ensemble)
    latest.json, best.json  member-parallel manifests naming one epochNNNN-<id>.rank<r>.pt per rank
    curves.png              the run's picture
    tensorboard/            TensorBoard scalars (--tensorboard)

Every writer here is atomic (orc_fast/checkpoint.py): a crash leaves the old file or the new.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import checkpoint
from .errors import UsageError


class RunFolder:
    METRICS, CURVES, TENSORBOARD = "metrics.json", "curves.png", "tensorboard"
    LATEST, BEST = "latest.pt", "best.pt"
    LATEST_MANIFEST, BEST_MANIFEST = "latest.json", "best.json"
    # What marks a folder as holding a run.
    RUN_FILES = (METRICS, LATEST, BEST, LATEST_MANIFEST, BEST_MANIFEST)
    LOCK = "train.lock"

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def latest(self) -> Path:
        return self.path / self.LATEST

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def latest_manifest(self) -> Path:
        return self.path / self.LATEST_MANIFEST

    @property
    def best_manifest(self) -> Path:
        return self.path / self.BEST_MANIFEST

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    def rank_file(self, epoch: int, run_id: str, rank: int) -> Path:
        """A member-parallel rank's checkpoint of ``epoch``; ``run_id`` is per launch, so a
        relaunch never overwrites a file a manifest on disk still names."""
        return self.path / f"epoch{epoch:04d}-{run_id}.rank{rank}.pt"

    def rank_files(self, rank: int) -> list[Path]:
        return list(self.path.glob(f"epoch*.rank{rank}.pt"))

    # ---------------------------------------------------------------- reading

    def checkpoint_file(self) -> Path | None:
        """The latest checkpoint: latest.pt, else a member-parallel run's latest.json."""
        return next((p for p in (self.latest, self.latest_manifest) if p.is_file()), None)

    def pivot_file(self) -> Path | None:
        """The checkpoint a pivot comes from: best.pt, else latest.pt."""
        return next((p for p in (self.best, self.latest) if p.is_file()), None)

    def holds_checkpoint(self) -> bool:
        return self.checkpoint_file() is not None

    def read_metrics(self) -> dict | None:
        """metrics.json, or None when it is missing or unreadable."""
        try:
            metrics = json.loads(self.metrics.read_text())
        except (OSError, ValueError):
            return None
        return metrics if isinstance(metrics, dict) else None

    def kept_checkpoint(self) -> str:
        """What a failed write leaves: the last complete checkpoint, or none."""
        try:
            epoch = self.saved_epoch()
        except checkpoint.CheckpointError:
            epoch = None
        if epoch is None:
            return "there is no complete checkpoint to resume"
        return f"the last complete checkpoint, {self.checkpoint_file()} (epoch {epoch}), is kept"

    def saved_epoch(self) -> int | None:
        """The epoch the latest checkpoint holds (None: no checkpoint); CheckpointError if unreadable."""
        path = self.checkpoint_file()
        if path is None:
            return None
        try:
            return json.loads(path.read_text())["epoch"] if path.suffix == ".json" else checkpoint.load(path)["epoch"]
        except (OSError, ValueError, KeyError) as error:
            raise checkpoint.CheckpointError(f"{path} cannot be read") from error

    # ---------------------------------------------------------------- writing

    def lock(self, name: str = "train", what: str = "trainer") -> Path:
        """``<name>.lock`` holding this process's pid: one ``what`` per folder at a time. A lock
        whose process is gone is taken over; a live one is a UsageError naming its pid. The
        caller removes the file when done (``unlock``)."""
        lock = self.path / f"{name}.lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pid = _lock_owner(lock)
                    if pid and pid_alive(pid):
                        raise UsageError(f"{self.path} is in use by another {what} (pid {pid}, {lock}); wait for it, "
                                         f"or remove the lock if that process is not a {what}") from None
                    lock.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                with os.fdopen(fd, "w") as handle:
                    handle.write(f"{os.getpid()}\n")
                return lock
        except OSError as error:
            raise checkpoint.write_failure(lock, error) from None
        raise UsageError(f"cannot take the lock {lock}")

    @staticmethod
    def unlock(lock: Path) -> None:
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)

    def take(self) -> Path:
        """Lock the folder (one trainer at a time) and make sure a checkpoint can be written
        there, before any work; the lock, for ``unlock``."""
        lock = self.lock()
        try:
            self.check_writable()
        except BaseException:
            self.unlock(lock)
            raise
        return lock

    def clear_earlier_run(self) -> None:
        """--overwrite: remove the earlier run's files, once every input has been checked (a
        bad one leaves them as they were) and before this run writes any, so the folder never
        holds two runs' files."""
        removed = self.clear()
        if removed:
            print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self}")

    def clear(self) -> list[str]:
        """Remove a run's files; the names removed."""
        removed = []
        names = (*self.RUN_FILES, self.CURVES)
        for path in [*(self.path / n for n in names), *self.path.glob("epoch*.rank*.pt"), *self.path.glob(".*.tmp")]:
            if path.is_file():
                path.unlink()
                removed.append(path.name)
        if self.tensorboard.is_dir():
            shutil.rmtree(self.tensorboard)
            removed.append(self.TENSORBOARD)
        return removed

    def check_writable(self) -> None:
        """Write and remove a small file, so a folder that cannot take a checkpoint (read-only,
        full, not ours) is said before any training; WriteError otherwise."""
        probe = self.path / ".write-test"
        checkpoint.write_atomic(probe, lambda handle: handle.write(b"orc_fast"))
        probe.unlink(missing_ok=True)

    def check_free(self, resuming: bool, overwrite: bool) -> None:
        """Refuse, before any work, a folder that is a file, or that holds a run this one would
        overwrite (unless --resume continues it or --overwrite says so)."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file, not a folder")
        if resuming or overwrite or not self.path.is_dir():
            return
        held = [name for name in self.RUN_FILES if (self.path / name).exists()]
        if held:
            raise UsageError(f"--out {self.path} already holds a run ({', '.join(held)}): continue it with --resume, "
                             f"replace it with --overwrite, or pick another --out")

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json, then the plot (a plotting problem only warns)."""
        checkpoint.write_atomic(self.metrics, lambda h: h.write(json.dumps(metrics, indent=1).encode()))
        try:
            from .plot import plot_metrics

            plot_metrics(metrics, self.curves)
        except Exception as error:  # noqa: BLE001 - a plotting problem must not kill training
            print(f"warning: could not draw {self.curves}: {error}")

    def complete_metrics(self, metrics: dict) -> None:
        """Rewrite metrics.json (and the plot) when the one on disk holds fewer epochs than
        ``metrics``: the save order is checkpoint first, metrics second, so a crash between
        the two leaves it short."""
        written = self.read_metrics()
        epochs = written.get("epochs") if written else None
        if not isinstance(epochs, list) or len(epochs) < len(metrics["epochs"]):
            self.write_metrics(metrics)


def _lock_owner(lock: Path) -> int:
    try:
        return int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
