"""Command lines: the parser every entry point shares, the trainer's flags, YAML flag files,
and one-line errors.

Every entry point (train, evaluate, export, compare) reports bad input the same way: one
line ``PROG: error: ...`` on stderr and exit code 2 (``run_main``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from . import methods
from .backends import BACKENDS
from .data import DATASETS
from .errors import UsageError
from .guard import NAN_POLICIES
from .methods.orc_peer import DEFAULTS as ORC
from .methods.orc_pivot import DEFAULTS as ORC_PIVOT
from .models import MODELS
from .precision import PRECISIONS
from .reference import ERROR_RULES
from .roles import RANK_BY
from .strategies import STRATEGIES

PROG = "python -m orc_fast.train"


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


def run_main(prog: str, body, argv, errors: tuple = ()) -> int:
    """``body(argv)`` with bad input (UsageError and ``errors``) reported in one line, exit 2."""
    try:
        body(argv)
    except (UsageError, *errors) as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


def read_yaml(path: str, what: str):
    """The YAML file ``path`` (``what`` names it in errors: '--config F', 'protocol F')."""
    import yaml

    try:
        with open(path, "rb") as handle:
            return yaml.safe_load(handle)
    except OSError as error:
        raise UsageError(f"cannot read {what}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{what} is not valid YAML: {' '.join(str(error).split())}") from None


def on_off(value: bool) -> str:
    return "on" if value else "off"


def method_losses() -> str:
    """Every registered method's default loss, for --help: 'kd (0.1 CE + 0.9 tau^2 KL, tau 4), ...'."""
    def loss(method):
        d = method.defaults
        return f"{d.ce_weight:g} CE + {d.kd_weight:g} tau^2 KL, tau {d.temperature:g}" if method.distils else "CE only"

    return ", ".join(f"{name} ({loss(methods.get(name))})" for name in methods.names())


def build_parser() -> argparse.ArgumentParser:
    """The trainer's command line: its flags in four groups, as the config's sections."""
    p = Parser(prog=PROG, description=f"{PROG}: train a group of networks with ORC, or a baseline.",
               formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of flag values (keys as flag names); CLI flags override it")

    add_method_flags(p.add_argument_group("method"))
    add_data_flags(p.add_argument_group("data"))
    add_optimisation_flags(p.add_argument_group("optimisation"))
    add_run_flags(p.add_argument_group("run"))
    return p


def add_method_flags(g) -> None:
    g.add_argument("--method", choices=methods.names(), default="orc", help="orc, or a baseline, each at its "
                   f"published settings: {method_losses()}")
    g.add_argument("--pivot", metavar="CHECKPOINT", default=None,
                   help="pivot mode: a best.pt/latest.pt (or run folder) of an earlier run of this trainer whose "
                   "member (--pivot-member) stays in the teacher group all run; the --num-nets members are the "
                   "students. Needed by --method kd")
    g.add_argument("--pivot-member", type=int, default=None, metavar="I",
                   help="which member of --pivot's run (default: its best member on its validation split)")
    g.add_argument("--promote", type=int, default=None, metavar="P",
                   help="pivot mode: the P best-ranked students join the teacher group each step, in [0, N-1] "
                   f"(default {ORC_PIVOT.settings['promote']})")
    g.add_argument("--freeze-pivot", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the pivot fixed (eval mode, no updates); default: orc refines it on the students' "
                   "error images, kd always keeps it fixed")
    g.add_argument("--pivot-lr-scale", type=float, default=None, metavar="S",
                   help="orc with a refined pivot: its learning rate is S times the group's, on the same "
                   f"schedule (the pivot starts trained; default {ORC_PIVOT.settings['pivot_lr_scale']:g})")
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
    g.add_argument("--error-rule", choices=ERROR_RULES, default=ORC.settings["error_rule"],
                   help="an error image is one the student group gets wrong: any / all / majority of the students, "
                   "or the students' ensemble")
    g.add_argument("--error-weight", type=float, default=ORC.settings["error_weight"],
                   help="lambda_err: weight of the teachers' CE on error images")
    g.add_argument("--error-mixup", action=argparse.BooleanOptionalAction, default=None,
                   help="teachers' error term on error images mixed with random batch images (one more forward; "
                   f"default: {on_off(ORC_PIVOT.settings['error_mixup'])} in pivot mode, {on_off(ORC.settings['error_mixup'])} in "
                   "peer mode)")
    g.add_argument("--mixup-alpha", type=float, default=ORC.settings["mixup_alpha"], help="mixup lambda ~ Beta(a, a)")
    g.add_argument("--refresh-teachers", action=argparse.BooleanOptionalAction, default=ORC.settings["refresh_teachers"],
                   help="teachers step first and students distil from their updated logits (one more forward)")
    g.add_argument("--rank-momentum", type=float, default=ORC.settings["rank_momentum"],
                   help="rank members by an EMA of their batch score with this momentum (0: this batch only)")
    g.add_argument("--rank-by", choices=RANK_BY, default=None,
                   help="a member's batch score: its mean cross-entropy, or its top-1 error, blind to confidence "
                   f"(default: {ORC.settings['rank_by']} in peer mode, {ORC_PIVOT.settings['rank_by']} in pivot mode)")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="group-KD loss backend")
    g.add_argument("--nan-policy", choices=NAN_POLICIES, default="stop",
                   help="a NaN/inf member loss: stop (error naming member and step; the last checkpoint stays the "
                   "last good one) or skip-step (that group step updates no member; counted per epoch)")
    g.add_argument("--max-skipped-steps", type=int, default=None, metavar="K",
                   help="with --nan-policy skip-step: end the run with an error (exit 1, the last checkpoint kept) "
                   "once more than K steps in all were skipped (default: a tenth of an epoch's steps, at least 1)")



def add_data_flags(g) -> None:
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



def add_optimisation_flags(g) -> None:
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



def add_run_flags(g) -> None:
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--strategy", choices=STRATEGIES, default="sequential",
                   help="how each step runs the members (same mathematics): sequential; streams (one CUDA stream "
                   "each; sequential on CPU); fused (same-architecture members as one wide model, torch.func); "
                   "auto (times a few real steps of each, keeps the fastest)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the members' forward (and so their backward); the first steps compile")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training and evaluation precision: forwards under autocast in bf16 or fp16 (fp16 with a "
                   "dynamic loss scale), the loss and the weights in fp32; auto: bf16 where the hardware runs it "
                   "fast (CUDA sm_80+, CPUs with AMX/AVX512-BF16), else fp32; the run prints what it chose and why")
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



@functools.cache
def flag_defaults() -> dict:
    """Every trainer flag's default, {dest: value}, read from the parser once (the defaults do
    not depend on which methods are registered)."""
    return {action.dest: action.default for action in build_parser()._actions}


def parse_args(argv=None) -> argparse.Namespace:
    """Flags. Under --resume the run's own flags (from its checkpoint) are the defaults, then
    --config's YAML values, and the command line overrides both: what is given is a change."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--resume", nargs="?", const="latest", default=None)
    pre.add_argument("--out", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume:
        parser.set_defaults(**resumed_flags(known.resume, known.out, parser))
    if known.config:
        parser.set_defaults(**read_config(known.config, parser))
    return parser.parse_args(argv)


# Flags a resumed run does not take from its checkpoint: this invocation's own business.
NOT_RESUMED = ("config", "resume", "resume_changes", "overwrite", "stop_after", "out", "device", "progress", "help",
               "download")


def resumed_flags(resume: str, out: str | None, parser: argparse.ArgumentParser) -> dict:
    """The flag values the checkpoint's run was started with ({dest: value}), read from its
    recorded config; {} where there is no readable checkpoint (the resume itself then says
    why). The temperature and alpha count only where that run gave them (its record holds
    the method's defaults otherwise, and a given alpha means the alpha form)."""
    from . import checkpoint
    from .run_folder import RunFolder

    path = Path(resume) if resume != "latest" else (RunFolder(out).checkpoint_file() if out else None)
    try:
        if path is not None and path.suffix == ".json":  # member-parallel: any rank file holds the config
            path = path.parent / json.loads(path.read_text())["files"][0]
        record = checkpoint.load(path)["config"] if path is not None and path.is_file() else {}
    except (checkpoint.CheckpointError, OSError, ValueError, KeyError, IndexError, TypeError):
        record = {}
    given = set(record.get("loss_overrides") or ())
    name = record.get("method")
    reads = methods.get(name, pivot=record.get("pivot") is not None).reads if name in methods.REGISTRY else ()
    flags = {}
    for action in parser._actions:
        dest, value = action.dest, record.get(action.dest)
        if dest in NOT_RESUMED or value is None or (dest in methods.method_flags() and dest not in reads):
            continue  # not this invocation's, not recorded, or a flag the run's method does not read
        if dest in ("temperature", "alpha") and f"--{dest}" not in given:
            continue
        if dest == "precision" and str(record.get("precision_reason", "")).startswith("auto"):
            value = "auto"  # chosen by auto: resolved again (a resume on other hardware is refused, not changed)
        flags[dest] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flags


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    values = read_yaml(path, f"--config {path}") or {}
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
        if dest in ("arch", "milestones") and isinstance(value, list):
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
