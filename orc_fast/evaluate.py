"""python -m orc_fast.evaluate: top-1 accuracy of a trained member, or of the group's ensemble.

    python -m orc_fast.evaluate runs/mixed                      # the best member, the run's own test split
    python -m orc_fast.evaluate runs/mixed/best.pt --member ensemble --per-class
    python -m orc_fast.evaluate runs/mixed --member 2 --data ../photos/test   # any folder of class folders

RUN_OR_CKPT is a run folder (its latest.pt, or latest.json after torchrun), a checkpoint
or a member-parallel manifest. --data is a dataset the trainer knows (digits, cifar10,
cifar100, imagefolder with --data-dir; its test split) or a folder of class folders
(FOLDER/<class>/*), whose class names must be among the run's. Images are resized and
normalised as in training (the checkpoint's statistics). Bad input ends with a one-line
error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import checkpoint
from .cli import HelpFormatter, Parser, run_main
from .data import DATASETS, DataError, load_class_folders, load_dataset
from .errors import UsageError
from .trained import MEMBER_HELP, TrainedRun, load_trained, select

PROG = "python -m orc_fast.evaluate"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CKPT", help="a run folder, a checkpoint (.pt) or a member-parallel manifest (.json)")
    p.add_argument("--member", default="best", help=MEMBER_HELP)
    p.add_argument("--data", default=None, help=f"{', '.join(DATASETS)} (its test split) or a folder of class folders "
                   f"(default: the run's own dataset)")
    p.add_argument("--data-dir", default=None, help="where a cifar10/cifar100/imagefolder --data lives (default: the run's)")
    p.add_argument("--per-class", action=argparse.BooleanOptionalAction, default=False, help="also print each class's accuracy")
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward (memory only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p


def evaluation_data(options, run: TrainedRun, log=print) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(what was read, uint8 images [N, 3, S, S] at the run's image size, labels [N] as indices
    into the run's classes)."""
    name = options.data or run.config["dataset"]
    if name in DATASETS:
        own = name == run.config["dataset"]
        data_dir = options.data_dir or (run.config.get("data_dir") if own else None)
        dataset = load_dataset(name, data_dir, False, run.image_size, 0, "cpu", log=log)
        where, classes, images, labels = f"{name} test split", dataset.classes, dataset.test_images, dataset.test_labels
    else:
        if options.data_dir:
            raise UsageError(f"--data-dir goes with a dataset name for --data; {options.data} is a folder")
        where = str(options.data)
        if any((Path(where) / split).is_dir() for split in ("train", "test")) and not {"train", "test"} & set(run.classes):
            raise DataError(f"{where} holds train/ or test/ folders: pass {Path(where) / 'test'} (a folder of class "
                            f"folders), or --data imagefolder --data-dir {where}")
        classes, images, labels = load_class_folders(where, run.image_size, log)
    unknown = [c for c in classes if c not in run.classes]
    if unknown:
        raise DataError(f"{where} has classes the run was not trained on: {', '.join(unknown[:5])} "
                        f"(it knows {', '.join(run.classes[:10])}{', ...' if len(run.classes) > 10 else ''})")
    to_run = torch.tensor([run.classes.index(c) for c in classes], dtype=torch.long)
    return f"{where} ({len(labels)} images)", images, to_run[labels]


@torch.inference_mode()
def predict(classifier, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted class indices [N] of uint8 images [N, 3, S, S]."""
    classifier = classifier.to(device).eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float().div_(255.0)
        predictions.append(classifier(batch).argmax(-1).cpu())
    return torch.cat(predictions)


def report(run: TrainedRun, description: str, where: str, predictions, labels, per_class: bool) -> dict:
    """Print top-1 (and per-class accuracy); return them."""
    correct = predictions == labels
    top1 = correct.float().mean().item()
    print(f"{description} on {where}: top-1 {100 * top1:.2f}% ({int(correct.sum())}/{len(labels)})")
    result = {"top1": top1, "per_class": {}}
    if per_class:
        for index, name in enumerate(run.classes):
            mask = labels == index
            if mask.any():
                hits, count = int(correct[mask].sum()), int(mask.sum())
                result["per_class"][name] = hits / count
                print(f"  class {name}: {100 * hits / count:6.2f}% ({hits}/{count})")
    return result


def evaluate(options) -> dict:
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {options.threads}")
    try:
        device = torch.device(options.device)
    except RuntimeError:
        raise UsageError(f"unknown --device {options.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {options.device} asked for, but CUDA is not available here")
    if options.threads:
        torch.set_num_threads(options.threads)
    run = load_trained(options.run)
    classifier, description, _ = select(run, options.member)
    config = run.config
    print(f"{run.path}: epoch {run.epoch} of {config['method']} on {config['dataset']}, "
          f"{len(config['archs'])} members ({', '.join(config['archs'])})")
    if run.note:
        print(f"note: {run.note}")
    where, images, labels = evaluation_data(options, run)
    return report(run, description, where, predict(classifier, images, options.batch_size, device), labels, options.per_class)


def main(argv=None) -> int:
    return run_main(PROG, lambda options: evaluate(build_parser().parse_args(options)), argv,
                    (DataError, checkpoint.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
