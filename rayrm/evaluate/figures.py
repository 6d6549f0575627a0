"""Evaluation figures: one PNG per episode, a summary PNG, and the mp4 with the frame beside
the growing curve.

Per episode (``episode_figure``): the three curves (plain prefix solid, seed chaining dashed,
streaming causal as dots on top of the prefix curve), the ground-truth progress dotted when
known, the blind control's prefix curve in grey, ground-truth stages as coloured bands with
their names, the predicted stages (SARM) as a strip below, and the turnaround of rewound
episodes as a vertical line.

The video reuses that figure: it is rendered once with the curves and once without, and frame
t shows the left part of the first up to step t over the second, plus a cursor, beside the
camera frame. Two renders per episode instead of one per frame keep it cheap.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from rayrm import metrics  # noqa: E402
from rayrm.evaluate.curves import CURVE_KINDS  # noqa: E402

STAGE_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
CURVE_STYLE = {
    "prefix": dict(color="#1f4e9c", lw=2.2, label="model: plain prefix"),
    "chained": dict(color="#e07b00", lw=1.4, ls="--", label="model: seed chaining"),
    "causal": dict(color="black", lw=0, marker="o", ms=2.2, label="model: streaming (causal)"),
}
GROUP_COLORS = {"success": "#2a9d4b", "partial": "#e0a100", "failure": "#c0392b"}


def stage_color(k: int) -> str:
    return STAGE_COLORS[k % len(STAGE_COLORS)]


def _spans(stages: np.ndarray) -> list[tuple[int, int, int]]:
    """(stage, first step, last step + 1) of each run of equal stages."""
    edges = np.flatnonzero(np.diff(stages)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(stages)]])
    return [(int(stages[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _draw_stage_bands(ax, true_stage: np.ndarray, names: list[str]) -> None:
    for k, start, end in _spans(true_stage):
        ax.axvspan(start - 0.5, end - 0.5, color=stage_color(k), alpha=0.13, lw=0)
        name = names[k] if k < len(names) else f"stage {k + 1}"
        ax.text((start + end - 1) / 2, 1.0, name, ha="center", va="top", fontsize=7, alpha=0.8)


def _draw_stage_strip(ax, stage_pred: np.ndarray, num_stages: int, names: list[str]):
    cmap = ListedColormap([stage_color(k) for k in range(num_stages)])
    image = ax.imshow(
        stage_pred[None, :],
        aspect="auto",
        cmap=cmap,
        vmin=-0.5,
        vmax=num_stages - 0.5,
        extent=(-0.5, len(stage_pred) - 0.5, 0, 1),
        interpolation="nearest",
    )
    ax.set_yticks([])
    ax.set_ylabel("pred.\nstage", fontsize=7, rotation=0, ha="right", va="center")
    labels = []  # names on runs wide enough to hold them; hidden with the strip in videos
    for k, start, end in _spans(stage_pred):
        if end - start >= max(3, len(stage_pred) // 12) and k < len(names):
            labels.append(
                ax.text(
                    (start + end - 1) / 2,
                    0.5,
                    names[k],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
            )
    return [image, *labels]


def _title(row: dict) -> str:
    if row["kind"] == "rewound":
        outcome = "rewound expert (forward, then backward)"
    else:
        outcome = {True: "success", False: "failure", None: "no success flag"}[row["success"]]
    prefix, chained = row["prefix"], row["chained"]
    return (
        f"{row['episode_id']}  ({outcome}, {len(prefix)} steps)\n"
        f"VOC prefix {metrics.voc(prefix):.2f} · chained {metrics.voc(chained):.2f} · "
        f"final prefix {prefix[-1]:.2f}"
    )


def episode_figure(
    row: dict[str, Any],
    blind: dict[str, Any] | None,
    stage_names: list[str],
    num_stages: int,
    size: tuple[float, float] = (8.0, 4.2),
    dpi: int = 100,
):
    """The episode's figure; returns (figure, main axes, artists that show model output)."""
    sarm = len(row["stage_pred"]) > 0
    fig = plt.figure(figsize=size, dpi=dpi)
    grid = fig.add_gridspec(2 if sarm else 1, 1, height_ratios=[9, 1] if sarm else [1], hspace=0.08)
    ax = fig.add_subplot(grid[0])
    steps = np.arange(len(row["prefix"]))
    if len(row["true_stage"]):
        _draw_stage_bands(ax, np.asarray(row["true_stage"]), stage_names)
    if len(row["true_progress"]):
        ax.plot(steps, row["true_progress"], color="0.35", lw=1.2, ls=":", label="true progress")
    if row["turn"] >= 0:
        ax.axvline(row["turn"], color="0.2", lw=1, ls="-.", label="turnaround")
    hidden = []
    if blind is not None:
        hidden += ax.plot(steps, blind["prefix"], color="0.6", lw=1.4, label="blind control")
    for kind in ("chained", "prefix", "causal"):
        hidden += ax.plot(steps, row[kind], **CURVE_STYLE[kind])
    ax.set_xlim(-0.5, len(steps) - 0.5)
    ax.set_ylim(-0.03, 1.08)
    ax.set_ylabel("progress")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    ax.set_title(_title(row), fontsize=9, pad=30)
    bottom = ax
    if sarm:
        bottom = fig.add_subplot(grid[1], sharex=ax)
        hidden += _draw_stage_strip(bottom, np.asarray(row["stage_pred"]), num_stages, stage_names)
        ax.tick_params(labelbottom=False)
    bottom.set_xlabel("step (frame index for recorded episodes)")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.78, bottom=0.12)
    return fig, ax, hidden


def save_episode_png(path: str, row, blind, stage_names, num_stages) -> None:
    fig, _, _ = episode_figure(row, blind, stage_names, num_stages)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _render(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def curve_video_panels(row, blind, stage_names, num_stages, height: int = 360):
    """(full render, render without model output, x pixel of every step, row range to reveal)."""
    width = 2 * height
    fig, ax, hidden = episode_figure(
        row, blind, stage_names, num_stages, size=(width / 100, height / 100), dpi=100
    )
    full = _render(fig)
    for artist in hidden:
        artist.set_visible(False)
    empty = _render(fig)
    steps = np.arange(len(row["prefix"]))
    xs = ax.transData.transform(np.stack([steps, np.zeros_like(steps)], 1))[:, 0]
    boxes = [a.get_window_extent() for a in fig.axes]
    top = int(full.shape[0] - max(b.y1 for b in boxes))
    bottom = int(full.shape[0] - min(b.y0 for b in boxes))
    plt.close(fig)
    return full, empty, np.round(xs).astype(int), (max(top, 0), bottom)


def video_frames(frames: np.ndarray, row, blind, stage_names, num_stages, height: int = 360):
    """Yield uint8 images: camera frame (upscaled, labelled) beside the curve up to step t."""
    from rayrm.video import draw_label

    full, empty, xs, (top, bottom) = curve_video_panels(row, blind, stage_names, num_stages, height)
    factor = max(1, height // frames.shape[1])
    for t, frame in enumerate(frames):
        panel = empty.copy()
        reveal = slice(0, xs[t] + 1)
        panel[top:bottom, reveal] = full[top:bottom, reveal]
        panel[top:bottom, max(xs[t] - 1, 0) : xs[t] + 1] = (200, 30, 30)  # cursor
        big = np.repeat(np.repeat(frame, factor, axis=0), factor, axis=1)
        label = f"Frame: {row['frame_index'][t]}  progress {row['prefix'][t]:.2f}"
        big = draw_label(big, label)
        canvas = np.full(
            (max(height, big.shape[0]), big.shape[1] + panel.shape[1], 3), 255, np.uint8
        )
        y = (canvas.shape[0] - big.shape[0]) // 2
        canvas[y : y + big.shape[0], : big.shape[1]] = big
        canvas[: panel.shape[0], big.shape[1] :] = panel
        yield canvas


# --------------------------------------------------------------------------- summary figure


def _pick(rows: dict, per_class: int) -> list[int]:
    episodes = [i for i, k in enumerate(rows["kind"]) if k == "episode"]
    good = [i for i in episodes if rows["success"][i] is not False][:per_class]
    bad = [i for i in episodes if rows["success"][i] is False][:per_class]
    return good + bad


def _examples(ax, rows: dict, per_class: int) -> None:
    for n, i in enumerate(_pick(rows, per_class)):
        failed = rows["success"][i] is False
        color = plt.cm.Reds(0.45 + 0.18 * (n % 3)) if failed else plt.cm.Greens(0.45 + 0.18 * n)
        t = np.arange(len(rows["prefix"][i]))
        label = f"{rows['episode_id'][i]} ({'failure' if failed else 'expert'})"
        ax.plot(t, rows["prefix"][i], color=color, lw=2, label=label)
        ax.plot(t, rows["chained"][i], color=color, lw=1, ls="--")
        if not failed:
            ax.plot(t, rows["true_progress"][i], color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="frame", ylabel="progress", ylim=(-0.02, 1.05))
    ax.set_title("examples: plain prefix (solid), chained (dashed), (t+1)/T (dotted)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


SUMMARY_METRICS = [
    ("voc_expert", "VOC expert"),
    ("auroc_success_vs_failure", "AUROC succ. vs fail."),
    ("rank_final_pair_accuracy", "ranking pairs (final)"),
    ("rewind_fall_rate", "rewound: falls"),
    ("stage_accuracy", "stage accuracy"),
]


def _metric_bars(ax, model: dict, blind: dict | None) -> None:
    shown = [(k, label) for k, label in SUMMARY_METRICS if model["prefix"].get(k) is not None]
    width = 0.8 / (len(CURVE_KINDS) * (2 if blind else 1))
    x = np.arange(len(shown))
    n = 0
    for source, table, alpha in (("model", model, 1.0), ("blind", blind, 0.45)):
        if table is None:
            continue
        for kind in CURVE_KINDS:
            values = [table[kind].get(k) for k, _ in shown]
            values = [np.nan if v is None else float(v) for v in values]
            color = CURVE_STYLE[kind]["color"] if kind != "causal" else "0.25"
            ax.bar(
                x - 0.4 + (n + 0.5) * width,
                values,
                width,
                color=color,
                alpha=alpha,
                label=f"{source}: {kind}",
                hatch="//" if source == "blind" else None,
            )
            n += 1
    ax.set_xticks(x, [label for _, label in shown], fontsize=7)
    ax.set_ylim(0, 1.32)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.axhline(0.5, color="0.5", lw=0.6, ls=":")
    ax.set_title("metrics per curve kind: model vs blind control (hatched)", fontsize=9)
    ax.legend(fontsize=6, ncol=3, loc="upper center")


def _resampled(curve, points: int = 50) -> np.ndarray:
    curve = np.asarray(curve, np.float64)
    return np.interp(np.linspace(0, 1, points), np.linspace(0, 1, len(curve)), curve)


def _group_means(ax, rows: dict, blind: dict | None, groups: list[str], episodes: list[int]):
    grid = np.linspace(0, 1, 50)
    for group in ("success", "partial", "failure"):
        members = [i for i, g in zip(episodes, groups) if g == group]
        if not members:
            continue
        color = GROUP_COLORS[group]
        mean = np.mean([_resampled(rows["prefix"][i]) for i in members], axis=0)
        ax.plot(grid, mean, color=color, lw=2, label=f"{group} (n={len(members)})")
        if blind is not None:
            mean = np.mean([_resampled(blind["prefix"][i]) for i in members], axis=0)
            ax.plot(grid, mean, color=color, lw=1, ls="--")
    ax.set(xlabel="time (share of the episode)", ylabel="mean prefix progress", ylim=(-0.02, 1.05))
    ax.set_title("mean curve per outcome group (dashed: blind control)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def _rewound(ax, rows: dict, blind: dict | None) -> None:
    rewound = [i for i, k in enumerate(rows["kind"]) if k == "rewound"]
    if not rewound:
        ax.text(0.5, 0.5, "no rewound episodes", ha="center", va="center")
        ax.set_axis_off()
        return
    for i in rewound:
        t = np.arange(len(rows["prefix"][i])) - rows["turn"][i]
        ax.plot(t, rows["prefix"][i], color="#1f4e9c", lw=0.8, alpha=0.5)
        ax.plot(t, rows["chained"][i], color="#e07b00", lw=0.8, alpha=0.5, ls="--")
        if blind is not None:
            ax.plot(t, blind["prefix"][i], color="0.6", lw=0.8, alpha=0.5)
        ax.plot(t, rows["true_progress"][i], color="0.3", lw=0.6, ls=":")
    ax.axvline(0, color="0.2", lw=1, ls="-.")
    ax.plot([], [], color="#1f4e9c", label="model: plain prefix")
    ax.plot([], [], color="#e07b00", ls="--", label="model: chained")
    if blind is not None:
        ax.plot([], [], color="0.6", label="blind control")
    ax.plot([], [], color="0.3", ls=":", label="true progress")
    ax.set(xlabel="steps from the turnaround", ylabel="progress", ylim=(-0.02, 1.05))
    ax.set_title("rewound experts: should fall after the turnaround", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")


def summary_figure(
    path, rows, blind_rows, model_metrics, blind_metrics, groups, title, per_class=3
):
    episodes = [i for i, k in enumerate(rows["kind"]) if k == "episode"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    _examples(axes[0, 0], rows, per_class)
    _metric_bars(axes[0, 1], model_metrics, blind_metrics)
    _group_means(axes[1, 0], rows, blind_rows, groups, episodes)
    _rewound(axes[1, 1], rows, blind_rows)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
