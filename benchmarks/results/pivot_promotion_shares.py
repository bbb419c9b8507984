"""Pivot-mode promotion shares against the students' validation accuracy (analysis only).

Reads committed metrics.json files: the CIFAR-10 CPU protocol runs orc_pivot-s<seed>, kd-s<seed>
(same pivot checkpoint per seed, asserted) and independent-s<seed> in
benchmarks/results/cifar10_cpu_protocol/runs/, and, for context, the seed-0 pivot-mode runs in
benchmarks/results/pivot_lr_cifar10/. Prints the markdown tables of
benchmarks/results/pivot_promotion_shares.md. No training; the test accuracies in
metrics.json are never read.

    .venv/bin/python benchmarks/results/pivot_promotion_shares.py > tables.md

Definitions (the dominant student is picked from promotion shares alone, never from accuracy):
- dominant student D of a run: the highest mean teacher share (= promotion share in pivot
  mode) over the last 10 epochs (the last half of a 10-epoch run); ties to the lower index.
- onset: the first epoch from which D's share stays >= 0.5 to the end, if that lasts >= 3 epochs.
- gap of member i at an evaluated epoch: val_acc[i] - mean of the other members' val_acc.
- KD's natural spread at an epoch: the best member's gap (best by val at that epoch, so an
  upward-biased, best-of-4 reference) and max - min over the 4 members; the same best-of-4
  for the lowest train CE in kd and independent runs.
- train CE is the epoch mean of each member's batch CE (before the step's update): the score
  pivot mode ranks by (orc_fast/roles.py batch_scores, rank_by="ce").
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "cifar10_cpu_protocol" / "runs"
# seed-0 pivot-mode runs kept elsewhere, shown for context (pivot_lr_cifar10.md): the 30-epoch
# run at the old default (pivot refined at 1 x the group's lr) and the two 10-epoch runs of that choice
CONTEXT = [HERE / "pivot_lr_cifar10" / name for name in ("protocol_orc_pivot-s0_scale1", "scale0.1", "scale1")]
LAST = 10  # epochs that define the dominant student (the last 10; the last half for shorter runs)
LATE = (20, 25, 30)  # evaluated epochs averaged for the late lead
MIN_ONSET = 3  # an onset must hold for at least this many epochs


def load(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def tail_of(epochs: list[dict]) -> list[dict]:
    return epochs[-min(LAST, len(epochs) // 2):]


def dominant(epochs: list[dict]) -> int:
    tail = tail_of(epochs)
    n = len(tail[0]["teacher_fraction"])
    shares = [statistics.fmean(e["teacher_fraction"][i] for e in tail) for i in range(n)]
    return max(range(n), key=lambda i: (shares[i], -i))


def onset(epochs: list[dict], d: int) -> int | None:
    start = None
    for e in epochs:
        if e["teacher_fraction"][d] >= 0.5:
            start = e["epoch"] if start is None else start
        else:
            start = None
    if start is not None and epochs[-1]["epoch"] - start + 1 < MIN_ONSET:
        return None
    return start


def low_gap(ce: list[float]) -> float:
    """The lowest train CE minus the mean of the others (a best-of-4, so biased low)."""
    lo = min(range(len(ce)), key=lambda i: ce[i])
    return ce[lo] - statistics.fmean(ce[:lo] + ce[lo + 1:])


def d_gap(values: list[float], d: int) -> float:
    return values[d] - statistics.fmean(values[:d] + values[d + 1:])


def gaps(vals: list[float]) -> list[float]:
    return [v - statistics.fmean(vals[:i] + vals[i + 1:]) for i, v in enumerate(vals)]


def rank_low(values: list[float], i: int) -> int:
    """1 = lowest value (train CE: best)."""
    return 1 + sum(v < values[i] for v in values)


def rank_high(values: list[float], i: int) -> int:
    """1 = highest value (accuracy: best); ties share the better rank."""
    return 1 + sum(v > values[i] for v in values)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def epoch_table(m: dict, kd: dict | None) -> list[str]:
    ep = m["epochs"]
    n = len(ep[0]["teacher_fraction"])
    d = dominant(ep)
    kd_ep = {e["epoch"]: e for e in kd["epochs"]} if kd else {}
    head = ("| epoch | " + " | ".join(f"share s{i}" for i in range(n)) + " | role changes / step | "
            "promotion changes hands (% of steps) | " + " | ".join(f"train CE s{i}" for i in range(n))
            + " | D's CE − others' mean | KD: lowest CE − others' mean | "
            + " | ".join(f"val s{i}" for i in range(n)) + " | pivot val |")
    out = [head, "|" + " ---: |" * (head.count("|") - 1)]
    for e in ep:
        tf, ce = e["teacher_fraction"], e["train_ce"]
        top = max(range(n), key=lambda i: (tf[i], -i))
        shares = [(f"**{tf[i]:.2f}**" if i == top else f"{tf[i]:.2f}") for i in range(n)]
        d_ce = ce[d] - statistics.fmean(ce[:d] + ce[d + 1:])
        kd_cell = "—"
        if e["epoch"] in kd_ep:
            kce = kd_ep[e["epoch"]]["train_ce"]
            lo = min(range(n), key=lambda i: kce[i])
            kd_cell = f"{kce[lo] - statistics.fmean(kce[:lo] + kce[lo + 1:]):+.3f}"
        vals = e.get("val_acc")
        if vals:
            best = max(vals)
            vcells = [(f"**{pct(v)}**" if v == best else pct(v)) for v in vals]
            pv = pct(e["pivot_val_acc"]) if e.get("pivot_val_acc") is not None else "—"
        else:
            vcells, pv = ["" for _ in range(n)], ""
        out.append(f"| {e['epoch']} | " + " | ".join(shares) + f" | {e['role_changes']:.2f} | "
                   f"{50 * e['role_changes']:.0f} | " + " | ".join(f"{c:.3f}" for c in ce)
                   + f" | {d_ce:+.3f} | {kd_cell} | " + " | ".join(vcells) + f" | {pv} |")
    return out


def lead_table(m: dict, kd: dict | None) -> list[str]:
    ep = m["epochs"]
    d = dominant(ep)
    kd_ep = {e["epoch"]: e for e in kd["epochs"]} if kd else {}
    out = ["| epoch | D's share (that epoch) | D's share (mean of the 5 epochs to it) | D's val rank | "
           "D's val − others' mean | D's val − best other | spread of the others (max − min) | "
           "others' mean val | KD: best − others' mean | KD: max − min | KD: mean val |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, e in enumerate(ep):
        vals = e.get("val_acc")
        if not vals:
            continue
        window = ep[max(0, k - 4):k + 1]
        others = vals[:d] + vals[d + 1:]
        row = (f"| {e['epoch']} | {e['teacher_fraction'][d]:.2f} | "
               f"{statistics.fmean(w['teacher_fraction'][d] for w in window):.2f} | {rank_high(vals, d)} of {len(vals)} | "
               f"{pts(gaps(vals)[d])} | {pts(vals[d] - max(others))} | {100 * (max(others) - min(others)):.1f} | "
               f"{pct(statistics.fmean(others))} |")
        ke = kd_ep.get(e["epoch"])
        if ke and ke.get("val_acc"):
            kv = ke["val_acc"]
            row += f" {pts(max(gaps(kv)))} | {100 * (max(kv) - min(kv)):.1f} | {pct(statistics.fmean(kv))} |"
        else:
            row += " — | — | — |"
        out.append(row)
    return out


def summary_row(name: str, m: dict, kd: dict | None, ind: dict | None) -> str:
    ep = m["epochs"]
    d = dominant(ep)
    tail = tail_of(ep)
    share = statistics.fmean(e["teacher_fraction"][d] for e in tail)
    whole = statistics.fmean(e["teacher_fraction"][d] for e in ep)
    on = onset(ep, d)
    ce1 = rank_low(ep[0]["train_ce"], d)
    first_eval = next(e for e in ep if e.get("val_acc"))
    v5 = rank_high(first_eval["val_acc"], d)
    last = ep[-1]["val_acc"]
    ce_d = statistics.fmean(d_gap(e["train_ce"], d) for e in tail)
    same = kd is not None and len(kd["epochs"]) == len(ep)
    late = [e for e in ep if e["epoch"] in LATE and e.get("val_acc")]
    if late:
        lead = statistics.fmean(gaps(e["val_acc"])[d] for e in late)
        over_best = statistics.fmean(e["val_acc"][d] - max(e["val_acc"][:d] + e["val_acc"][d + 1:]) for e in late)
        lead_cells = f"{pts(lead)} | {pts(over_best)}"
    else:
        lead_cells = "— | —"
    if same:
        kd_late = [e for e in kd["epochs"] if e["epoch"] in LATE]
        kd_cells = f"{pts(statistics.fmean(max(gaps(e['val_acc'])) for e in kd_late))} | "
        kd_cells += f"{statistics.fmean(low_gap(e['train_ce']) for e in tail_of(kd['epochs'])):+.3f}"
    else:
        kd_cells = "— | —"
    ind_cell = (f"{statistics.fmean(low_gap(e['train_ce']) for e in tail_of(ind['epochs'])):+.3f}"
                if ind is not None and len(ind["epochs"]) == len(ep) else "—")
    return (f"| {name} | {len(ep)} | s{d} | {share:.2f} | {whole:.2f} | {on if on else 'none'} | "
            f"{ep[-1]['role_changes']:.2f} | {ce1} of 4 | {v5} of 4 ({pts(gaps(first_eval['val_acc'])[d])}) | "
            f"{rank_high(last, d)} of 4 | {pts(gaps(last)[d])} | {lead_cells} | {kd_cells} | {ce_d:+.3f} | {ind_cell} |")


def kd_gap_distribution(kds: list[dict]) -> list[str]:
    allg, bestg = [], []
    for kd in kds:
        for e in kd["epochs"]:
            if e.get("val_acc"):
                g = gaps(e["val_acc"])
                allg += g
                bestg.append(max(g))
    late = []
    for kd in kds:
        for e in kd["epochs"]:
            if e.get("val_acc") and e["epoch"] >= 25:
                late.append(max(gaps(e["val_acc"])))
    late_all = [g for kd in kds for e in kd["epochs"] if e.get("val_acc") and e["epoch"] in LATE
                for g in gaps(e["val_acc"])]
    return [
        f"- every KD member's gap at the late epochs {', '.join(map(str, LATE))} ({len(late_all)} values): sample std "
        f"{100 * statistics.stdev(late_all):.1f} points, range {pts(min(late_all))} to {pts(max(late_all))};",
        f"- every KD member's gap (member − mean of the other three), {len(allg)} values (3 seeds × 6 evaluated "
        f"epochs × 4 members): sample std {100 * statistics.stdev(allg):.1f} points, range "
        f"{pts(min(allg))} to {pts(max(allg))};",
        f"- KD's best-member gap (best on val at that epoch, a best-of-4 that is biased upward): mean "
        f"{pts(statistics.fmean(bestg))}, range {pts(min(bestg))} to {pts(max(bestg))} over the 18 evaluated "
        f"(seed, epoch) pairs; at epochs 25 and 30: {', '.join(pts(x) for x in late)}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--context", type=Path, nargs="*", default=CONTEXT,
                        help="seed-0 pivot-mode runs shown for context (the first with its full table)")
    args = parser.parse_args()

    runs = {s: load(args.runs / f"orc_pivot-s{s}") for s in args.seeds}
    kds = {s: load(args.runs / f"kd-s{s}") for s in args.seeds}
    inds = {s: load(args.runs / f"independent-s{s}") for s in args.seeds}
    for s in args.seeds:  # the KD run must use the same pivot checkpoint
        assert runs[s]["config"]["pivot"] == kds[s]["config"]["pivot"], s
        assert runs[s]["config"]["seed"] == kds[s]["config"]["seed"] == inds[s]["config"]["seed"] == s
    context = [(path, load(path)) for path in args.context if (path / "metrics.json").exists()]

    lines = ["## Summary per run", "",
             "D = the student with the highest promotion share over the last 10 epochs (last 5 in a 10-epoch run). "
             "Gap = val accuracy minus the mean of the other three students, in points. \"late\" = mean over the "
             f"evaluated epochs {', '.join(map(str, LATE))}. KD and independent columns: the same seed's run of that "
             "method, its best-of-4 member at each epoch (lowest train CE, best val), which biases those columns "
             "towards a larger gap. Train-CE columns: mean over the same last epochs.", "",
             "| run | epochs | D | D's share, last epochs | D's share, all epochs | onset (share >= 0.5 to the end, >= 3 epochs) | "
             "role changes / step, last epoch | D's train-CE rank, epoch 1 | D's val rank at epoch 5 (gap) | "
             "D's val rank, last epoch | D's val gap, last epoch | D's val gap, late | D − best other student, late | "
             "KD best member's val gap, late | KD lowest train CE − others | D's train CE − others | "
             "independent lowest train CE − others |",
             "| --- | ---: | --- " + "| ---: " * 14 + "|"]
    for s in args.seeds:
        lines.append(summary_row(f"orc_pivot-s{s}", runs[s], kds[s], inds[s]))
    for path, m in context:
        lines.append(summary_row(f"{path.relative_to(HERE)} (seed 0, pivot lr x {m['config'].get('pivot_lr_scale') or 1:g})",
                                 m, kds.get(0), inds.get(0)))
    lines += ["", "KD's natural spread on the validation split (no promotion; same pivots, frozen):", ""]
    lines += kd_gap_distribution([kds[s] for s in args.seeds])
    for s in args.seeds:
        d = dominant(runs[s]["epochs"])
        lines += ["", f"## orc_pivot-s{s} (dominant student s{d}; KD baseline kd-s{s}, same pivot)", "",
                  "Per epoch (share = fraction of the epoch's 70 steps in which the student was promoted; bold: "
                  "the most promoted student, and the best validation accuracy; the KD column is kd-s"
                  f"{s}'s best-of-4):", ""]
        lines += epoch_table(runs[s], kds[s])
        lines += ["", f"D = s{d} against the other students, on the evaluated epochs, next to kd-s{s}:", ""]
        lines += lead_table(runs[s], kds[s])
    for path, m in context:
        d = dominant(m["epochs"])
        same = len(m["epochs"]) == len(kds[0]["epochs"]) if 0 in kds else False
        lines += ["", f"## Context: {path.relative_to(HERE)} (seed 0, {len(m['epochs'])} epochs, pivot refined at "
                  f"{m['config'].get('pivot_lr_scale') or 1:g} x the group's lr; dominant student s{d})", ""]
        lines += epoch_table(m, kds[0] if same else None)
        lines += [""]
        lines += lead_table(m, kds[0] if same else None)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
