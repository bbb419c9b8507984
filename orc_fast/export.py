"""python -m orc_fast.export: a trained member, or the group's ensemble, as one standalone file.

    python -m orc_fast.export runs/mixed --member best --out model.pt2
    python -m orc_fast.export runs/mixed/best.pt --member ensemble --out ensemble.pt2 --onnx ensemble.onnx

The file is a torch.export program (``torch.export.save``): architecture, weights and the
input normalisation in one graph, with a dynamic batch size, and the class names, image
size and statistics in ``orc_fast.json`` inside it. It loads without orc_fast:

    import json, torch
    meta = {"orc_fast.json": ""}
    model = torch.export.load("model.pt2", extra_files=meta).module()
    info = json.loads(meta["orc_fast.json"])    # classes, image_size, mean, std, ...
    logits = model(images)    # float32 [B, 3, S, S], RGB in [0, 1], S = info["image_size"]

Before anything is written, the file's bytes are loaded back and checked against the eager model.
``--onnx FILE`` also writes ONNX (needs the onnx and onnxscript packages). An existing
--out is refused unless --overwrite; bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from . import checkpoint
from .cli import HelpFormatter, Parser, run_main
from .data import DataError
from .errors import UsageError
from .trained import MEMBER_HELP, Classifier, TrainedRun, load_trained, select

PROG = "python -m orc_fast.export"
METADATA = "orc_fast.json"
FORMAT = "orc_fast exported classifier"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CKPT", help="a run folder, a checkpoint (.pt) or a member-parallel manifest (.json)")
    p.add_argument("--member", default="best", help=MEMBER_HELP)
    p.add_argument("--out", required=True, help="the file to write (torch.export program; .pt2 by convention)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="also write the model as ONNX to FILE")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace --out (and --onnx) if they exist")
    return p


def metadata(run: TrainedRun, description: str, index: int | None) -> dict:
    """What a user of the file needs besides the graph, as JSON."""
    final = run.final or {}
    accuracy = {split: (values if index is None or values is None else values[index])
                for split, values in (("test", final.get("ensemble_acc" if index is None else "test_acc")),
                                      ("val", final.get("val_ensemble_acc" if index is None else "val_acc")))}
    return {
        "format": FORMAT, "version": 1,
        "input": f"float32 [B, 3, {run.image_size}, {run.image_size}], RGB in [0, 1]",
        "output": "logits [B, C]" if index is not None else "log of the members' mean softmax [B, C]",
        "classes": run.classes, "image_size": run.image_size, "mean": run.mean.tolist(), "std": run.std.tolist(),
        "model": description, "member": "ensemble" if index is None else index,
        "archs": run.config["archs"] if index is None else [run.config["archs"][index]],
        # The checkpoint's name within its run folder: an absolute path would tell where the
        # file was made and mean nothing where it is used (docs/design.md §5).
        "trained": {"checkpoint": run.path.name, "epoch": run.epoch, "method": run.config["method"],
                    "dataset": run.config["dataset"], "accuracy": accuracy},
    }


def export_program(classifier: Classifier, image_size: int) -> torch.export.ExportedProgram:
    example = torch.rand(2, 3, image_size, image_size)
    try:
        return torch.export.export(classifier.eval(), (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    except Exception as error:  # noqa: BLE001 - any tracing failure: say which, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"torch.export cannot export this model: {first}") from None


def check_reloaded(saved: bytes, classifier: Classifier, image_size: int) -> float:
    """Load the file's bytes as a user would and compare with the eager model: the largest
    absolute difference of their outputs on a random batch of 3."""
    images = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    extra = {METADATA: ""}
    reloaded = torch.export.load(io.BytesIO(saved), extra_files=extra).module()
    if json.loads(extra[METADATA]).get("format") != FORMAT:
        raise UsageError("the exported file lost its metadata; nothing was written")
    with torch.inference_mode():
        return (reloaded(images) - classifier(images)).abs().max().item()


def onnx_bytes(classifier: Classifier, image_size: int) -> bytes:
    """The classifier as an ONNX model (torch.onnx's dynamo exporter, dynamic batch)."""
    example = torch.rand(2, 3, image_size, image_size)
    try:
        program = torch.onnx.export(classifier.eval(), (example,), dynamo=True,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    except Exception as error:  # noqa: BLE001 - any exporter failure: say which, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"ONNX export failed: {first}") from None
    with tempfile.TemporaryDirectory() as folder:  # ONNXProgram.save takes a path only
        staged = Path(folder) / "model.onnx"
        program.save(staged, external_data=False)
        return staged.read_bytes()


def check_outputs(options) -> None:
    """Refuse, before any work, outputs that would overwrite a file or that cannot be made."""
    for flag, value in (("--out", options.out), ("--onnx", options.onnx)):
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder, not a file")
        if path.exists() and not options.overwrite:
            raise UsageError(f"{flag} {path} exists: pick another name or add --overwrite")
    if options.onnx and Path(options.onnx).resolve() == Path(options.out).resolve():
        raise UsageError("--onnx and --out name the same file")
    if options.onnx:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise UsageError(f"--onnx needs the onnx and onnxscript packages ({error.name} is not installed)") from None


def export(options) -> dict:
    check_outputs(options)
    run = load_trained(options.run)
    classifier, description, index = select(run, options.member)
    if run.note:
        print(f"note: {run.note}")
    info = metadata(run, description, index)
    program = export_program(classifier, run.image_size)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA: json.dumps(info)})
    difference = check_reloaded(buffer.getvalue(), classifier, run.image_size)
    if not difference <= 1e-4:
        raise UsageError(f"the exported program does not reproduce the model (largest difference {difference:.3g}); "
                         f"nothing was written")
    onnx = onnx_bytes(classifier, run.image_size) if options.onnx else None
    # Written only now that both exist: a failure above leaves every file as it was.
    out = Path(options.out)
    checkpoint.write_atomic(out, lambda handle: handle.write(buffer.getvalue()))
    print(f"{description} of {run.path} (epoch {run.epoch}) -> {out} ({os.path.getsize(out) / 1e6:.2f} MB; "
          f"reloaded, largest difference from the eager model {difference:.1e})")
    print(f'load it with: torch.export.load("{out}").module(); input {info["input"]}')
    if onnx is not None:
        checkpoint.write_atomic(options.onnx, lambda handle: handle.write(onnx))
        print(f"ONNX -> {options.onnx}")
    return info


def main(argv=None) -> int:
    return run_main(PROG, lambda options: export(build_parser().parse_args(options)), argv,
                    (DataError, checkpoint.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
