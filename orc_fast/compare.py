"""python -m orc_fast.compare: every method x seed of a protocol through the trainer, one table.

    python -m orc_fast.compare --config configs/protocols/cifar10_cpu.yaml --out benchmarks/results/cifar10_cpu

A protocol (YAML, docs/design.md §5.1) names the runs' common trainer flags (data, budget),
the pivot to train first, if any, the methods and the seeds. Each run is a
``python -m orc_fast.train`` subprocess in ``OUT/runs/<method>-s<seed>`` (the pivot in
``OUT/runs/pivot-s<seed>``) with its flags in ``OUT/configs/<run>.yaml`` and its output in
``OUT/logs/<run>.log``. A finished run is skipped, an interrupted one resumes (``--resume``),
so a comparison longer than one sitting goes on where it stopped. Then ``OUT/table.md``,
``OUT/results.json`` and ``OUT/curves.png`` (orc_fast/compare_report.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import write_atomic
from .cli import build_parser, flag_values, read_yaml
from .compare_report import machine, write_report
from .errors import UsageError
from .run_folder import RunFolder

PROG = "python -m orc_fast.compare"
TOP_KEYS = {"name": str, "description": str, "common": dict, "pivot": dict, "methods": list, "seeds": list}
REQUIRED = ("common", "methods", "seeds")
# Flags the comparison sets per run; a protocol may not.
PER_RUN = {dest: "is set per run by the comparison" for dest in
           ("out", "seed", "resume", "overwrite", "resume_changes", "stop_after", "progress", "pivot")}
# Smallest values the trainer runs with; refused here because below them a run would start
# and fail only inside its child process (docs/design.md §5.1).
MINIMUM = {"epochs": 1, "batch_size": 2}


@dataclass
class Run:
    """One trainer run of the comparison."""

    name: str  # folder name: <method>-s<seed> or pivot-s<seed>
    method: str  # the protocol's method name ("pivot" for the pivot)
    seed: int
    flags: dict  # trainer flags (dest -> value), without the per-run ones
    needs: str | None = None  # the run whose best.pt is this one's --pivot
    state: str = "new"  # new | finished | interrupted | running | done | failed
    log_tail: list = field(default_factory=list)


# ---------------------------------------------------------------------------- the protocol


def read_protocol(path: str) -> dict:
    """The protocol file, checked: one-line UsageError naming the bad key."""
    protocol = read_yaml(path, f"protocol {path}")
    if not isinstance(protocol, dict):
        raise UsageError(f"protocol {path} must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key, value in protocol.items():
        if key not in TOP_KEYS:
            raise UsageError(f"protocol {path}: unknown key {key!r}; known: {', '.join(TOP_KEYS)}")
        if not isinstance(value, TOP_KEYS[key]):
            raise UsageError(f"protocol {path}: key {key!r} must be a {TOP_KEYS[key].__name__}")
    missing = [key for key in REQUIRED if key not in protocol]
    if missing:
        raise UsageError(f"protocol {path}: missing key {missing[0]!r}")
    seeds = protocol["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise UsageError(f"protocol {path}: key 'seeds' must be a list of distinct integers")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise UsageError(f"protocol {path}: key 'seeds' must hold seeds >= 0, got {negative[0]}")
    if not protocol["methods"]:
        raise UsageError(f"protocol {path}: key 'methods' must list at least one method")
    return protocol


def plan_runs(protocol: dict, path: str) -> list[Run]:
    """Every run in the order they start: per seed, the pivot first, then the methods."""
    parser = build_parser()
    common = flag_values(protocol["common"], parser, f"protocol {path}, key 'common'", PER_RUN)
    check_minimums(common, f"protocol {path}, key 'common'")
    pivot = pivot_flags(protocol.get("pivot"), common, parser, path)
    methods = method_flags(protocol["methods"], common, parser, path, has_pivot=pivot is not None)
    runs = []
    for seed in protocol["seeds"]:
        if pivot is not None:
            runs.append(Run(f"pivot-s{seed}", "pivot", seed, pivot))
        for name, (flags, uses_pivot) in methods.items():
            runs.append(Run(f"{name}-s{seed}", name, seed, flags, needs=f"pivot-s{seed}" if uses_pivot else None))
    return runs


def check_minimums(flags: dict, where: str) -> dict:
    """``flags``, once every value in MINIMUM is at least its minimum; else a UsageError
    naming the key and ``where``."""
    for dest, least in MINIMUM.items():
        value = flags.get(dest)
        if value is not None and value < least:
            raise UsageError(f"{where}: key {dest!r} must be >= {least}, got {value}")
    return flags


def pivot_flags(section: dict | None, common: dict, parser, path: str) -> dict | None:
    """The pivot run's flags: the common ones, one network of ``arch``, trained alone."""
    if section is None:
        return None
    where = f"protocol {path}, key 'pivot'"
    if "arch" not in section:
        raise UsageError(f"{where}: missing key 'arch'")
    refused = {**PER_RUN, **{d: "is fixed for the pivot (one network, trained alone)" for d in ("method", "num_nets")}}
    flags = check_minimums(flag_values(section, parser, where, refused), where)
    return {**common, **flags, "method": "independent", "num_nets": 1}


def method_flags(entries: list, common: dict, parser, path: str, has_pivot: bool) -> dict:
    """{name: (flags, uses the pivot)} of the protocol's methods, checked."""
    methods = {}
    for index, entry in enumerate(entries):
        where = f"protocol {path}, key 'methods[{index}]'"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise UsageError(f"{where}: each method needs a 'name' (its row in the table)")
        name = entry["name"]
        if name in methods or name == "pivot":
            raise UsageError(f"{where}: duplicate method name {name!r}" if name != "pivot" else
                             f"{where}: the name 'pivot' is the pivot's")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"{where}: name {name!r} must be letters, digits, '_' or '-' (it names a folder)")
        uses_pivot = entry.get("pivot", False)
        if not isinstance(uses_pivot, bool):
            raise UsageError(f"{where}: key 'pivot' must be true or false")
        if uses_pivot and not has_pivot:
            raise UsageError(f"{where}: method {name!r} uses the pivot, but the protocol has no 'pivot' section")
        rest = {k: v for k, v in entry.items() if k not in ("name", "pivot")}
        flags = {**common, **check_minimums(flag_values(rest, parser, where, PER_RUN), where)}
        if flags.get("method") == "kd" and not uses_pivot:
            raise UsageError(f"{where}: method kd distils from the pivot: add 'pivot: true'")
        methods[name] = (flags, uses_pivot)
    return methods


# ---------------------------------------------------------------------------- run state


def run_state(run: Run, out: Path) -> str:
    """finished (all its epochs in metrics.json), interrupted (a checkpoint to resume), new."""
    folder = RunFolder(out / "runs" / run.name)
    metrics = folder.read_metrics()
    epochs = run.flags.get("epochs", build_parser().get_default("epochs"))
    if metrics is not None and metrics.get("final") and len(metrics.get("epochs", [])) >= epochs:
        return "finished"
    if folder.holds_checkpoint():
        return "interrupted"
    return "new"


def command(run: Run, out: Path) -> list[str]:
    """The trainer command of a run; its flags go in OUT/configs/<run>.yaml (written here)."""
    import yaml

    config = out / "configs" / f"{run.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(dict(run.flags), sort_keys=True)
    write_atomic(config, lambda handle: handle.write(text.encode()))
    argv = [sys.executable, "-m", "orc_fast.train", "--config", str(config), "--seed", str(run.seed),
            "--out", str(out / "runs" / run.name), "--progress", "off"]
    if run.needs:
        argv += ["--pivot", str(out / "runs" / run.needs)]
    if run.state == "interrupted":
        argv += ["--resume"]
    elif (out / "runs" / run.name).exists():
        argv += ["--overwrite"]  # a folder with neither a finished run nor a checkpoint: nothing to keep
    return argv


def check_unchanged(runs: list[Run], out: Path) -> None:
    """Refuse to continue a folder whose runs were started with other flags (another or an
    edited protocol): skipping or resuming them would mix two protocols in one table."""
    import yaml

    for run in runs:
        saved = out / "configs" / f"{run.name}.yaml"
        if not saved.is_file() or run_state(run, out) == "new":
            continue
        before = yaml.safe_load(saved.read_text()) or {}
        changed = sorted(key for key in before.keys() | run.flags.keys() if before.get(key) != run.flags.get(key))
        if changed:
            raise UsageError(f"{out} holds run {run.name} started with other values of {', '.join(changed)}; "
                             "use another --out for this protocol, or the protocol that started it")


# ---------------------------------------------------------------------------- the lock


def take_lock(out: Path) -> Path:
    """OUT/compare.lock holding this process's pid; one comparison per folder at a time (a
    lock whose process is gone is taken over)."""
    return RunFolder(out).lock("compare", "comparison")


# ---------------------------------------------------------------------------- running


class Runner:
    """Runs the plan with up to ``jobs`` trainer processes at once; a run waits for its pivot."""

    def __init__(self, runs: list[Run], out: Path, jobs: int):
        self.runs, self.out, self.jobs = runs, out, jobs
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.total = len(runs)

    def say(self, run: Run, text: str) -> None:
        index = self.runs.index(run) + 1
        print(f"[{index}/{self.total}] {run.name}: {text}", flush=True)

    def run_all(self) -> bool:
        """True when every run finished."""
        for run in self.runs:
            run.state = run_state(run, self.out)
            if run.state == "finished":
                self.say(run, "finished before, skipped")
        while True:
            self.reap()
            waiting = [r for r in self.runs if r.state in ("new", "interrupted")]
            for run in waiting:
                if len(self.running) >= self.jobs:
                    break
                blocked = self.blocker(run)
                if blocked == "failed":
                    run.state = "failed"
                    self.say(run, f"not run: its pivot {run.needs} failed")
                elif blocked is None:
                    self.start(run)
            if not self.running and not any(r.state in ("new", "interrupted") for r in self.runs):
                return all(r.state in ("finished", "done") for r in self.runs)
            time.sleep(0.2)

    def blocker(self, run: Run) -> str | None:
        """None when the run can start; "wait" while its pivot is not done; "failed"."""
        if run.needs is None:
            return None
        pivot = next(r for r in self.runs if r.name == run.needs)
        if pivot.state in ("finished", "done"):
            return None
        return "failed" if pivot.state == "failed" else "wait"

    def start(self, run: Run) -> None:
        argv = command(run, self.out)
        log = self.out / "logs" / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(argv)}\n")
            handle.flush()
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.say(run, ("resuming" if run.state == "interrupted" else "started") + f" (log {log})")
        run.state = "running"
        self.running[run.name] = (process, time.perf_counter())
        write_machine(self.out / "runs" / run.name)

    def reap(self) -> None:
        for name, (process, started) in list(self.running.items()):
            if process.poll() is None:
                continue
            del self.running[name]
            run = next(r for r in self.runs if r.name == name)
            minutes = (time.perf_counter() - started) / 60
            metrics = RunFolder(self.out / "runs" / name).read_metrics()
            if process.returncode == 0 and run_state(run, self.out) == "finished":
                run.state = "done"
                final = metrics["final"]
                mean = 100 * sum(final["test_acc"]) / len(final["test_acc"])
                self.say(run, f"done in {minutes:.1f} min: mean member {mean:.2f}%, "
                              f"ensemble {100 * final['ensemble_acc']:.2f}% test")
            else:
                run.state = "failed"
                tail = (self.out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
                self.say(run, f"FAILED (exit {process.returncode}) after {minutes:.1f} min; last lines of its log:")
                for line in tail:
                    print(f"    {line}", flush=True)

    def stop(self) -> None:
        """Ctrl-C: the trainers are in this process group, so a terminal's Ctrl-C reached them
        too; any still running gets SIGINT. Each stops at once and keeps its last checkpoint."""
        for process, _ in self.running.values():
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
        for process, _ in self.running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def stop_on_signals() -> None:
    """Ctrl-C and ``kill PID`` both stop the comparison as Ctrl-C does (its trainers get
    SIGINT and keep their checkpoints). A job started in the background by a script
    (``nohup ... &``) inherits SIGINT ignored, so Python installs no handler of its own and
    SIGINT would do nothing: restore it, and take SIGTERM the same way."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def die_with_parent() -> None:
    """In a trainer child, before exec (Linux): SIGTERM when the comparison dies, even by
    SIGKILL, so no orphaned trainer writes into a folder that a rerun resumes. A trainer
    killed so keeps its last checkpoint (checkpoints are written atomically)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # so the trainer's own Ctrl-C handling is live (stop_on_signals)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def write_machine(folder: Path) -> None:
    """The machine a run (or its latest part) ran on, beside its metrics: a comparison that
    spans sittings may span machines."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(machine(), indent=1)
    write_atomic(folder / "machine.json", lambda handle: handle.write(text.encode()))


# ---------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, metavar="PROTOCOL",
                        help="the protocol YAML (configs/protocols/ holds the project's)")
    parser.add_argument("--out", required=True, help="folder for the runs, table.md, results.json and curves.png")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainer runs at once (default 1; give each its --threads with the protocol's threads)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the table from the runs that finished, start nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    out = Path(options.out)
    try:
        if options.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {options.jobs}")
        protocol = read_protocol(options.config)
        runs = plan_runs(protocol, options.config)
        lock = take_lock(out)
        try:
            check_unchanged(runs, out)
        except UsageError:
            lock.unlink(missing_ok=True)
            raise
    except UsageError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    runner = Runner(runs, out, options.jobs)
    stop_on_signals()
    try:
        complete = True if options.report_only else runner.run_all()
    except KeyboardInterrupt:
        runner.stop()
        print("\ninterrupted; run the same command again to continue: finished runs are skipped and the "
              "interrupted ones resume from their last checkpoint", file=sys.stderr)
        lock.unlink(missing_ok=True)
        return 130
    try:
        finished = {run.name: RunFolder(out / "runs" / run.name).read_metrics() for run in runs
                    if run_state(run, out) == "finished"}
        write_report(protocol, options.config, runs, finished, out)
    finally:
        lock.unlink(missing_ok=True)
    print(f"table in {out / 'table.md'} ({len(finished)} of {len(runs)} runs finished)")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
