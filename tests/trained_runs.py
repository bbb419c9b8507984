"""A small trained digits run for the evaluate and export tests, and how to read its results.

2 x resnet8, 1000 training images (100 of them the validation split), 2 epochs: about
70 % test accuracy in a few seconds on one CPU thread, far enough from chance that a
wrong normalisation or label mapping shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from orc_fast.train import main as train_main

RUN = ["--num-nets", "2", "--train-subset", "1000", "--batch-size", "32", "--epochs", "2", "--threads", "1",
       "--progress", "off", "--seed", "1"]
TEST_IMAGES = 360  # the digits test split


def train_run(out: Path, *extra: str) -> Path:
    assert train_main(RUN + ["--out", str(out), *extra]) == 0
    return out


def final(out: Path) -> dict:
    """metrics.json's ``final`` of the run in ``out``."""
    return json.loads((Path(out) / "metrics.json").read_text())["final"]


def correct_count(accuracy: float) -> int:
    """A test accuracy as the number of test images it means."""
    return round(accuracy * TEST_IMAGES)
