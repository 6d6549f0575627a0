"""Reward-curve metrics shared by training's validation and by evaluation.

* VOC (value-order correlation, GVL): per episode, Spearman's rank correlation between the
  predicted values in time order and the time index; a constant curve scores 0 (Spearman is
  undefined there, and a curve that says nothing must not look good). Averaged over episodes.
* AUROC: probability that a random successful episode scores higher than a random failed one
  (ties count half), from the final value of each curve.
* MSE against the ground-truth progress (t + 1) / T, or any per-frame target.
* Stage accuracy (SARM): share of frames whose predicted stage is the labelled one.
* Rollout ranking: do success > partial > failure episodes get decreasing rewards?
* Rewound episodes (played forward, then backward): does the curve fall after the turn?
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def voc(curve: Sequence[float]) -> float:
    values = np.asarray(curve, dtype=np.float64)
    if values.size < 2 or np.all(values == values[0]):
        return 0.0
    ranks = rankdata(values)
    time_ranks = np.arange(1, values.size + 1, dtype=np.float64)
    return float(np.corrcoef(ranks, time_ranks)[0, 1])


def mean_voc(curves: Sequence[Sequence[float]]) -> float:
    return float(np.mean([voc(c) for c in curves])) if len(curves) else float("nan")


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Mann-Whitney form of the ROC area; NaN unless both classes are present."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def progress_labels(num_frames: int) -> np.ndarray:
    return (np.arange(num_frames, dtype=np.float64) + 1) / num_frames


def mse_to_progress(curves: Sequence[Sequence[float]]) -> float:
    """Mean over episodes of the per-frame squared error to (t + 1) / T."""
    if not len(curves):
        return float("nan")
    errors = [np.mean((np.asarray(c) - progress_labels(len(c))) ** 2) for c in curves]
    return float(np.mean(errors))


def mse_to_targets(curves: Sequence[Sequence[float]], targets: Sequence[Sequence[float]]) -> float:
    """Mean over episodes of the per-frame squared error to any per-frame target."""
    if not len(curves):
        return float("nan")
    errors = [
        np.mean((np.asarray(c, float) - np.asarray(t, float)) ** 2) for c, t in zip(curves, targets)
    ]
    return float(np.mean(errors))


def stage_accuracy(predicted: Sequence[Sequence[int]], true: Sequence[Sequence[int]]) -> float:
    """Share of frames whose predicted stage is the labelled one, over all frames pooled.

    Episodes without labels (empty ``true``) are left out; NaN when none is labelled."""
    pairs = [(np.asarray(p), np.asarray(t)) for p, t in zip(predicted, true) if len(t)]
    if not pairs:
        return float("nan")
    correct = sum(int(np.sum(p == t)) for p, t in pairs)
    return correct / sum(len(t) for _, t in pairs)


# --- rollout ranking ----------------------------------------------------------------------

OUTCOMES = ("success", "partial", "failure")


def outcome_group(success: bool | None, stages_reached: int, num_stages: int) -> str:
    """``success`` (flag true or unknown), ``partial`` (failed after reaching more than half
    of the K stages), or ``failure`` (failed earlier, or no stage information)."""
    if success is not False:
        return "success"
    if num_stages > 1 and stages_reached > num_stages / 2:
        return "partial"
    return "failure"


def rollout_ranking(scores: Sequence[float], groups: Sequence[str]) -> dict:
    """Does the reward rank success > partial > failure?

    Returns the mean score of each group present, ``ordered`` (the means of the groups present
    decrease strictly in that order; None with fewer than two groups), and ``pair_accuracy``:
    over all pairs of episodes from different groups, the share ranked in the right order
    (ties count half; NaN with fewer than two groups)."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    present = [g for g in OUTCOMES if np.any(groups == g)]
    means = {g: float(scores[groups == g].mean()) for g in present}
    ordered = None
    if len(present) >= 2:
        ordered = all(means[a] > means[b] for a, b in zip(present, present[1:]))
    wins, pairs = 0.0, 0
    for i, better in enumerate(present):
        for worse in present[i + 1 :]:
            diff = scores[groups == better][:, None] - scores[groups == worse][None, :]
            wins += float(np.sum(diff > 0) + 0.5 * np.sum(diff == 0))
            pairs += diff.size
    return {
        "means": means,
        "counts": {g: int(np.sum(groups == g)) for g in present},
        "ordered": ordered,
        "pair_accuracy": wins / pairs if pairs else float("nan"),
    }


# --- rewound episodes ---------------------------------------------------------------------


def rewind_metrics(curves: Sequence[Sequence[float]], turns: Sequence[int]) -> dict:
    """For episodes played forward up to frame index ``turn`` and then backward: does the curve
    fall after the turnaround?

    * ``voc_after_turn``: mean VOC of curve[turn:] (-1 = falls steadily, the ideal);
    * ``fall_rate``: share of episodes whose last value is below the value at the turn;
    * ``drop_mean``: mean of curve[turn] - curve[-1] (positive = falls)."""
    if not len(curves):
        return {
            "voc_after_turn": float("nan"),
            "fall_rate": float("nan"),
            "drop_mean": float("nan"),
        }
    after = [np.asarray(c, np.float64)[t:] for c, t in zip(curves, turns)]
    drops = np.array([a[0] - a[-1] for a in after])
    return {
        "voc_after_turn": mean_voc(after),
        "fall_rate": float(np.mean(drops > 0)),
        "drop_mean": float(drops.mean()),
    }
