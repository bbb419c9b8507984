"""The run's picture: test accuracy per member over epochs, and how often each was teacher."""

from __future__ import annotations

import io

from .checkpoint import write_atomic


def plot_metrics(metrics: dict, path) -> None:
    """Write a PNG with two panels from a metrics.json dict (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [e for e in metrics["epochs"] if e["ensemble_acc"] is not None]
    archs = metrics["config"].get("archs") or [f"net{i}" for i in range(len(metrics["epochs"][0]["test_acc"]))]
    members = len(archs)
    figure, (accuracy_axes, teacher_axes) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})

    xs = [e["epoch"] for e in epochs]
    for i in range(members):
        accuracy_axes.plot(xs, [100 * e["test_acc"][i] for e in epochs], marker="o", markersize=3, label=f"{i}: {archs[i]}")
    accuracy_axes.plot(xs, [100 * e["ensemble_acc"] for e in epochs], "k--", linewidth=2, label="ensemble")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test top-1 (%)")
    accuracy_axes.set_title(f"{metrics['config'].get('method', '')} on {metrics['config'].get('dataset', '')}")
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize=8)

    # Fraction of training steps each member spent as a teacher, over the whole run.
    all_epochs = metrics["epochs"]
    overall = [sum(e["teacher_fraction"][i] for e in all_epochs) / len(all_epochs) for i in range(members)]
    teacher_axes.bar(range(members), overall, color=[f"C{i}" for i in range(members)], alpha=0.7)
    teacher_axes.set_xticks(range(members), [f"{i}: {a}" for i, a in enumerate(archs)], rotation=30, fontsize=8)
    teacher_axes.set_ylim(0, 1)
    teacher_axes.set_ylabel("fraction of steps as teacher")
    teacher_axes.set_title("who taught")
    teacher_axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue()))
