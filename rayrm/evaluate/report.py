"""Metrics per curve kind, the metrics JSON, and the reward-curve plot."""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rayrm import metrics  # noqa: E402
from rayrm.evaluate.curves import CURVE_KINDS  # noqa: E402


def curve_metrics(curves: list[np.ndarray], success: list[bool | None]) -> dict[str, Any]:
    """Metrics of one curve kind. Episodes without a success flag count as experts."""
    expert = [c for c, s in zip(curves, success) if s is not False]
    failed = [c for c, s in zip(curves, success) if s is False]
    finals = [float(c[-1]) for c in curves]
    return {
        "voc_expert": metrics.mean_voc(expert),
        "voc_failure": metrics.mean_voc(failed),
        "mse_expert": metrics.mse_to_progress(expert),
        "final_expert_mean": float(np.mean([c[-1] for c in expert])) if expert else None,
        "final_failure_mean": float(np.mean([c[-1] for c in failed])) if failed else None,
        "auroc_success_vs_failure": metrics.auroc(finals, [s is not False for s in success]),
        "num_expert": len(expert),
        "num_failure": len(failed),
    }


def all_metrics(rows: dict[str, list]) -> dict[str, dict[str, Any]]:
    return {kind: curve_metrics(rows[kind], rows["success"]) for kind in CURVE_KINDS}


def _clean(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(data), f, indent=2)


def plot_curves(path: str, rows: dict[str, list], title: str, per_class: int = 3) -> None:
    """Plain prefix curves (solid) and chained curves (dashed) of a few episodes per class."""
    fig, ax = plt.subplots(figsize=(8, 5))
    picks = [i for i, s in enumerate(rows["success"]) if s is not False][:per_class]
    picks += [i for i, s in enumerate(rows["success"]) if s is False][:per_class]
    for n, i in enumerate(picks):
        failed = rows["success"][i] is False
        color = plt.cm.Reds(0.5 + 0.15 * (n % 3)) if failed else plt.cm.Greens(0.5 + 0.15 * n)
        t = np.arange(len(rows["prefix"][i]))
        label = f"{rows['episode_id'][i]} ({'failure' if failed else 'expert'})"
        ax.plot(t, rows["prefix"][i], color=color, lw=2, label=label)
        ax.plot(t, rows["chained"][i], color=color, lw=1, ls="--")
        if not failed:
            ax.plot(t, metrics.progress_labels(len(t)), color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("frame")
    ax.set_ylabel("predicted progress")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}\nsolid: plain prefix curve, dashed: seed chaining, dotted: (t+1)/T")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
