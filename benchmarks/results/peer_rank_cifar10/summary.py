"""Validation-only summary of the ranking-score runs in this folder (the choice used nothing else).

    python benchmarks/results/peer_rank_cifar10/summary.py ce accuracy accuracy_m09 ce_s1 accuracy_s1
"""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent

for name in sys.argv[1:]:
    metrics = json.loads((HERE / name / "metrics.json").read_text())
    last = [e for e in metrics["epochs"] if e.get("val_acc")][-1]
    val = [100 * v for v in last["val_acc"]]
    flips = " ".join(f"{e['role_changes']:.2f}" for e in metrics["epochs"])
    print(f"{name:13s} epoch {last['epoch']:2d}  val members {' '.join(f'{v:.1f}' for v in val)}  "
          f"mean {statistics.mean(val):.2f}  val ensemble {100 * last['val_ensemble_acc']:.2f}  "
          f"teacher {' '.join(f'{t:.2f}' for t in last['teacher_fraction'])}  role changes/step by epoch {flips}")
