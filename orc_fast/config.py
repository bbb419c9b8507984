"""The run's configuration: built once from the command line (or --config's YAML), frozen.

``resolve(args)`` checks the flags against each other and against the method
(orc_fast/methods/) and returns a ``RunConfig`` in four sections: ``method``, ``data``,
``optim`` and ``run``. Nothing past this module reads the command line. What a run learns
while it builds (the data's class count and split sizes, the pivot it loaded, its rank's
device, the settings a resume changed) goes in with ``updated``, which returns a new
config. ``record()`` is the flat mapping written into metrics.json and every checkpoint.

Each field's metadata says how a resume treats it (``resume``: ``fixed``, the run must
match the checkpoint; ``changeable``, only with --resume-changes) and whether the record
holds it (``recorded``).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from . import checkpoint, distributed, methods
from .backends import resolve_backend
from .cli import flag_defaults
from .errors import UsageError
from .group_step import StepConfig
from .models import MODELS
from .pivot import pivot_path
from .precision import default_channels_last, resolve_precision
from .run_folder import RunFolder

FIXED, CHANGEABLE = "fixed", "changeable"


def setting(resume: str | None = None, before=None, recorded: str = "always"):
    """A config field. ``resume``: FIXED or CHANGEABLE (None: free); ``before``: the value a
    checkpoint that predates the field ran with; ``recorded``: ``always``, ``when_set``
    (left out of the record while None) or ``never``."""
    return field(default=None, metadata={"resume": resume, "before": before, "recorded": recorded})


@dataclass(frozen=True)
class MethodSection:
    method: str = setting(FIXED)
    arch: str = setting()  # as given; ``archs`` is the group
    archs: tuple = setting(FIXED)
    num_nets: int = setting()
    teacher_size: int | None = setting(FIXED)
    temperature: float = setting(CHANGEABLE)
    alpha: float = setting(CHANGEABLE)
    kd_scale: float = setting(CHANGEABLE)
    ce_weight: float | None = setting()
    kd_weight: float | None = setting()
    loss_overrides: tuple = setting()
    loss_source: str = setting()
    error_rule: str = setting(CHANGEABLE)
    error_weight: float = setting(CHANGEABLE)
    error_mixup: bool = setting(CHANGEABLE)
    mixup_alpha: float = setting(CHANGEABLE)
    refresh_teachers: bool = setting(CHANGEABLE)
    rank_momentum: float = setting(CHANGEABLE)
    # Peer mode ranked by CE before the ranking score was recorded.
    rank_by: str | None = setting(CHANGEABLE, before="ce")
    pivot: str | None = setting()  # the pivot checkpoint's path
    pivot_member: int | None = setting()
    promote: int | None = setting(FIXED)
    freeze_pivot: bool | None = setting(FIXED)
    pivot_lr_scale: float | None = setting(CHANGEABLE)
    pivot_arch: str | None = setting(FIXED, recorded="when_set")
    pivot_source_val_acc: float | None = setting(recorded="when_set")
    backend: str = setting()
    backend_used: str = setting()
    nan_policy: str = setting()
    max_skipped_steps: int | None = setting()

    @property
    def impl(self) -> methods.Method:
        """The registered method that runs (pivot mode's where a pivot is given)."""
        return methods.get(self.method, pivot=self.pivot is not None)


@dataclass(frozen=True)
class DataSection:
    dataset: str = setting(FIXED)
    data_dir: str | None = setting()
    download: bool = setting()
    image_size: int = setting(FIXED)
    train_subset: int = setting(FIXED)
    val_split: int = setting(FIXED)
    augment: bool = setting(CHANGEABLE)
    num_classes: int | None = setting(FIXED)
    train_size: int | None = setting()
    val_size: int | None = setting()
    test_size: int | None = setting()


@dataclass(frozen=True)
class OptimSection:
    epochs: int = setting(CHANGEABLE)
    batch_size: int = setting(CHANGEABLE)
    lr: float = setting(CHANGEABLE)
    momentum: float = setting(CHANGEABLE)
    weight_decay: float = setting(CHANGEABLE)
    schedule: str = setting(CHANGEABLE)
    milestones: tuple = setting(CHANGEABLE)
    lr_decay: float = setting(CHANGEABLE)


@dataclass(frozen=True)
class RunSection:
    device: str = setting()
    strategy: str = setting()
    compile: bool = setting()
    precision: str = setting(FIXED, before="fp32")  # fp32 was the only precision once
    precision_reason: str = setting()
    channels_last: bool = setting()
    cuda_graphs: bool = setting()
    seed: int = setting(FIXED)  # a resumed run continues the saved random streams
    threads: int = setting()
    out: str = setting()
    overwrite: bool = setting()
    resume: str | None = setting(recorded="never")
    resume_changes: bool = setting()
    stop_after: int = setting()
    eval_every: int = setting()
    eval_batch_size: int = setting()
    progress: str = setting(recorded="never")
    tensorboard: bool = setting()
    log_dir: str | None = setting()
    dist_timeout: float = setting()
    world_size: int | None = setting(recorded="when_set")
    dist_backend: str | None = setting(recorded="when_set")
    changed_on_resume: tuple | None = setting(recorded="when_set")


SECTIONS = ("method", "data", "optim", "run")


@dataclass(frozen=True)
class RunConfig:
    method: MethodSection
    data: DataSection
    optim: OptimSection
    run: RunSection

    def fields(self):
        """(section name, field) of every setting, section by section."""
        return [(name, f) for name in SECTIONS for f in fields(getattr(self, name))]

    def updated(self, **values) -> RunConfig:
        """A copy with these settings (any section's) replaced."""
        owner = {f.name: name for name, f in self.fields()}
        unknown = set(values) - set(owner)
        if unknown:
            raise KeyError(f"no such setting: {', '.join(sorted(unknown))}")
        sections = {name: getattr(self, name) for name in SECTIONS}
        for name in SECTIONS:
            mine = {k: v for k, v in values.items() if owner[k] == name}
            if mine:
                sections[name] = replace(sections[name], **mine)
        return RunConfig(**sections)

    def record(self) -> dict:
        """The flat mapping metrics.json and checkpoints carry (tuples as lists)."""
        record = {}
        for name, f in self.fields():
            value = getattr(getattr(self, name), f.name)
            if f.metadata["recorded"] == "never" or (f.metadata["recorded"] == "when_set" and value is None):
                continue
            record[f.name] = _plain(value)
        return record

    def keys_with(self, resume: str) -> list:
        """(key, value a checkpoint from before the key was recorded ran with) of every setting
        with that resume rule."""
        return [(f.name, f.metadata["before"]) for _, f in self.fields() if f.metadata["resume"] == resume]

    def step_config(self) -> StepConfig:
        """How the group step trains, from this run's settings."""
        m, run = self.method, self.run
        return StepConfig(
            method=m.method, teacher_size=m.teacher_size, temperature=m.temperature, alpha=m.alpha,
            kd_scale=m.kd_scale, promote=m.promote, error_weight=m.error_weight, error_rule=m.error_rule,
            error_mixup=m.error_mixup, mixup_alpha=m.mixup_alpha, refresh_teachers=m.refresh_teachers,
            rank_momentum=m.rank_momentum, rank_by=m.rank_by, pivot_lr_scale=m.pivot_lr_scale,
            backend=m.backend, strategy=run.strategy, compile=run.compile, precision=run.precision,
        )


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ============================================================================ from the command line


def resolve(args: argparse.Namespace) -> RunConfig:
    """Check the flags against each other; the run's full configuration."""
    flags = vars(args)
    archs, num_nets = group_archs(flags)
    method = methods.get(flags["method"], pivot=flags["pivot"] is not None)
    unused = unused_flags(flags, method)
    if unused:
        raise UsageError(f"--method {flags['method']} does not use {', '.join(unused)}"
                         + (" (CE only)" if not method.distils else " (they belong to --method orc)"))
    if num_nets < method.min_members:
        raise UsageError(f"--method {method.name} needs at least {method.min_members} networks, got --num-nets {num_nets}")
    check_numbers(flags)
    milestones = schedule_milestones(flags)
    device = resolve_device(flags)
    pivot = pivot_settings(flags, method, num_nets)
    if flags["cuda_graphs"] and pivot["error_mixup"]:
        raise UsageError("--cuda-graphs cannot capture --error-mixup (its mixing weight is drawn on the host each step)")
    precision, precision_reason = resolve_precision(flags["precision"], device)
    try:
        backend = resolve_backend(flags["backend"], device)
    except Exception as error:  # noqa: BLE001 - unavailable backend is a usage problem
        raise UsageError(str(error)) from None
    out = flags["out"] or f"runs/{flags['method']}_{flags['dataset']}_{time.strftime('%Y%m%d-%H%M%S')}"
    RunFolder(Path(out)).check_free(resuming=bool(flags["resume"]), overwrite=flags["overwrite"])
    values = {**flags, **loss_settings(flags, method), **pivot,
              "image_size": flags["image_size"] or (16 if flags["dataset"] == "digits" else 32),
              "archs": tuple(archs), "num_nets": num_nets, "milestones": tuple(milestones), "device": str(device),
              "backend_used": backend, "precision": precision, "precision_reason": precision_reason,
              "channels_last": (default_channels_last(device, precision) if flags["channels_last"] is None
                                else flags["channels_last"]),
              "out": out,
              "log_dir": flags["log_dir"] or (str(RunFolder(out).tensorboard) if flags["tensorboard"] else None)}
    return build(values)


def build(values: dict) -> RunConfig:
    """A RunConfig from a flat mapping holding every setting (and perhaps more)."""
    kinds = {"method": MethodSection, "data": DataSection, "optim": OptimSection, "run": RunSection}
    return RunConfig(**{name: kind(**{f.name: values.get(f.name) for f in fields(kind)}) for name, kind in kinds.items()})


def group_archs(flags: dict) -> tuple[list[str], int]:
    """The members' architectures from --arch and --num-nets."""
    archs = [a.strip() for a in flags["arch"].split(",") if a.strip()]
    unknown = [a for a in archs if a not in MODELS]
    if not archs or unknown:
        raise UsageError(f"unknown arch {', '.join(unknown) or repr(flags['arch'])}; known: {', '.join(MODELS)}")
    num_nets = flags["num_nets"]
    if num_nets is not None and num_nets < 1:
        raise UsageError(f"--num-nets must be >= 1, got {num_nets}")
    if len(archs) == 1:
        return archs * (4 if num_nets is None else num_nets), 4 if num_nets is None else num_nets
    if num_nets is not None and num_nets != len(archs):
        raise UsageError(f"--num-nets {num_nets} does not match the {len(archs)} archs given in --arch")
    return archs, len(archs)


def unused_flags(flags: dict, method: methods.Method) -> list[str]:
    """The method-owned flags set away from their defaults that ``method`` does not read."""
    defaults = flag_defaults()

    def given(dest):  # a --no-flag whose default is None (the method decides) says nothing either
        value, default = flags[dest], defaults[dest]
        return value != default and not (default is None and value is False)

    ignored = [dest for dest in methods.method_flags() if dest not in method.reads and dest not in ("pivot", *PIVOT_FLAGS)]
    return ["--" + dest.replace("_", "-") for dest in ignored if given(dest)]


def check_numbers(flags: dict) -> None:
    """Each number within its range: one line naming the first that is not."""
    checks = [
        (flags["epochs"] >= 1, f"--epochs must be >= 1, got {flags['epochs']}"),
        (flags["batch_size"] >= 2, f"--batch-size must be >= 2, got {flags['batch_size']}"),
        (flags["lr"] > 0, f"--lr must be > 0, got {flags['lr']}"),
        (0 <= flags["momentum"] < 1, f"--momentum must lie in [0, 1), got {flags['momentum']}"),
        (flags["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {flags['weight_decay']}"),
        (flags["error_weight"] >= 0, f"--error-weight must be >= 0, got {flags['error_weight']}"),
        (flags["mixup_alpha"] > 0, f"--mixup-alpha must be > 0, got {flags['mixup_alpha']}"),
        (0 <= flags["rank_momentum"] < 1, f"--rank-momentum must lie in [0, 1), got {flags['rank_momentum']}"),
        (flags["eval_every"] >= 1, f"--eval-every must be >= 1, got {flags['eval_every']}"),
        (flags["stop_after"] >= 0, f"--stop-after must be >= 0, got {flags['stop_after']}"),
        (flags["threads"] >= 0, f"--threads must be >= 0, got {flags['threads']}"),
        (flags["train_subset"] >= 0, f"--train-subset must be >= 0, got {flags['train_subset']}"),
        (flags["val_split"] >= -1, f"--val-split must be >= 0 (or -1 for 10%), got {flags['val_split']}"),
        (flags["dist_timeout"] > 0, f"--dist-timeout must be > 0, got {flags['dist_timeout']}"),
        (flags["seed"] >= 0, f"--seed must be >= 0, got {flags['seed']}"),
        (flags["eval_batch_size"] >= 1, f"--eval-batch-size must be >= 1, got {flags['eval_batch_size']}"),
        (flags["max_skipped_steps"] is None or flags["nan_policy"] == "skip-step",
         "--max-skipped-steps needs --nan-policy skip-step (under stop, the first bad step ends the run)"),
        (flags["max_skipped_steps"] is None or flags["max_skipped_steps"] >= 0,
         f"--max-skipped-steps must be >= 0, got {flags['max_skipped_steps']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def schedule_milestones(flags: dict) -> list[int]:
    try:
        milestones = sorted(int(m) for m in flags["milestones"].split(",") if m.strip())
    except ValueError:
        raise UsageError(f"--milestones must be a comma list of epochs, got {flags['milestones']!r}") from None
    past = [m for m in milestones if not 0 <= m <= flags["epochs"]]
    if past and flags["schedule"] == "step":  # the cosine schedule reads no milestones
        raise UsageError(f"--milestones {', '.join(map(str, past))} lie past --epochs {flags['epochs']} (a milestone "
                         f"is the epoch where the lr drops: each must lie in [0, {flags['epochs']}])")
    return milestones or sorted({round(flags["epochs"] * f) for f in (0.625, 0.75, 0.875)})


def resolve_device(flags: dict) -> torch.device:
    asked = flags["device"]
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if asked == "auto" else asked)
    except RuntimeError:
        raise UsageError(f"unknown --device {asked!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {asked} asked for, but CUDA is not available here")
    if flags["cuda_graphs"] and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    return device


PIVOT_FLAGS = ("pivot_member", "promote", "freeze_pivot", "pivot_lr_scale")


def pivot_settings(flags: dict, method: methods.Method, num_nets: int) -> dict:
    """The method's own settings and pivot mode's, checked: {pivot, pivot_member, promote,
    freeze_pivot, pivot_lr_scale, error_mixup, rank_by, teacher_size}. The checkpoint
    itself is read later (orc_fast/pivot.py), when the data's class count is known."""
    settings = {"pivot": None, "pivot_member": None, "promote": None, "freeze_pivot": None, "pivot_lr_scale": None,
                "error_mixup": bool(flags["error_mixup"]), "rank_by": None, "teacher_size": num_nets // 2}
    if flags["pivot"] is None:
        peer_only = ["--" + f.replace("_", "-") for f in PIVOT_FLAGS if flags[f] is not None]
        if method.pivot == "required":
            raise UsageError(f"--method {method.name} distils from a pre-trained pivot: give --pivot CHECKPOINT")
        if peer_only:
            raise UsageError(f"{', '.join(peer_only)} needs --pivot CHECKPOINT")
        return {**settings, **method.settings(flags, num_nets)}
    if method.pivot == "never":
        takers = [name for name in methods.names() if methods.get(name).pivot != "never"]
        raise UsageError(f"--pivot works with --method {' or '.join(takers)}, not {method.name}")
    own = method.settings(flags, num_nets)
    if distributed.launched_by_torchrun():
        raise UsageError("--pivot does not run member-parallel under torchrun yet; run it in one process")
    if flags["pivot_member"] is not None and flags["pivot_member"] < 0:
        raise UsageError(f"--pivot-member must be >= 0, got {flags['pivot_member']}")
    try:
        path = str(pivot_path(flags["pivot"]))
    except checkpoint.CheckpointError as error:
        raise UsageError(str(error)) from None
    return {**settings, "pivot": path, "pivot_member": flags["pivot_member"], "error_mixup": False,
            "teacher_size": None, **own}


def loss_settings(flags: dict, method: methods.Method) -> dict:
    """The method's temperature and loss weights (its defaults), with the flags' overrides:
    --ce-weight/--kd-weight (both), else --alpha (s = 1), else the method's own weights."""
    defaults = method.defaults
    temperature = defaults.temperature if flags["temperature"] is None else flags["temperature"]
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    if (flags["ce_weight"] is None) != (flags["kd_weight"] is None):
        raise UsageError("--ce-weight and --kd-weight go together: give both")
    if flags["ce_weight"] is not None and flags["alpha"] is not None:
        raise UsageError("give either --alpha or --ce-weight/--kd-weight, not both")
    if flags["alpha"] is not None:
        if not 0 <= flags["alpha"] <= 1:
            raise UsageError(f"--alpha must lie in [0, 1], got {flags['alpha']}")
        scale, alpha = 1.0, flags["alpha"]
    else:
        weights = ((defaults.ce_weight, defaults.kd_weight) if flags["ce_weight"] is None
                   else (flags["ce_weight"], flags["kd_weight"]))
        try:
            scale, alpha = methods.loss_form(*weights)
        except ValueError as error:
            raise UsageError(f"--ce-weight/--kd-weight: {error}") from None
    overridden = [f for f, v in (("--temperature", flags["temperature"]), ("--alpha", flags["alpha"]),
                                 ("--ce-weight/--kd-weight", flags["ce_weight"])) if v is not None]
    return {"temperature": temperature, "alpha": alpha, "kd_scale": scale, "loss_overrides": tuple(overridden),
            "loss_source": defaults.source}


def check_against_data(config: RunConfig, data) -> None:
    """What only the data can refuse: a batch larger than its training split."""
    train_size = data.size("train")
    if config.optim.batch_size > train_size:
        raise UsageError(f"--batch-size {config.optim.batch_size} is larger than the {train_size} training images")


# ============================================================================ resuming


def resume_changes(saved: dict, config: RunConfig, path, epoch: int) -> RunConfig:
    """Check a checkpoint's recorded config against this run's: the fixed settings must
    match, changeable ones differ only with --resume-changes (then they are printed and the
    history goes into the returned config)."""
    now = config.record()
    for key, before in config.keys_with(FIXED):
        old = saved.get(key, before)
        if old != now.get(key):
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not match this run: {key} was {old!r}, now {now.get(key)!r}"
            )
    # A key an older checkpoint did not record cannot be compared unless its old value is
    # known; one this run does not read (None: another method or mode) is no change.
    changes = {}
    for key, before in config.keys_with(CHANGEABLE):
        old, new = saved.get(key, before), now.get(key)
        if (key in saved or before is not None) and new is not None and old != new:
            changes[key] = [old, new]
    described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if changes and not config.run.resume_changes:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was trained with other settings ({described}); add --resume-changes to continue "
            f"with the new values, or resume with the old ones"
        )
    if config.optim.epochs < epoch:
        raise checkpoint.CheckpointError(f"--epochs {config.optim.epochs} is fewer than the {epoch} epochs "
                                         f"checkpoint {path} has trained")
    if changes:
        print(f"resuming with changed settings: {described}")
    history = saved.get("changed_on_resume", []) + ([{"epoch": epoch, "changes": changes}] if changes else [])
    return config.updated(changed_on_resume=tuple(history)) if history else config
