"""Run the trainer with a fault planted, for the crash-safety and distributed tests.

Nothing in orc_fast knows about these faults: this script plants them by patching, then
runs ``orc_fast.train.main`` with its arguments, as ``python -m orc_fast.train`` would.

    FAULT_CRASH_IN_SAVE=latest.pt:2 python tests/faults.py <trainer flags>
        SIGKILL in the middle of the 2nd write of latest.pt: the temp file written, not
        yet renamed over the old one.
    FAULT_RANK=RANK:STEP:ACTION torchrun ... tests/faults.py <trainer flags>
        on rank RANK, at the start of its STEP-th training step (from 1): kill (SIGKILL
        itself), exit (os._exit(1)) or hang (sleep).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

CRASH_IN_SAVE = "FAULT_CRASH_IN_SAVE"
RANK_FAULT = "FAULT_RANK"


def crash_in_save(spec: str) -> None:
    from orc_fast import checkpoint

    target, _, count = spec.partition(":")
    seen = {"count": 0}
    replace = os.replace

    def crashing_replace(source, destination):
        if Path(destination).name == target:
            seen["count"] += 1
            if seen["count"] == int(count or 1):
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(source, destination)

    checkpoint.os.replace = crashing_replace


def rank_fault(spec: str) -> None:
    from orc_fast.group_step import GroupStep

    fault_rank, step, action = spec.split(":")
    if action not in ("kill", "exit", "hang"):
        raise SystemExit(f"{RANK_FAULT} must be RANK:STEP:kill|exit|hang, got {spec!r}")
    if int(fault_rank) != int(os.environ.get("RANK", 0)):
        return
    call = GroupStep.__call__
    calls = {"count": 0}

    def faulty_call(self, images, target):
        calls["count"] += 1
        if calls["count"] == int(step):
            print(f"{RANK_FAULT}: injecting '{action}'", file=sys.stderr, flush=True)
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "exit":
                os._exit(1)
            while True:  # hang
                time.sleep(60)
        return call(self, images, target)

    GroupStep.__call__ = faulty_call


if __name__ == "__main__":
    if os.environ.get(CRASH_IN_SAVE):
        crash_in_save(os.environ[CRASH_IN_SAVE])
    if os.environ.get(RANK_FAULT):
        rank_fault(os.environ[RANK_FAULT])
    from orc_fast.train import main

    sys.exit(main(sys.argv[1:]))
