"""A comparison's report (orc_fast/compare.py): table.md, results.json and curves.png from
the finished runs' metrics.json files, and nothing else (docs/design.md §5.1)."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from .checkpoint import write_atomic
from .precision import cpu_flags

COLUMNS = ("mean_member", "best_member", "ensemble", "val_ensemble", "role_changes", "minutes", "images_per_s")
HEADERS = ("mean member test", "best member test", "ensemble test", "val ensemble", "role changes / step",
           "wall (min)", "images/s")


def machine() -> dict:
    """The processor (``processor_name``), cores, torch and, if any, the GPU."""
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""  # processor_name falls back to the platform's name
    processor = processor_name(cpuinfo)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"processor": processor, "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu}


def processor_name(cpuinfo: str) -> str:
    """/proc/cpuinfo's model name with the x86 family and model and the bf16 hardware: a
    virtual machine's model name alone ("AMD EPYC") does not tell Zen 3 from Zen 5, and
    timings compare only within one processor."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    flags = cpu_flags(cpuinfo)
    details += [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
    return name + (f" ({', '.join(details)})" if details else "")


def run_row(run, metrics: dict, folder: Path) -> dict:
    """One finished run's numbers (accuracies in %): mean member, the best member on the
    validation split (its test accuracy), ensemble, validation ensemble, role changes per
    step (ORC only), wall minutes (training and evaluation), mean images/s."""
    final, epochs = metrics["final"], metrics["epochs"]
    test = final["test_acc"]
    best = final.get("best_member")
    orc = metrics["config"].get("method") == "orc"
    try:
        ran_on = json.loads((folder / "machine.json").read_text())
    except (OSError, ValueError):
        ran_on = None
    return {
        "run": run.name, "method": run.method, "seed": run.seed,
        "mean_member": 100 * sum(test) / len(test),
        "best_member": None if best is None else 100 * test[best],
        "ensemble": 100 * final["ensemble_acc"],
        "val_ensemble": None if final.get("val_ensemble_acc") is None else 100 * final["val_ensemble_acc"],
        "role_changes": sum(e["role_changes"] for e in epochs) / len(epochs) if orc else None,
        # None for a run trained before epochs recorded their seconds
        "minutes": sum(e["seconds"] for e in epochs) / 60 if all("seconds" in e for e in epochs) else None,
        "images_per_s": sum(e["images_per_s"] for e in epochs) / len(epochs),
        "members": [100 * a for a in test], "best_member_index": best,
        "curve": [[e["epoch"], 100 * sum(e["test_acc"]) / len(e["test_acc"])] for e in epochs if e["test_acc"]],
        "machine": ran_on,
    }


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: mean and sample standard deviation over its finished seeds."""
    summary = []
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        entry = {"method": method, "seeds": [row["seed"] for row in mine]}
        for column in COLUMNS:
            values = [row[column] for row in mine if row[column] is not None]
            entry[column] = {"mean": statistics.fmean(values) if values else None,
                             "std": statistics.stdev(values) if len(values) > 1 else None}
        summary.append(entry)
    return summary


def cell(value: dict, digits: int = 2) -> str:
    if value["mean"] is None:
        return "—"
    text = f"{value['mean']:.{digits}f}"
    return text + (f" ± {value['std']:.{digits}f}" if value["std"] is not None else "")


def table_text(protocol: dict, path: str, summary: list[dict], rows: list[dict], planned: int) -> str:
    here = machine()
    ran_on = sorted({row["machine"]["processor"] for row in rows if row["machine"]})
    lines = [
        f"# {protocol.get('name', Path(path).stem)}: comparison",
        "",
        f"Protocol: `{path}`. {protocol.get('description', '').strip()}".rstrip(),
        "",
        f"Written on {here['processor']} ({here['cores']} cores), torch {here['torch']}"
        + (f", {here['gpu']}" if here["gpu"] else "") + "; runs ran on: " + ("; ".join(ran_on) or "unknown") + ".",
        f"{len(rows)} of {planned} runs finished. Test top-1 in %, mean ± sample std over the seeds that finished; "
        "the best member is the one the validation split ranks first, reported on test.",
        "",
        "| method | seeds | " + " | ".join(HEADERS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in HEADERS) + " |",
    ]
    for entry in summary:
        digits = {"role_changes": 2, "minutes": 1, "images_per_s": 0}
        cells = [cell(entry[c], digits.get(c, 2)) for c in COLUMNS]
        lines.append(f"| {entry['method']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| run | members (test) | " + " | ".join(HEADERS) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in HEADERS) + " |"]
    for row in rows:
        members = " / ".join(f"{m:.2f}" for m in row["members"])
        cells = ["—" if row[c] is None else f"{row[c]:.{2 if c not in ('minutes', 'images_per_s') else 1}f}"
                 for c in COLUMNS]
        lines.append(f"| {row['run']} | {members} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], methods: list[str], path: Path) -> None:
    """Mean-member test accuracy per method over epochs: a colour per method, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 5))
    styles = ("-", "--", ":", "-.")
    seeds = sorted({row["seed"] for row in rows})
    for colour, method in enumerate(methods):
        for row in (r for r in rows if r["method"] == method):
            xs, ys = zip(*row["curve"]) if row["curve"] else ((), ())
            first = row is next(r for r in rows if r["method"] == method)
            axes.plot(xs, ys, color=f"C{colour}", linestyle=styles[seeds.index(row["seed"]) % len(styles)],
                      marker="o", markersize=3, label=method if first else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean member test top-1 (%)")
    axes.set_title("test accuracy per method (line style: seed)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue()))


def write_report(protocol: dict, path: str, runs: list, finished: dict, out: Path) -> None:
    """table.md, results.json, curves.png in ``out`` from ``finished`` {run name: metrics}."""
    methods = list(dict.fromkeys(run.method for run in runs))
    rows = [run_row(run, finished[run.name], out / "runs" / run.name) for run in runs if run.name in finished]
    summary = summarise(rows, methods)
    text = table_text(protocol, path, summary, rows, len(runs))
    write_atomic(out / "table.md", lambda handle: handle.write(text.encode()))
    results = json.dumps({"protocol": path, "protocol_values": protocol, "written_on": machine(),
                          "summary": summary, "runs": rows}, indent=1)
    write_atomic(out / "results.json", lambda handle: handle.write(results.encode()))
    if rows:
        plot_curves(rows, methods, out / "curves.png")
