"""Training checkpoints: atomic writes, validated reads.

A checkpoint is one ``torch.save`` dict holding everything a run needs to continue
bit-for-bit on the CPU: every member's weights and optimizer state, the ORC score state,
the RNG states (torch, CUDA, numpy, Python, the data generator), the metrics so far and
the run's configuration. It is written to a temporary file in the target folder,
fsync'ed, then renamed over the target, so a crash leaves either the old file or the new
one, never a torn one. Reading uses ``weights_only=True`` (no arbitrary pickles) and
checks the format before anything is used.
"""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "orc_fast.train checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "epoch", "config", "models", "optimizers", "scores", "rng", "metrics")


MANIFEST_FORMAT = "orc_fast.train member-parallel checkpoint"
MANIFEST_VERSION = 1


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, read-only folder, no permission):
    one line naming the path and the cause."""


def write_failure(path, error: BaseException) -> WriteError:
    """The one-line WriteError for ``error`` raised while writing ``path``: the operating
    system's reason, also where torch.save wrapped it in a RuntimeError."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        text = str(error)
        known = [os.strerror(code) for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO)]
        reason = next((k for k in known if k in text), text.strip().splitlines()[-1] if text.strip() else type(error).__name__)
    return WriteError(f"cannot write {path}: {reason}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not belong to this run."""


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(handle)`` on a temp file next to ``path``, fsync, then rename over ``path``.
    A failure leaves ``path`` as it was, removes the temp file and raises WriteError."""
    path = Path(path)
    try:
        _write_atomic(path, write)
    except (OSError, RuntimeError) as error:
        raise write_failure(path, error) from None


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; outputs get the mode any new file would (the umask's).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


def remove_stale_temps(folder) -> None:
    """Delete temp files that a crash in the middle of ``write_atomic`` left behind."""
    if not Path(folder).is_dir():
        return
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def save(path, state: dict) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    write_atomic(path, lambda handle: torch.save(state, handle))


def load(path) -> dict:
    """Read and check a checkpoint; raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    # torch.save writes a zip archive (or, in its legacy format, a pickle): anything else
    # is some other file, and the unpickler's complaint about it would mean nothing.
    if not magic:
        raise CheckpointError(f"checkpoint {path} is empty")
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: torch.save did not write it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means corrupt
        reason = _first_line(error).split(". ")[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an orc_fast.train checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}, this build reads {VERSION}")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------- member-parallel manifests
#
# Under torchrun every rank saves its own members to its own file; a checkpoint is the
# *set* of those files, named by a small JSON manifest that rank 0 writes last, atomically
# (latest.json, best.json). A crash between two ranks' saves therefore leaves the previous
# complete set in force: --resume reads only what a manifest names.


def make_manifest(epoch: int, world_size: int, num_members: int, run_id: str, members, files) -> dict:
    """The manifest of one complete checkpoint set: which rank file holds which members."""
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "epoch": epoch, "world_size": world_size,
        "num_nets": num_members, "run_id": run_id, "members": members, "files": files,
    }


def _write_json(path: Path, value: dict) -> None:
    write_atomic(path, lambda handle: handle.write(json.dumps(value, indent=1).encode()))


def write_manifests(folder, manifest: dict, is_best: bool) -> None:
    """best.json (if best) first, then latest.json (in ``folder``, a RunFolder): a crash in
    between leaves latest.json on the previous complete set, never on a partial one."""
    if is_best:
        _write_json(folder.best_manifest, manifest)
    _write_json(folder.latest_manifest, manifest)


def read_manifests(path: Path, folder):
    """(manifest, best manifest or None, error or None): errors as values, because rank 0
    reads and broadcasts them so that every rank fails alike."""
    if path.suffix != ".json":
        return None, None, (f"under torchrun --resume takes a member-parallel manifest (latest.json or "
                            f"best.json), got {path}")
    if not path.is_file():
        single = path.parent / folder.LATEST
        if single.is_file():
            return None, None, (f"checkpoint {path} does not exist; {single} was written by "
                                f"a single-process run: resume it with python -m orc_fast.train")
        return None, None, f"checkpoint {path} does not exist"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, None, f"checkpoint {path} is corrupt or not a checkpoint ({_first_line(error)})"
    best = None
    try:
        best = json.loads(folder.best_manifest.read_text())
    except (OSError, ValueError):
        pass
    return manifest, (best if isinstance(best, dict) and "files" in best else None), None


def manifest_problem(manifest, path: Path, world_size: int, num_members: int) -> str | None:
    """Why ``manifest`` cannot resume a run of ``world_size`` ranks and ``num_members``
    members; None when it can."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{path} is not an orc_fast.train member-parallel checkpoint"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"checkpoint {path} has format version {manifest.get('version')}, this build reads {MANIFEST_VERSION}"
    if manifest.get("world_size") != world_size:
        return (f"checkpoint {path} was written by {manifest.get('world_size')} ranks, this run has "
                f"{world_size}: resume with {manifest.get('world_size')} ranks in all")
    if manifest.get("num_nets") != num_members:
        return f"checkpoint {path} holds {manifest.get('num_nets')} members, this run has {num_members}"
    files = manifest.get("files")
    if not isinstance(files, list) or len(files) != world_size or not all(isinstance(f, str) for f in files):
        return f"checkpoint {path} is corrupt (bad file list)"
    return None


# ---------------------------------------------------------------------------- RNG


def rng_state(data_generator: torch.Generator) -> dict:
    """All random-number state a run draws from, in weights_only-loadable types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "data": data_generator.get_state(),
    }


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    data_generator.set_state(state["data"])
