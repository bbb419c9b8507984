"""python -m orc_fast.train: train a group of networks with ORC, or a baseline.

ORC ("Network Group-based Knowledge Distillation using Online Role Change", Choi et al.,
ICCV 2023; docs/design.md §2): every step the best-scoring members become teachers,
refine themselves on the students' error images, and the students distil from the
teachers' mean tempered distribution. With ``--pivot`` (the paper's main setting) a
pre-trained member of an earlier run stays in the teacher group and the best-ranked
students are promoted into it each step. Baselines in the same engine, each at its
published settings: ``independent``, ``kd`` (Hinton KD from the pivot), ``dml`` (Deep
Mutual Learning) and ``kdcl`` (KDCL's MinLogit group teacher).

    python -m orc_fast.train                      # 4 x resnet8 on digits, 10 epochs, ~1 min on 2 cores
    python -m orc_fast.train --method independent --num-nets 1 --arch resnet20 --out runs/pivot
    python -m orc_fast.train --pivot runs/pivot   # pivot mode: 4 x resnet8 students, the resnet20 teaches
    python -m orc_fast.train --config configs/cifar100_orc.yaml --data-dir data --download
    python -m orc_fast.train --dataset imagefolder --data-dir ../shared/data/cifar10 \\
        --arch resnet32,resnet20,wrn_16_2,vgg8 --epochs 30 --out runs/mixed

Writes to --out: metrics.json, latest.pt / best.pt (atomic), curves.png. Bad input
(unknown names, missing or inconsistent data, a wrong checkpoint) ends with a one-line
error and exit code 2 before anything in --out is touched.

The file reads top to bottom: command line, data and models, the training loop (the
step itself is ``orc_fast.orc.GroupStep``), evaluation, outputs.
"""

from __future__ import annotations

import argparse
import json
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
from .backends import BACKENDS, resolve_backend
from .cuda_graphs import CUDA_GRAPH_WARMUP, CudaGraphStep
from .data import DATASETS, DataError, load_dataset, steps_per_epoch, test_batches, train_batches
from .guard import NAN_POLICIES, NonFiniteGuard, NonFiniteLoss, start_momentum
from .models import MODELS, build_model
from .observe import EpochLog, TensorBoardLog
from .orc import METHOD_DEFAULTS, METHODS, PIVOT_METHODS, RANK_BY, GroupStep, StepConfig, loss_form
from .pivot import load_pivot, pivot_path
from .precision import PRECISIONS, autocast, default_channels_last, memory_format, resolve_precision
from .reference import ERROR_RULES
from .strategies import STRATEGIES

PROG = "python -m orc_fast.train"


class UsageError(ValueError):
    """Bad command-line or config input: reported in one line, exit code 2."""


# ============================================================================ command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none or the help already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other input error here
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


# A refined pivot starts trained: at the group's own lr (scale 1) it first lost 10 points on
# CIFAR-10 and the students' validation accuracy was lower (docs/design.md §2, pivot mode).
PIVOT_LR_SCALE = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of flag values (keys as flag names); CLI flags override it")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="orc", help="orc, or a baseline, each at its published "
                   "settings: independent (CE only), kd (0.1 CE + 0.9 tau^2 KL to the --pivot, tau 4), dml (CE + KL "
                   "to the mean of the other members, tau 1), kdcl (CE + tau^2 KL to KDCL's MinLogit group "
                   "teacher, tau 2)")
    g.add_argument("--pivot", metavar="CHECKPOINT", default=None,
                   help="pivot mode: a best.pt/latest.pt (or run folder) of an earlier run of this trainer whose "
                   "member (--pivot-member) stays in the teacher group all run; the --num-nets members are the "
                   "students. Needed by --method kd")
    g.add_argument("--pivot-member", type=int, default=None, metavar="I",
                   help="which member of --pivot's run (default: its best member on its validation split)")
    g.add_argument("--promote", type=int, default=None, metavar="P",
                   help="pivot mode: the P best-ranked students join the teacher group each step, in [0, N-1] "
                   "(default 1)")
    g.add_argument("--freeze-pivot", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the pivot fixed (eval mode, no updates); default: orc refines it on the students' "
                   "error images, kd always keeps it fixed")
    g.add_argument("--pivot-lr-scale", type=float, default=None, metavar="S",
                   help="orc with a refined pivot: its learning rate is S times the group's, on the same "
                   f"schedule (the pivot starts trained; default {PIVOT_LR_SCALE:g})")
    g.add_argument("--arch", default="resnet8", help=f"one arch for a homogeneous group or a comma list for a mixed "
                   f"one; known: {', '.join(MODELS)}")
    g.add_argument("--num-nets", type=int, default=None, help="group size N (default: 4, or the length of an --arch list)")
    g.add_argument("--teacher-size", type=int, default=None, help="ORC teacher-group size k in [1, N-1] (default N // 2)")
    g.add_argument("--temperature", type=float, default=None, help="KD temperature tau (default: the method's own)")
    g.add_argument("--alpha", type=float, default=None,
                   help="KD weight of the members that distil: (1-alpha) CE + alpha tau^2 KL (default: the method's own)")
    g.add_argument("--ce-weight", type=float, default=None,
                   help="with --kd-weight: w_ce CE + w_kd tau^2 KL instead of the alpha form")
    g.add_argument("--kd-weight", type=float, default=None, help="see --ce-weight")
    g.add_argument("--error-rule", choices=ERROR_RULES, default="any",
                   help="an error image is one the student group gets wrong: any / all / majority of the students, "
                   "or the students' ensemble")
    g.add_argument("--error-weight", type=float, default=1.0, help="lambda_err: weight of the teachers' CE on error images")
    g.add_argument("--error-mixup", action=argparse.BooleanOptionalAction, default=None,
                   help="teachers' error term on error images mixed with random batch images (one more forward; "
                   "default: on in pivot mode, off in peer mode)")
    g.add_argument("--mixup-alpha", type=float, default=1.0, help="mixup lambda ~ Beta(a, a)")
    g.add_argument("--refresh-teachers", action=argparse.BooleanOptionalAction, default=False,
                   help="teachers step first and students distil from their updated logits (one more forward)")
    g.add_argument("--rank-momentum", type=float, default=0.0,
                   help="rank members by an EMA of their batch score with this momentum (0: this batch only)")
    g.add_argument("--rank-by", choices=RANK_BY, default=None,
                   help="a member's batch score: its mean cross-entropy, or its top-1 error, blind to confidence "
                   "(default: accuracy in peer mode, ce in pivot mode)")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="group-KD loss backend")
    g.add_argument("--nan-policy", choices=NAN_POLICIES, default="stop",
                   help="a NaN/inf member loss: stop (error naming member and step; the last checkpoint stays the "
                   "last good one) or skip-step (that group step updates no member; counted per epoch)")
    g.add_argument("--max-skipped-steps", type=int, default=None, metavar="K",
                   help="with --nan-policy skip-step: end the run with an error (exit 1, the last checkpoint kept) "
                   "once more than K steps in all were skipped (default: a tenth of an epoch's steps, at least 1)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (bundled with scikit-learn), cifar10, cifar100 (torchvision), imagefolder "
                   "(--data-dir D with D/train/<class>/*, D/test/<class>/*)")
    g.add_argument("--data-dir", default=None, help="where cifar10/cifar100/imagefolder data lives")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download cifar10/cifar100 into --data-dir if missing")
    g.add_argument("--image-size", type=int, default=0,
                   help="images are resized to this square size (0: 32, the CIFAR models' input; 16 for digits, "
                   "whose 8x8 images gain nothing from more and train 4x faster)")
    g.add_argument("--train-subset", type=int, default=0,
                   help="train on a class-balanced subset of this many images (the same for every seed; 0: all)")
    g.add_argument("--val-split", type=int, default=-1,
                   help="hold this many class-balanced training images out as the validation split, which picks "
                   "best.pt and the best member (-1: 10%% of the training images, at most 5,000; 0: none, and no "
                   "best.pt); the test set is only reported")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (4-pixel zero padding) and horizontal flip (not for digits), on the device")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="training epochs (the lr schedule spans them)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="training images per step, the same batch for every member (a last partial batch is dropped)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (every member)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (L2, every parameter)")
    g.add_argument("--schedule", choices=("step", "cosine"), default="cosine",
                   help="cosine: per-step cosine decay to 0; step: multiply by --lr-decay at each milestone")
    g.add_argument("--milestones", default="",
                   help="comma list of epochs for --schedule step (default: 62.5%%, 75%%, 87.5%% of --epochs)")
    g.add_argument("--lr-decay", type=float, default=0.1, help="--schedule step: lr factor at each milestone")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--strategy", choices=STRATEGIES, default="sequential",
                   help="how each step runs the members (same mathematics): sequential; streams (one CUDA stream "
                   "each; sequential on CPU); fused (same-architecture members as one wide model, torch.func); "
                   "auto (times a few real steps of each, keeps the fastest)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the members' forward (and so their backward); the first steps compile")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="training and evaluation precision: forwards under autocast in bf16 or fp16 (fp16 with a "
                   "dynamic loss scale), the loss and the weights in fp32; auto: bf16 on CUDA sm_80+ and on CPUs "
                   "with AMX/AVX512-BF16, else fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="models and batches in channels-last memory format (default: where it measured faster: "
                   "CUDA; CPU in fp32; CPU bf16 with AMX)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the whole group step in a CUDA graph after 3 warm-up steps (CUDA only)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the members' initialisation, batch order and augmentation (not the data splits, "
                   "which are fixed)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: half the cores on a CPU run: small convolutions gain little "
                   "from more, and OpenMP threads stall badly on a busy machine)")
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<method>_<dataset>_<date-time>, new for every run)")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="start afresh in an --out folder that holds a run (its files are replaced); without it, "
                   "such a folder is refused unless --resume")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out>/latest.pt); the model/data flags must match, "
                   "and a changed schedule or loss flag is refused unless --resume-changes")
    g.add_argument("--resume-changes", action=argparse.BooleanOptionalAction, default=False,
                   help="with --resume: accept changed schedule, optimiser or loss flags (--epochs, --lr, --alpha, "
                   "...); the rest of the run uses the new values and the run prints what changed")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this epoch (the schedule still runs to --epochs; continue with --resume)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs (and always the last)")
    g.add_argument("--eval-batch-size", type=int, default=1000,
                   help="images per forward when measuring accuracy (memory only; results are the same)")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="per-epoch progress bar on stderr (auto: when stderr is a terminal)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="write TensorBoard scalars (per step: each member's loss, CE, KD term, role, and the lr; "
                   "per epoch: accuracies, teacher shares, role changes, images/s) to <out>/tensorboard")
    g.add_argument("--log-dir", default=None, metavar="DIR",
                   help="write the TensorBoard scalars to DIR instead (implies --tensorboard)")
    g.add_argument("--dist-timeout", type=float, default=120.0,
                   help="under torchrun: seconds a rank waits for the others in a collective before the run stops "
                   "with an error (a dead or hung rank); must exceed the longest gap between steps")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with --config's YAML values as defaults that the command line overrides."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config(known.config, parser))
    return parser.parse_args(argv)


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml

    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as error:
        raise UsageError(f"cannot read --config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of flag names to values")
    return flag_values(values, parser, f"--config {path}")


def flag_values(values: dict, parser: argparse.ArgumentParser, where: str, refused: dict | None = None) -> dict:
    """A mapping of flag names (``--config`` keys, a protocol's, orc_fast/compare.py) checked
    against the parser and converted: {dest: value}. ``refused``: {dest: why} for flags the
    caller sets itself. A bad key or value is a UsageError that names it and ``where``."""
    actions = {a.dest: a for a in parser._actions}
    refused = refused or {}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest in refused:
            raise UsageError(f"{where}: key {key!r} {refused[dest]}")
        if dest not in actions or dest in ("help", "config"):
            raise UsageError(f"{where}: unknown key {key!r}")
        action = actions[dest]
        if dest == "arch" and isinstance(value, list):
            value = ",".join(map(str, value))
        if dest == "milestones" and isinstance(value, list):
            value = ",".join(map(str, value))
        try:
            if isinstance(action, argparse.BooleanOptionalAction):
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif value is not None and action.type is not None:
                value = action.type(value)
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
        except (TypeError, ValueError) as error:
            raise UsageError(f"{where}: bad value {value!r} for {key!r} ({error})") from None
        defaults[dest] = value
    return defaults


def resolve(args: argparse.Namespace) -> dict:
    """Check the flags against each other; the run's full configuration as a plain dict."""
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in MODELS]
    if not archs or unknown:
        raise UsageError(f"unknown arch {', '.join(unknown) or repr(args.arch)}; known: {', '.join(MODELS)}")
    if args.num_nets is not None and args.num_nets < 1:
        raise UsageError(f"--num-nets must be >= 1, got {args.num_nets}")
    unused = unused_flags(args)
    if unused:
        raise UsageError(f"--method {args.method} does not use {', '.join(unused)}"
                         + (" (CE only)" if args.method == "independent" else " (they belong to --method orc)"))
    if len(archs) == 1:
        num_nets = 4 if args.num_nets is None else args.num_nets
        archs = archs * num_nets
    elif args.num_nets is not None and args.num_nets != len(archs):
        raise UsageError(f"--num-nets {args.num_nets} does not match the {len(archs)} archs given in --arch")
    num_nets = len(archs)
    minimum = 1 if args.method in ("independent", "kd") else 2
    if num_nets < minimum:
        raise UsageError(f"--method {args.method} needs at least {minimum} networks, got --num-nets {num_nets}")
    pivot = pivot_settings(args, num_nets)
    teacher_size = None  # pivot mode promotes --promote students instead
    if not pivot["pivot"]:
        teacher_size = num_nets // 2 if args.teacher_size is None else args.teacher_size
        if args.method == "orc" and not 1 <= teacher_size <= num_nets - 1:
            raise UsageError(f"--teacher-size must lie in [1, N-1] = [1, {num_nets - 1}], got {teacher_size}")
    checks = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (args.error_weight >= 0, f"--error-weight must be >= 0, got {args.error_weight}"),
        (args.mixup_alpha > 0, f"--mixup-alpha must be > 0, got {args.mixup_alpha}"),
        (0 <= args.rank_momentum < 1, f"--rank-momentum must lie in [0, 1), got {args.rank_momentum}"),
        (args.eval_every >= 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (args.stop_after >= 0, f"--stop-after must be >= 0, got {args.stop_after}"),
        (args.threads >= 0, f"--threads must be >= 0, got {args.threads}"),
        (args.train_subset >= 0, f"--train-subset must be >= 0, got {args.train_subset}"),
        (args.val_split >= -1, f"--val-split must be >= 0 (or -1 for 10%), got {args.val_split}"),
        (args.dist_timeout > 0, f"--dist-timeout must be > 0, got {args.dist_timeout}"),
        (args.max_skipped_steps is None or args.nan_policy == "skip-step",
         "--max-skipped-steps needs --nan-policy skip-step (under stop, the first bad step ends the run)"),
        (args.max_skipped_steps is None or args.max_skipped_steps >= 0,
         f"--max-skipped-steps must be >= 0, got {args.max_skipped_steps}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        milestones = sorted(int(m) for m in args.milestones.split(",") if m.strip())
    except ValueError:
        raise UsageError(f"--milestones must be a comma list of epochs, got {args.milestones!r}") from None
    if not milestones:
        milestones = sorted({round(args.epochs * f) for f in (0.625, 0.75, 0.875)})
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    except RuntimeError:
        raise UsageError(f"unknown --device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but CUDA is not available here")
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    if args.cuda_graphs and pivot["error_mixup"]:
        raise UsageError("--cuda-graphs cannot capture --error-mixup (its mixing weight is drawn on the host each step)")
    precision, precision_reason = resolve_precision(args.precision, device)
    channels_last = default_channels_last(device, precision) if args.channels_last is None else args.channels_last
    try:
        backend = resolve_backend(args.backend, device)
    except Exception as error:  # noqa: BLE001 - unavailable backend is a usage problem
        raise UsageError(str(error)) from None
    config = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "progress")}
    config.update(loss_settings(args))
    config.update(pivot)
    config.update(
        image_size=args.image_size or (16 if args.dataset == "digits" else 32),
        archs=archs, num_nets=num_nets, teacher_size=teacher_size, milestones=milestones,
        device=str(device), backend_used=backend,
        precision=precision, precision_reason=precision_reason, channels_last=channels_last,
        out=args.out or f"runs/{args.method}_{args.dataset}_{time.strftime('%Y%m%d-%H%M%S')}",
    )
    config["log_dir"] = args.log_dir or (str(Path(config["out"]) / "tensorboard") if args.tensorboard else None)
    check_out_folder(Path(config["out"]), resuming=bool(args.resume), overwrite=args.overwrite)
    args.out = config["out"]  # the folder a Ctrl-C message names (main)
    return config


def pivot_settings(args: argparse.Namespace, num_nets: int) -> dict:
    """Pivot mode's flags checked against the method: {pivot, pivot_member, promote,
    freeze_pivot, pivot_lr_scale, error_mixup, rank_by}. The checkpoint itself is read later (orc_fast/pivot.py), when
    the data's class count is known."""
    peer_only = [f for f, v in (("--pivot-member", args.pivot_member), ("--promote", args.promote),
                                ("--freeze-pivot", args.freeze_pivot), ("--pivot-lr-scale", args.pivot_lr_scale))
                 if v is not None]
    if args.pivot is None:
        if args.method == "kd":
            raise UsageError("--method kd distils from a pre-trained pivot: give --pivot CHECKPOINT")
        if peer_only:
            raise UsageError(f"{', '.join(peer_only)} needs --pivot CHECKPOINT")
        # Peer mode ranks by top-1 error: ranked by CE the teachers kept the lowest CE and the
        # roles froze (docs/design.md §2, step 2).
        return {"pivot": None, "pivot_member": None, "promote": None, "freeze_pivot": None, "pivot_lr_scale": None,
                "error_mixup": bool(args.error_mixup),
                "rank_by": (args.rank_by or "accuracy") if args.method == "orc" else None}
    if args.method not in PIVOT_METHODS:
        raise UsageError(f"--pivot works with --method {' or '.join(PIVOT_METHODS)}, not {args.method}")
    if args.teacher_size is not None:
        raise UsageError("--teacher-size is for peer mode; with --pivot, --promote P students join the pivot")
    if args.refresh_teachers:
        raise UsageError("--refresh-teachers is for peer mode, not with --pivot")
    if distributed.launched_by_torchrun():
        raise UsageError("--pivot does not run member-parallel under torchrun yet; run it in one process")
    if args.pivot_member is not None and args.pivot_member < 0:
        raise UsageError(f"--pivot-member must be >= 0, got {args.pivot_member}")
    try:
        path = str(pivot_path(args.pivot))
    except checkpoint.CheckpointError as error:
        raise UsageError(str(error)) from None
    if args.method == "kd":
        if args.promote is not None:
            raise UsageError("--promote is for --method orc; kd distils every member from the pivot alone")
        if args.freeze_pivot is False or args.pivot_lr_scale is not None:
            flag = "--no-freeze-pivot" if args.freeze_pivot is False else "--pivot-lr-scale"
            raise UsageError(f"--method kd keeps the pivot fixed (Hinton KD): drop {flag}")
        return {"pivot": path, "pivot_member": args.pivot_member, "promote": None, "freeze_pivot": True,
                "pivot_lr_scale": None, "error_mixup": False, "rank_by": None}
    promote = 1 if args.promote is None else args.promote
    if not 0 <= promote <= num_nets - 1:
        raise UsageError(f"--promote must lie in [0, N-1] = [0, {num_nets - 1}], got {promote}")
    if args.pivot_lr_scale is not None and args.freeze_pivot:
        raise UsageError("--pivot-lr-scale sets a refined pivot's learning rate: drop it or --freeze-pivot")
    if args.pivot_lr_scale is not None and not args.pivot_lr_scale > 0:
        raise UsageError(f"--pivot-lr-scale must be > 0, got {args.pivot_lr_scale:g} (--freeze-pivot keeps it fixed)")
    return {"pivot": path, "pivot_member": args.pivot_member, "promote": promote,
            "freeze_pivot": bool(args.freeze_pivot),
            "pivot_lr_scale": None if args.freeze_pivot else (args.pivot_lr_scale or PIVOT_LR_SCALE),
            "error_mixup": args.error_mixup is not False, "rank_by": args.rank_by or "ce"}


# Flags that only some methods read: another method would silently ignore them.
ORC_ONLY = ("teacher_size", "error_rule", "error_weight", "error_mixup", "mixup_alpha", "refresh_teachers", "rank_momentum",
            "rank_by")
DISTILLATION_ONLY = ("temperature", "alpha", "ce_weight", "kd_weight")


def unused_flags(args: argparse.Namespace) -> list[str]:
    """The flags set away from their defaults that --method does not read."""
    unused = (ORC_ONLY if args.method != "orc" else ()) + (DISTILLATION_ONLY if args.method == "independent" else ())
    parser = build_parser()
    def given(dest):  # a --no-flag whose default is None (the method decides) says nothing either
        value, default = getattr(args, dest), parser.get_default(dest)
        return value != default and not (default is None and value is False)

    return ["--" + dest.replace("_", "-") for dest in unused if given(dest)]


RUN_FILES = ("metrics.json", "latest.pt", "best.pt", "latest.json", "best.json")


def check_out_folder(out: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file, or that holds a run this one would
    overwrite (unless --resume continues it or --overwrite says so)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if resuming or overwrite or not out.is_dir():
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held:
        raise UsageError(f"--out {out} already holds a run ({', '.join(held)}): continue it with --resume, "
                         f"replace it with --overwrite, or pick another --out")


def loss_settings(args: argparse.Namespace) -> dict:
    """The method's temperature and loss weights (METHOD_DEFAULTS), with the flags' overrides:
    --ce-weight/--kd-weight (both), else --alpha (s = 1), else the method's own weights."""
    defaults = METHOD_DEFAULTS[args.method]
    temperature = defaults.temperature if args.temperature is None else args.temperature
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    if (args.ce_weight is None) != (args.kd_weight is None):
        raise UsageError("--ce-weight and --kd-weight go together: give both")
    if args.ce_weight is not None and args.alpha is not None:
        raise UsageError("give either --alpha or --ce-weight/--kd-weight, not both")
    if args.alpha is not None:
        if not 0 <= args.alpha <= 1:
            raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
        scale, alpha = 1.0, args.alpha
    else:
        weights = (defaults.ce_weight, defaults.kd_weight) if args.ce_weight is None else (args.ce_weight, args.kd_weight)
        try:
            scale, alpha = loss_form(*weights)
        except ValueError as error:
            raise UsageError(f"--ce-weight/--kd-weight: {error}") from None
    overridden = [f for f, v in (("--temperature", args.temperature), ("--alpha", args.alpha),
                                 ("--ce-weight/--kd-weight", args.ce_weight)) if v is not None]
    return {"temperature": temperature, "alpha": alpha, "kd_scale": scale, "loss_overrides": overridden,
            "loss_source": defaults.source}


def learning_rate(config: dict, epoch: int, step: int, steps: int) -> float:
    if config["schedule"] == "cosine":
        progress = (epoch + step / steps) / config["epochs"]
        return config["lr"] * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config["lr"] * config["lr_decay"] ** sum(epoch >= m for m in config["milestones"])


# ============================================================================ evaluation


@torch.inference_mode()
def evaluate(models, dataset, batch_size: int, exchange=None, split: str = "test", precision: str = "fp32",
             channels_last: bool = False) -> tuple[list[float], float]:
    """Top-1 of every member and of the group ensemble (mean softmax) on ``split`` (test or
    val), as fractions, with the run's precision and memory format.

    ``exchange`` (member-parallel runs) turns this rank's members' logits into the group's.
    """
    for model in models:
        model.eval()
    correct, ensemble_correct = 0, 0
    for images, labels in test_batches(dataset, batch_size, split):
        images = images.contiguous(memory_format=memory_format(channels_last))
        with autocast(precision, images.device):
            logits = torch.stack([model(images) for model in models]).float()
        if exchange is not None:
            logits = exchange(logits)
        correct = correct + (logits.argmax(-1) == labels).sum(1)
        ensemble_correct = ensemble_correct + (logits.softmax(-1).mean(0).argmax(-1) == labels).sum()
    count = len(getattr(dataset, f"{split}_labels"))
    return [c / count for c in correct.tolist()], ensemble_correct.item() / count


def pivot_accuracy(group, dataset, batch_size: int, config: dict) -> dict:
    """The pivot's own test (and validation) top-1: a refined pivot moves during the run."""
    how = {"precision": config["precision"], "channels_last": config["channels_last"]}
    test = evaluate([group.pivot], dataset, batch_size, **how)[0][0]
    val = evaluate([group.pivot], dataset, batch_size, split="val", **how)[0][0] if config["val_size"] else None
    return {"pivot_test_acc": test, "pivot_val_acc": val}


# ============================================================================ terminal


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


def percent(values) -> str:
    return " ".join(f"{100 * v:5.2f}" for v in values)


# ============================================================================ the run


def save_outputs(out: Path, metrics: dict) -> None:
    checkpoint.write_atomic(out / "metrics.json", lambda h: h.write(json.dumps(metrics, indent=1).encode()))
    try:
        from .plot import plot_metrics

        plot_metrics(metrics, out / "curves.png")
    except Exception as error:  # noqa: BLE001 - a plotting problem must not kill training
        print(f"warning: could not draw {out / 'curves.png'}: {error}")


def complete_outputs(out: Path, metrics: dict, placement) -> None:
    """Rewrite metrics.json (and the plot) when the one on disk holds fewer epochs than the
    checkpoint the run resumed from: the save order is checkpoint first, metrics second."""
    try:
        written = len(json.loads((out / "metrics.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        written = -1
    if placement.is_main and written < len(metrics["epochs"]):
        save_outputs(out, metrics)


# What a checkpoint's run must share with the run that resumes it: the group, the data and
# the random streams (a resumed run continues the saved ones, so --seed cannot change) ...
RESUME_FIXED = ("archs", "method", "dataset", "image_size", "train_subset", "val_split", "teacher_size", "num_classes",
                "seed", "pivot_arch", "promote", "freeze_pivot", "precision")
# What a checkpoint written before a key was recorded ran with (peer mode ranked by CE then).
BEFORE_RECORDED = {"precision": "fp32", "rank_by": "ce"}
# ... and what it may change only when --resume-changes says so: the schedule, the optimiser
# and the loss (a changed --epochs moves the cosine schedule under the run's feet).
RESUME_CHANGEABLE = ("epochs", "batch_size", "lr", "schedule", "milestones", "lr_decay", "momentum", "weight_decay",
                     "augment", "temperature", "alpha", "kd_scale", "error_rule", "error_weight", "error_mixup",
                     "mixup_alpha", "refresh_teachers", "rank_momentum", "rank_by", "pivot_lr_scale")


def check_resumable(state: dict, config: dict, path) -> None:
    """The checkpoint must come from a run with the same group, data, method and seed, and the
    same schedule and loss unless --resume-changes (then the changes are printed and recorded
    in the config)."""
    saved = state["config"]
    for key in RESUME_FIXED:
        before = saved.get(key, BEFORE_RECORDED.get(key))
        if before != config.get(key):
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not match this run: {key} was {before!r}, now {config.get(key)!r}"
            )
    # A key an older checkpoint did not record cannot be compared unless its old value is
    # known; one this run does not read (None: another method or mode) is no change.
    changes = {}
    for key in RESUME_CHANGEABLE:
        before, now = saved.get(key, BEFORE_RECORDED.get(key)), config.get(key)
        if (key in saved or key in BEFORE_RECORDED) and now is not None and before != now:
            changes[key] = [before, now]
    described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if changes and not config.get("resume_changes"):
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was trained with other settings ({described}); add --resume-changes to continue "
            f"with the new values, or resume with the old ones"
        )
    if config["epochs"] < state["epoch"]:
        raise checkpoint.CheckpointError(f"--epochs {config['epochs']} is fewer than the {state['epoch']} epochs "
                                         f"checkpoint {path} has trained")
    history = saved.get("changed_on_resume", []) + ([{"epoch": state["epoch"], "changes": changes}] if changes else [])
    if history:
        config["changed_on_resume"] = history
    if changes:
        print(f"resuming with changed settings: {described}")


@dataclass
class Group:
    """The members and everything that steps them."""

    models: list
    optimizers: list
    group_step: GroupStep  # one training step of the whole group (orc_fast/orc.py)
    run_step: object  # group_step, or its CUDA-graph capture
    guard: NonFiniteGuard
    data_generator: torch.Generator
    last_roles: torch.Tensor | None = None  # the previous step's roles, for counting role changes
    pivot: torch.nn.Module | None = None  # pivot mode and kd: the pre-trained teacher
    pivot_optimizer: torch.optim.Optimizer | None = None  # None: the pivot is frozen
    pivot_lr_scale: float = 1.0  # a training pivot's lr over the group's (--pivot-lr-scale)

    @property
    def all_optimizers(self) -> list:
        """Every optimizer the learning-rate schedule drives: the members', and a training pivot's."""
        return self.optimizers + ([self.pivot_optimizer] if self.pivot_optimizer is not None else [])

    def set_lr(self, lr: float) -> None:
        """The schedule's lr for this step: the members', and a training pivot's scaled."""
        for optimizer in self.all_optimizers:
            scale = self.pivot_lr_scale if optimizer is self.pivot_optimizer else 1.0
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr * scale

    def set_train_mode(self) -> None:
        """Members train; a pivot trains only when it has an optimizer (a frozen one stays in
        eval mode, batch-norm statistics included)."""
        for model in self.models:
            model.train()
        if self.pivot is not None:
            self.pivot.train(self.pivot_optimizer is not None)


def start_process(args: argparse.Namespace, config: dict):
    """Threads, the process group under torchrun (else a no-op placement), seeds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif config["device"] == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    placement = distributed.setup(args, config)  # this rank's device and members
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return placement


def load_data(args: argparse.Namespace, config: dict):
    """uint8 tensors on the device, augmented there in batches (docs/design.md §5)."""
    dataset = load_dataset(
        args.dataset, args.data_dir, args.download, config["image_size"], args.train_subset,
        torch.device(config["device"]), log=lambda message: print(message, flush=True), val_split=args.val_split,
    )
    config.update(num_classes=dataset.num_classes, train_size=len(dataset.train_labels),
                  val_size=len(dataset.val_labels), test_size=len(dataset.test_labels))
    return dataset


def build_group(args: argparse.Namespace, config: dict, num_classes: int, placement) -> Group:
    """One model and one SGD optimizer per member (and the pivot's, when it trains), the group
    step and its NaN guard."""
    device = torch.device(config["device"])
    data_generator = torch.Generator(device=device).manual_seed(args.seed)
    layout = memory_format(config["channels_last"])
    models = placement.build_models(config["archs"], lambda arch: build_model(arch, num_classes), device)
    models = [m.to(memory_format=layout) for m in models]

    def sgd(model):
        return start_momentum(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                              weight_decay=args.weight_decay))

    optimizers = [sgd(m) for m in models]
    pivot, pivot_optimizer = None, None
    if config["pivot"]:
        pivot, info = load_pivot(config["pivot"], config["pivot_member"], num_classes)
        pivot = pivot.to(device, memory_format=layout)
        pivot_optimizer = None if config["freeze_pivot"] else sgd(pivot)
        config.update(pivot_member=info["member"], pivot_arch=info["arch"], pivot_source_val_acc=info["val_acc"])
    step_config = StepConfig(
        method=args.method, teacher_size=config["teacher_size"], temperature=config["temperature"],
        alpha=config["alpha"], kd_scale=config["kd_scale"], promote=config["promote"] or 0,
        error_weight=args.error_weight, error_rule=args.error_rule, error_mixup=config["error_mixup"],
        mixup_alpha=args.mixup_alpha, refresh_teachers=args.refresh_teachers, rank_momentum=args.rank_momentum,
        rank_by=config["rank_by"] or "ce", backend=args.backend, strategy=args.strategy, compile=args.compile,
        precision=config["precision"],
    )
    group_step = placement.group_step(models, optimizers, step_config, device, data_generator,
                                      pivot=pivot, pivot_optimizer=pivot_optimizer)
    run_step = CudaGraphStep(group_step) if args.cuda_graphs else group_step
    guard = NonFiniteGuard(args.nan_policy, device, group_step.state_tensors)
    return Group(models, optimizers, group_step, run_step, guard, data_generator, pivot=pivot,
                 pivot_optimizer=pivot_optimizer, pivot_lr_scale=config["pivot_lr_scale"] or 1.0)


def resume(args: argparse.Namespace, config: dict, group: Group, placement, metrics: dict) -> tuple[int, float]:
    """Load --resume's checkpoint into the group; (epochs done, best accuracy so far)."""
    if not args.resume:
        return 0, -1.0
    path, state = placement.load_checkpoint(Path(config["out"]), args.resume)
    check_resumable(state, config, path)
    try:
        for model, saved in zip(group.models, state["models"], strict=True):
            model.load_state_dict(saved)
        for optimizer, saved in zip(group.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        group.group_step.scores.load_state_dict(state["scores"])
        if group.group_step.scaler is not None:
            group.group_step.scaler.load_state_dict(state["scaler"])
        if group.pivot is not None:  # the pivot as this run left it (a refined pivot has moved on)
            group.pivot.load_state_dict(state["pivot"]["model"])
            if group.pivot_optimizer is not None:
                group.pivot_optimizer.load_state_dict(state["pivot"]["optimizer"])
        checkpoint.set_rng_state(state["rng"], group.data_generator)
        if state.get("last_roles") is not None:
            group.last_roles = state["last_roles"].to(config["device"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit these models: {first_line}") from None
    metrics["epochs"] = state["metrics"]["epochs"]
    metrics["pivot"] = state["metrics"].get("pivot")
    print(f"resumed from {path} after epoch {state['epoch']}")
    return state["epoch"], state.get("best_ensemble_acc", -1.0)


def announce(args: argparse.Namespace, config: dict, placement) -> None:
    names = ", ".join(f"{count} x {arch}" for arch, count in _runs(config["archs"]))
    print(
        f"{args.method} on {args.dataset} ({config['train_size']} train / {config['val_size']} validation / "
        f"{config['test_size']} test images, "
        f"{config['num_classes']} classes): {names} on {config['device']}, loss backend {config['backend_used']}, "
        f"{config['precision']} ({config['precision_reason']}), {'channels-last' if config['channels_last'] else 'NCHW'}"
        + (f", k = {config['teacher_size']} teachers ranked by batch {config['rank_by']}"
           if args.method == "orc" and not config["pivot"] else "")
    )
    if config["pivot"]:
        source = config["pivot_source_val_acc"]
        known = f", {100 * source:.2f}% on its run's validation split" if source is not None else ""
        scale = config["pivot_lr_scale"]
        refined = f"refined on the error images at {scale:g} x the group's lr" if scale is not None else ""
        role = ("frozen (kd)" if args.method == "kd" else
                f"{'frozen' if config['freeze_pivot'] else refined}; every step the "
                f"{config['promote']} best-ranked student(s) by batch {config['rank_by']} join it as teachers")
        print(f"pivot teacher: {config['pivot_arch']}, member {config['pivot_member']} of {config['pivot']}{known}; "
              f"{role}" + (", error mixup" if config["error_mixup"] else ""))
    if args.method != "independent":
        scale, alpha = config["kd_scale"], config["alpha"]
        where = "overridden by " + ", ".join(config["loss_overrides"]) if config["loss_overrides"] else config["loss_source"]
        print(f"loss: {scale * (1 - alpha):g} CE + {scale * alpha:g} tau^2 KL, tau = {config['temperature']:g} ({where})")
    if placement.describe():
        print(placement.describe())


def train_epoch(args: argparse.Namespace, config: dict, group: Group, dataset, epoch: int,
                show_bar: bool, warmup_steps: int = 0) -> tuple[dict, float, EpochLog]:
    """One pass over the training set: the epoch's training record (no accuracies yet), its
    seconds, and its per-step log. The first ``warmup_steps`` steps (compilation, CUDA-graph
    capture) are left out of images/s."""
    device = torch.device(config["device"])
    group.set_train_mode()
    steps = steps_per_epoch(len(dataset.train_labels), args.batch_size)
    log = EpochLog(config["num_nets"], device, keep_steps=config["log_dir"] is not None)
    bar = ProgressBar(show_bar, steps, f"epoch {epoch + 1}/{args.epochs}")
    images_seen, timed_images, started = 0, 0, time.perf_counter()
    run_started = started
    batches = train_batches(dataset, args.batch_size, group.data_generator, args.augment)
    layout = memory_format(config["channels_last"])
    for step, (images, labels) in enumerate(batches):
        if step == warmup_steps and warmup_steps:
            if device.type == "cuda":  # once per run: the warm-up's queued work belongs to it
                torch.cuda.synchronize(device)
            timed_images, started = 0, time.perf_counter()
        images = images.contiguous(memory_format=layout)
        lr = learning_rate(config, epoch, step, steps)
        group.set_lr(lr)
        group.guard.before_step()
        result = group.run_step(images, labels)
        kept = group.guard.after_step(result.losses, epoch, step)
        log.add(result, kept, group.last_roles, lr)  # the run's first step has no role change
        group.last_roles = result.roles
        images_seen += len(labels)
        timed_images += len(labels)
        bar.update(step + 1, images_seen)
    group.guard.flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finished = time.perf_counter()
    train_seconds = finished - run_started
    bar.close()
    # An epoch no longer than its warm-up has no steady speed: then all of it counts.
    timed = warmup_steps < steps
    record = {
        "epoch": epoch + 1,
        **log.record(),
        "lr": log.lrs[-1],
        "images_per_s": timed_images / (finished - started) if timed else images_seen / train_seconds,
        "warmup_steps": min(warmup_steps, steps) if timed else 0,
        "skipped_steps": group.guard.take_skipped(),
        "strategy": group.group_step.strategy.chosen,
    }
    return record, train_seconds, log


def warmup_steps(args: argparse.Namespace, start_epoch: int, epoch: int) -> int:
    """Steps of this epoch that compile or capture rather than train at speed: the first
    step under --compile, the warm-up and capture steps of --cuda-graphs; only in the first
    epoch this process trains (a resumed run compiles again)."""
    if epoch != start_epoch:
        return 0
    return max(1 if args.compile else 0, CUDA_GRAPH_WARMUP + 1 if args.cuda_graphs else 0)


def check_skipped(args: argparse.Namespace, metrics: dict, steps: int) -> None:
    """Under skip-step, more skipped steps than --max-skipped-steps (in all, this epoch's
    included) end the run before this epoch is saved: such a run is not training."""
    if args.nan_policy != "skip-step":
        return
    limit = max(1, steps // 10) if args.max_skipped_steps is None else args.max_skipped_steps
    skipped = sum(e["skipped_steps"] for e in metrics["epochs"])
    if skipped > limit:
        last = metrics["epochs"][-1]
        raise NonFiniteLoss(
            f"{skipped} steps were skipped for non-finite losses ({last['skipped_steps']} in epoch {last['epoch']}), "
            f"more than --max-skipped-steps {limit}; the run stopped without saving epoch {last['epoch']}, so the "
            "last checkpoint is the last one saved (lower --lr)"
        )


def save_epoch(out: Path, config: dict, group: Group, placement, metrics: dict, epoch: int, is_best: bool,
               best_accuracy: float, dataset) -> None:
    """Checkpoints (atomic; latest.pt, best.pt when best; per rank under torchrun), then
    metrics.json and the plot. A checkpoint carries what using a member needs besides its
    weights: the class names and how images were normalised (orc_fast/trained.py)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch, "config": config,
        "models": [m.state_dict() for m in group.models], "optimizers": [o.state_dict() for o in group.optimizers],
        "scores": group.group_step.scores.state_dict(), "rng": checkpoint.rng_state(group.data_generator),
        "scaler": None if group.group_step.scaler is None else group.group_step.scaler.state_dict(),
        "metrics": {"epochs": metrics["epochs"], "pivot": metrics.get("pivot")}, "best_ensemble_acc": best_accuracy,
        "last_roles": None if group.last_roles is None else group.last_roles.cpu(),
        "pivot": None if group.pivot is None else {
            "model": group.pivot.state_dict(),
            "optimizer": None if group.pivot_optimizer is None else group.pivot_optimizer.state_dict(),
        },
        "data": {"classes": dataset.classes, "image_size": dataset.image_size, "mean": dataset.mean.cpu(),
                 "std": dataset.std.cpu()},
    }
    placement.save_checkpoint(out, state, is_best)
    if placement.is_main:
        save_outputs(out, metrics)


def report_epoch(args: argparse.Namespace, record: dict, seconds: float) -> None:
    """The epoch's line: each member's CE (and, for methods that distil, its tau^2 KL term
    apart), accuracies, ORC's teacher shares and role changes, speed."""
    member_acc, ensemble_acc = record["test_acc"], record["ensemble_acc"]
    evaluated = member_acc is not None
    accuracy = f"acc {percent(member_acc)}  ens {100 * ensemble_acc:5.2f}" if evaluated else "acc (not evaluated)"
    teacher = ("  teacher " + " ".join(f"{t:.2f}" for t in record["teacher_fraction"])
               + f"  role changes/step {record['role_changes']:.2f}") if args.method == "orc" else ""
    if record.get("val_ensemble_acc") is not None:
        accuracy += f"  val ens {100 * record['val_ensemble_acc']:5.2f}"
    if record.get("pivot_test_acc") is not None:
        accuracy += f"  pivot {100 * record['pivot_test_acc']:5.2f}"
    terms = "ce " + " ".join(f"{v:.3f}" for v in record["train_ce"])
    if args.method != "independent":
        terms += "  kd " + " ".join(f"{v:.3f}" for v in record["train_kd"])
    speed = f"  {record['images_per_s']:.0f} img/s"
    if record["warmup_steps"]:
        speed += f" (after {record['warmup_steps']} warm-up steps)"
    skipped = record["skipped_steps"]
    print(
        f"epoch {record['epoch']:3d}/{args.epochs}  {terms}  {accuracy}{teacher}{speed}  {seconds:.1f}s"
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


def report_final(args: argparse.Namespace, config: dict, metrics: dict, last_epoch: int, placement) -> None:
    if metrics["final"] is None:
        # Resumed a run that had already finished: report it, and write its metrics.json only
        # if a crash between the last checkpoint and that file left it short of epochs.
        evaluated_epochs = [e for e in metrics["epochs"] if e["test_acc"] is not None]
        if evaluated_epochs:
            metrics["final"] = final_record(evaluated_epochs[-1])
            complete_outputs(Path(config["out"]), metrics, placement)
    if metrics["final"] is None:
        return
    stopped = last_epoch < args.epochs
    print(f"{'test accuracy after epoch ' + str(last_epoch) if stopped else 'final test accuracy'}"
          f" ({args.method}, {args.dataset}):")
    for i, (arch, acc) in enumerate(zip(config["archs"], metrics["final"]["test_acc"])):
        print(f"  member {i} ({arch}): {100 * acc:.2f}%")
    print(f"  ensemble: {100 * metrics['final']['ensemble_acc']:.2f}%")
    if metrics["final"]["best_member"] is not None:
        best = metrics["final"]["best_member"]
        print(f"  best member on validation: {best} ({100 * metrics['final']['test_acc'][best]:.2f}% test)")
    print(f"outputs in {config['out']}/ (metrics.json, {placement.checkpoint_files}, curves.png)")


def run(args: argparse.Namespace) -> dict:
    """The whole run, phase by phase: build it, resume, then train / evaluate / save / report
    each epoch."""
    config = resolve(args)
    out = Path(config["out"])
    placement = start_process(args, config)
    dataset = load_data(args, config)
    group = build_group(args, config, dataset.num_classes, placement)
    metrics = {"config": config, "epochs": [], "final": None, "pivot": None}
    start_epoch, best_accuracy = resume(args, config, group, placement, metrics)
    announce(args, config, placement)
    if group.pivot is not None and metrics["pivot"] is None:
        metrics["pivot"] = pivot_accuracy(group, dataset, args.eval_batch_size, config)
        print(f"pivot before training: {100 * metrics['pivot']['pivot_test_acc']:.2f}% test")
    checkpoint.remove_stale_temps(out)  # what a crash in the middle of a save left behind
    show_bar = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    last_epoch = min(args.epochs, args.stop_after) if args.stop_after else args.epochs

    steps = steps_per_epoch(len(dataset.train_labels), args.batch_size)
    board = (TensorBoardLog(Path(config["log_dir"]), steps, start_epoch)
             if config["log_dir"] is not None and placement.is_main else None)
    try:
        for epoch in range(start_epoch, last_epoch):
            best_accuracy = train_and_save(args, config, group, dataset, placement, metrics, epoch, last_epoch,
                                           best_accuracy, show_bar, board, warmup_steps(args, start_epoch, epoch))
    finally:
        if board is not None:
            board.close()

    report_final(args, config, metrics, last_epoch, placement)
    placement.close()
    return metrics


def train_and_save(args: argparse.Namespace, config: dict, group: Group, dataset, placement, metrics: dict,
                   epoch: int, last_epoch: int, best_accuracy: float, show_bar: bool,
                   board: TensorBoardLog | None, warmup: int) -> float:
    """One epoch: train, evaluate (every --eval-every and the last), check the skipped steps,
    save, log, report; returns the best validation accuracy so far."""
    started = time.perf_counter()
    record, seconds, log = train_epoch(args, config, group, dataset, epoch, show_bar, warmup)
    evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == last_epoch
    how = {"precision": config["precision"], "channels_last": config["channels_last"]}
    member_acc, ensemble_acc = (
        evaluate(group.models, dataset, args.eval_batch_size, placement.exchange, **how) if evaluated else (None, None)
    )
    val_acc, val_ensemble_acc = (
        evaluate(group.models, dataset, args.eval_batch_size, placement.exchange, split="val", **how)
        if evaluated and config["val_size"] else (None, None)
    )
    record.update(test_acc=member_acc, ensemble_acc=ensemble_acc, val_acc=val_acc, val_ensemble_acc=val_ensemble_acc)
    if evaluated and group.pivot_optimizer is not None:
        record.update(pivot_accuracy(group, dataset, args.eval_batch_size, config))
    record["seconds"] = time.perf_counter() - started  # training and evaluation: a run's wall time adds these
    metrics["epochs"].append(record)
    check_skipped(args, metrics, log.steps)
    # best.pt is chosen on the validation split only; without one there is no best.pt.
    is_best = val_ensemble_acc is not None and val_ensemble_acc > best_accuracy
    if evaluated:
        metrics["final"] = final_record(record)
    if is_best:
        best_accuracy = val_ensemble_acc
    save_epoch(Path(config["out"]), config, group, placement, metrics, epoch + 1, is_best, best_accuracy, dataset)
    if board is not None:
        board.steps(epoch, log)
        board.epoch(record)
    report_epoch(args, record, seconds)
    return best_accuracy


def _runs(archs):
    """Run-length groups of an arch list, for printing: [(arch, count), ...]."""
    groups = []
    for arch in archs:
        if groups and groups[-1][0] == arch:
            groups[-1][1] += 1
        else:
            groups.append([arch, 1])
    return groups


def interrupted_message(out: str | None) -> str:
    """What a Ctrl-C leaves: the epoch the last complete checkpoint holds, or that there is
    none to resume."""
    if out is None:
        return "interrupted before the run started; nothing was written"
    for name in ("latest.pt", "latest.json"):
        path = Path(out) / name
        if not path.is_file():
            continue
        try:
            epoch = json.loads(path.read_text())["epoch"] if name.endswith(".json") else checkpoint.load(path)["epoch"]
        except (checkpoint.CheckpointError, OSError, ValueError, KeyError):
            return f"interrupted; {path} cannot be read, so there is nothing to resume"
        return f"interrupted; {path} holds epoch {epoch}: continue with the same command and --resume --out {out}"
    return ("interrupted before the first checkpoint was written, so there is nothing to resume: run the same "
            "command again (without --resume)")


def main(argv=None) -> int:
    args = None
    try:
        args = parse_args(argv)
        run(args)
    except (UsageError, DataError, checkpoint.CheckpointError, distributed.LaunchError) as error:
        message = " ".join(str(error).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except distributed.GroupFailure as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n" + interrupted_message(getattr(args, "out", None)), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
