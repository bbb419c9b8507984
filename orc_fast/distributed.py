"""Member-parallel group training over torch.distributed (docs/design.md §5).

``torchrun --nproc_per_node=K -m orc_fast.train ...`` spreads the N members over K ranks
in contiguous blocks (N >= K; a rank may own several). Every rank:

* builds all N models from the same seed (so every member starts exactly as in a
  one-process run) and keeps only its own block;
* reads the same batches (same seed, sampler order and augmentation draws);
* forwards its own members, then ``all_gather``s the logits so that it holds the whole
  group's [N, B, C]: the other ranks' blocks detached, its own block with gradient;
* computes the same scores, roles and masks as every other rank (one ``group_kd`` call
  over all N members) and backward()s / steps only its own members.

A member's gradient depends on its own logits and the group's detached logits only, so
the result equals the one-process run with the same seed (tests/test_distributed.py).

Checkpoints: each rank writes its members to ``epochNNNN-<run id>.rank<r>.pt`` (atomic,
orc_fast/checkpoint.py); after a barrier rank 0 writes ``latest.json`` (and ``best.json``),
the manifest naming the epoch and every rank's file, atomically and last. ``--resume``
reads only what a manifest names, so a crash between two ranks' saves leaves the previous
complete set in force; older files are deleted only once a newer manifest is on disk.

Failure: the process group has a timeout (``--dist-timeout``); a collective that loses a
peer (connection closed, or nothing within the timeout) raises ``GroupFailure``, which
the trainer reports in one line before exiting non-zero. (With NCCL a timed-out collective
is caught by NCCL's watchdog, which ends the process instead.) torchrun then stops the
other workers of the job.

Without torchrun's environment (``RANK``/``WORLD_SIZE``) ``setup`` returns
``SingleProcess``, whose hooks do exactly what the trainer always did.
"""

from __future__ import annotations

import datetime
import os
import secrets
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .run_folder import RunFolder


class LaunchError(ValueError):
    """A torchrun launch that cannot work (N < K, a wrong device): one line, exit code 2."""


class GroupFailure(RuntimeError):
    """Another rank died or hung: a collective failed or timed out."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def member_blocks(num_members: int, world_size: int) -> list[range]:
    """Contiguous blocks of member indices, one per rank, sizes differing by at most one."""
    if world_size < 1:
        raise LaunchError(f"world size must be >= 1, got {world_size}")
    if num_members < world_size:
        raise LaunchError(
            f"{num_members} members cannot be spread over {world_size} ranks: member-parallel training "
            f"needs at least one member per rank (raise --num-nets or lower --nproc_per_node)"
        )
    base, extra = divmod(num_members, world_size)
    blocks, start = [], 0
    for rank in range(world_size):
        size = base + (rank < extra)
        blocks.append(range(start, start + size))
        start += size
    return blocks


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ============================================================================ one process


class SingleProcess:
    """The plain ``python -m orc_fast.train`` run: every hook is what the trainer did inline."""

    rank, world_size, is_main = 0, 1, True
    checkpoint_files = "latest.pt, best.pt"

    def describe(self) -> str | None:
        return None

    def settings(self) -> dict:
        """What this placement adds to the run's config: nothing."""
        return {}

    def members(self):
        """The group step's placement (orc_fast/group_step.py): None, every member is here."""
        return None

    def build_models(self, archs, build, device):
        return [build(arch).to(device) for arch in archs]

    def exchange(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def load_checkpoint(self, folder: RunFolder, resume: str):
        path = folder.latest if resume == "latest" else Path(resume)
        manifest = RunFolder(path.parent).latest_manifest
        if not path.is_file() and path.suffix != ".json" and manifest.is_file():
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not exist; {manifest} is a member-parallel checkpoint: "
                f"resume it under torchrun with the ranks that wrote it"
            )
        if path.suffix == ".json":
            raise checkpoint.CheckpointError(
                f"{path} is a member-parallel checkpoint: resume it under torchrun with the ranks that wrote it"
            )
        return path, checkpoint.load(path)

    def save_checkpoint(self, folder: RunFolder, state: dict, is_best: bool) -> None:
        checkpoint.save(folder.latest, state)
        if is_best:
            checkpoint.save(folder.best, state)

    def close(self) -> None:
        pass


# ============================================================================ member-parallel


class MemberParallel:
    """One rank of a torchrun launch: which members it owns, the logits exchange, and
    checkpoints as one consistent set across ranks."""

    def __init__(self, config):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.is_main = self.rank == 0
        self.num_members = config.method.num_nets
        self.blocks = member_blocks(self.num_members, self.world_size)
        self.block = self.blocks[self.rank]
        self.timeout = config.run.dist_timeout
        self.folder = RunFolder(config.run.out)
        self.saved_epoch = None  # last epoch of a complete checkpoint set
        self.latest = self.best = None  # manifests in force (dicts)
        self.checkpoint_files = "latest.json, best.json, epoch*.rank*.pt"

        device = torch.device(config.run.device)
        if device.type == "cuda":
            if device.index is not None and device.index != self.local_rank:
                raise LaunchError(
                    f"under torchrun each rank uses cuda:LOCAL_RANK (here cuda:{self.local_rank}), "
                    f"not --device {config.run.device}: pass --device cuda or auto"
                )
            if self.local_rank >= torch.cuda.device_count():
                raise LaunchError(
                    f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                    f"one rank per GPU (--nproc_per_node at most the GPU count)"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            self.backend = "nccl"
        else:
            self.backend = "gloo"
        if device.type == "cpu" and not config.run.threads:
            # The trainer's default (half the cores) is per machine: share it among this
            # machine's ranks.
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * local_world)))
        self.device = device
        self._collective(
            "start-up (joining the process group)", dist.init_process_group,
            self.backend, timeout=datetime.timedelta(seconds=self.timeout),
            device_id=device if device.type == "cuda" else None,
        )
        # A per-launch id in the checkpoint file names: a relaunch never overwrites a
        # file that a manifest on disk still names.
        token = [secrets.token_hex(4) if self.is_main else None]
        self._collective("start-up", dist.broadcast_object_list, token, 0)
        self.token = token[0]
        if not self.is_main:  # one copy of the log, from rank 0; errors still reach stderr
            sys.stdout = open(os.devnull, "w")

    def describe(self) -> str:
        owned = ", ".join(f"rank {r}: {_span(block)}" for r, block in enumerate(self.blocks))
        return (f"member-parallel over {self.world_size} ranks ({self.backend}, timeout {self.timeout:g}s): "
                f"{owned}")

    # ---------------------------------------------------------------- failure

    def _collective(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RuntimeError as error:  # DistBackendError and gloo's errors are RuntimeErrors
            if self.saved_epoch is None:
                last = "no complete checkpoint was written yet"
            else:
                last = f"the last complete checkpoint is {self.folder.latest_manifest} (epoch {self.saved_epoch})"
            raise GroupFailure(
                f"rank {self.rank}: lost the group during {what} (another rank died, or hung past "
                f"--dist-timeout {self.timeout:g}s): {_first_line(error)}; {last}"
            ) from None

    def barrier(self, what: str) -> None:
        self._collective(what, dist.barrier)

    # ---------------------------------------------------------------- the group

    def build_models(self, archs, build, device):
        """Build every member in order (the global RNG then draws exactly as in one process);
        keep this rank's block on the device."""
        models = []
        for index, arch in enumerate(archs):
            model = build(arch)
            if index in self.block:
                models.append(model.to(device))
            del model
        return models

    def settings(self) -> dict:
        """What this rank adds to the run's config: its device, the world size, the backend."""
        return {"device": str(self.device), "world_size": self.world_size, "dist_backend": self.backend}

    def members(self) -> MemberParallel:
        """The group step's placement: this rank's block of the group (``exchange``, ``local_rows``)."""
        return self

    def local_rows(self, values: torch.Tensor) -> torch.Tensor:
        """The group's per-member values [N] -> this rank's block."""
        return values[self.block.start : self.block.stop]

    def exchange(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's logits [n_r, ...] -> the whole group's [N, ...].

        Blocks may differ in size by one, so every rank sends a block padded to the largest
        size. The result is a torch.cat of the detached gathered blocks and ``local`` itself,
        so gradient flows into this rank's members only.
        """
        largest = max(len(block) for block in self.blocks)
        send = local.detach()
        if len(self.block) < largest:
            send = torch.cat([send, send.new_zeros((largest - len(self.block), *send.shape[1:]))])
        gathered = send.new_empty((self.world_size * largest, *send.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._collective("the logits exchange", gather, gathered, send.contiguous())
        gathered = gathered.view(self.world_size, largest, *send.shape[1:])
        parts = [local if rank == self.rank else gathered[rank, : len(block)] for rank, block in enumerate(self.blocks)]
        return torch.cat(parts)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: RunFolder, state: dict, is_best: bool) -> None:
        """Own members to this rank's file; then (all files on disk) rank 0's manifests; then
        each rank deletes its files that no manifest names any more."""
        epoch = state["epoch"]
        state = {**state, "rank": self.rank, "world_size": self.world_size,
                 "members": [self.block.start, self.block.stop], "run_id": self.token}
        file = folder.rank_file(epoch, self.token, self.rank)
        checkpoint.save(file, state)
        names = [None] * self.world_size
        self._collective("saving checkpoints", dist.all_gather_object, names, file.name)
        manifest = checkpoint.make_manifest(epoch, self.world_size, self.num_members, self.token,
                                            [[block.start, block.stop] for block in self.blocks], names)
        if self.is_main:
            checkpoint.write_manifests(folder, manifest, is_best)
        self.barrier("writing the checkpoint manifest")
        self.latest, self.saved_epoch = manifest, epoch
        if is_best:
            self.best = manifest
        self._delete_unnamed(folder)

    def _delete_unnamed(self, folder: RunFolder) -> None:
        keep = {m["files"][self.rank] for m in (self.latest, self.best) if m and m["world_size"] == self.world_size}
        for path in folder.rank_files(self.rank):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def load_checkpoint(self, folder: RunFolder, resume: str):
        path = folder.latest_manifest if resume == "latest" else Path(resume)
        payload = [None]
        if self.is_main:
            payload[0] = checkpoint.read_manifests(path, folder)
        self._collective("resuming", dist.broadcast_object_list, payload, 0)
        manifest, best, error = payload[0]
        if error is None:
            error = checkpoint.manifest_problem(manifest, path, self.world_size, self.num_members)
        state = None
        if error is None:
            file = path.parent / manifest["files"][self.rank]
            try:
                state = checkpoint.load(file)
                expected = {"epoch": manifest["epoch"], "rank": self.rank, "world_size": self.world_size,
                            "members": [self.block.start, self.block.stop], "run_id": manifest["run_id"]}
                wrong = [k for k, v in expected.items() if state.get(k) != v]
                if wrong:
                    error = f"checkpoint {file} does not belong to {path} (its {wrong[0]} is {state.get(wrong[0])!r})"
            except checkpoint.CheckpointError as failure:
                error = str(failure)
        errors = [None] * self.world_size
        self._collective("resuming", dist.all_gather_object, errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise checkpoint.CheckpointError(first)
        self.latest, self.best, self.saved_epoch = manifest, best, manifest["epoch"]
        return path, state

    def close(self) -> None:
        if dist.is_initialized():
            self.barrier("shutting down")
            dist.destroy_process_group()


def _span(block: range) -> str:
    return f"member {block.start}" if len(block) == 1 else f"members {block.start}-{block.stop - 1}"


def setup(config):
    """The run's placement: ``MemberParallel`` under torchrun, else ``SingleProcess``.

    Under torchrun this joins the process group and may update ``config`` (the rank's
    device, world size, backend).
    """
    if not launched_by_torchrun():
        return SingleProcess()
    return MemberParallel(config)
