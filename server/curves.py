"""curves.png: the server's test accuracy round by round, from metrics.jsonl.

One panel per federated stage that ran: base training (FedAvg rounds), each device's fine-tuning (its own
classes, from the cut to the last round) and the fusion head (FedAvg rounds, with the LDA head and the
unsplit base as lines). What a user looks at to see whether more rounds would have helped.
"""

from __future__ import annotations

from ..shared.plots import figure_png, pyplot


def _series(metrics: list[dict], phase: str, key: str, device: int | None = None) -> list[tuple[int, float]]:
    return [(m["round"], m[key]) for m in metrics
            if m.get("phase") == phase and isinstance(m.get("round"), int) and m.get(key) is not None
            and (device is None or m.get("device") == device)]


def curves_png(metrics: list[dict], base_accuracy: float | None = None) -> bytes | None:
    """The PNG, or None when no stage logged a test accuracy per round (a run with none to show)."""
    base = _series(metrics, "base", "test_accuracy")
    devices = sorted({m["device"] for m in metrics if m.get("phase") == "finetune-test"})
    finetune = {}
    for g in devices:  # round 0: the last cut's model (BatchNorm re-estimated where bn-recalibrate is on)
        cut = _series(metrics, "prune-bn", "test_group", g) or _series(metrics, "prune", "test_group", g)
        finetune[g] = [(0, a) for _, a in cut[-1:]] + _series(metrics, "finetune-test", "test_group", g)
    fusion = _series(metrics, "fusion", "test_accuracy")
    lda = [m["test_accuracy"] for m in metrics if m.get("phase") == "fusion-lda" and m.get("test_accuracy") is not None]
    panels = [p for p, on in (("base", base), ("finetune", devices), ("fusion", fusion or lda)) if on]
    if not panels:
        return None

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "base":
            ax.plot(*zip(*base), marker="o", ms=3)
            ax.set_title("base model (FedAvg)", fontsize=10)
        elif panel == "finetune":
            for g in devices:
                if finetune[g]:
                    ax.plot(*zip(*finetune[g]), marker="o", ms=3, label=f"device {g}")
            ax.set_title("fine-tuning: each device on its classes", fontsize=10)
            ax.legend(fontsize=8)
        else:
            if fusion:
                ax.plot(*zip(*fusion), marker="o", ms=3, label="FedAvg head")
            if lda:
                ax.axhline(lda[-1], color="C1", ls="--", label="LDA head")
            if base_accuracy is not None:
                ax.axhline(base_accuracy, color="0.4", ls=":", label="unsplit base")
            ax.set_title("fusion head", fontsize=10)
            ax.legend(fontsize=8)
        ax.set_xlabel("round (0: right after the cut)" if panel == "finetune" else "round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    return figure_png(fig, dpi=100)
