"""The run's picture (curves.png), per epoch: test accuracy per member, each member's loss
terms, and who taught."""

from __future__ import annotations

import io

from .checkpoint import write_atomic


def _epoch_axis(axes) -> None:
    """Whole epochs on the x axis (matplotlib's default gives 0.5-steps for short runs)."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_xlabel("epoch")
    axes.grid(alpha=0.3)


def _accuracy_panel(axes, metrics: dict, archs: list[str]) -> None:
    epochs = [e for e in metrics["epochs"] if e["ensemble_acc"] is not None]
    xs = [e["epoch"] for e in epochs]
    for i, arch in enumerate(archs):
        axes.plot(xs, [100 * e["test_acc"][i] for e in epochs], color=f"C{i}", marker="o", markersize=3,
                  label=f"{i}: {arch}")
    axes.plot(xs, [100 * e["ensemble_acc"] for e in epochs], "k--", linewidth=2, label="ensemble")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title(f"{metrics['config'].get('method', '')} on {metrics['config'].get('dataset', '')}")
    axes.legend(fontsize=8)
    _epoch_axis(axes)


def _loss_panel(axes, metrics: dict, archs: list[str]) -> None:
    """Each member's CE (solid) and tau^2 KL term (dashed, where it distils) per epoch.
    Runs from before the terms were logged show their total loss instead."""
    epochs = metrics["epochs"]
    xs = [e["epoch"] for e in epochs]
    for i in range(len(archs)):
        if "train_ce" not in epochs[0]:
            axes.plot(xs, [e["train_loss"][i] for e in epochs], color=f"C{i}", label=f"{i}: loss")
            continue
        axes.plot(xs, [e["train_ce"][i] for e in epochs], color=f"C{i}", label=f"{i}: CE")
        if any(e["train_kd"][i] for e in epochs):
            axes.plot(xs, [e["train_kd"][i] for e in epochs], color=f"C{i}", linestyle="--", label=f"{i}: KD")
    axes.set_ylabel("training loss term (mean per step)")
    axes.set_title("loss terms")
    axes.legend(fontsize=7, ncol=2)
    _epoch_axis(axes)


def _teacher_panel(axes, metrics: dict, archs: list[str]) -> None:
    """ORC's roles over time: the share of each epoch's steps a member spent as a teacher
    (pivot mode: promoted into the teacher group). Baselines have no roles, and say so."""
    epochs = metrics["epochs"]
    method = metrics["config"].get("method", "")
    axes.set_title("who taught" if method == "orc" else "roles")
    if method != "orc":
        axes.text(0.5, 0.5, f"{method}: no teacher roles\n(every member trains the same way)",
                  ha="center", va="center", transform=axes.transAxes, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
        return
    xs = [e["epoch"] for e in epochs]
    for i, arch in enumerate(archs):
        axes.plot(xs, [e["teacher_fraction"][i] for e in epochs], color=f"C{i}", marker="o", markersize=3,
                  label=f"{i}: {arch}")
    axes.set_ylim(-0.02, 1.02)
    pivot = metrics["config"].get("pivot")
    axes.set_ylabel("share of steps promoted" if pivot else "share of steps as teacher")
    axes.legend(fontsize=8)
    _epoch_axis(axes)


def plot_metrics(metrics: dict, path) -> None:
    """Write the three panels from a metrics.json dict (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    archs = metrics["config"].get("archs") or [f"net{i}" for i in range(len(metrics["epochs"][0]["test_acc"]))]
    figure, panels = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 3, 2]})
    _accuracy_panel(panels[0], metrics, archs)
    _loss_panel(panels[1], metrics, archs)
    _teacher_panel(panels[2], metrics, archs)
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue()))
