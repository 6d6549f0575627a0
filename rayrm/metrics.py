"""Reward-curve metrics shared by training's validation and by evaluation.

* VOC (value-order correlation, GVL): per episode, Spearman's rank correlation between the
  predicted values in time order and the time index; a constant curve scores 0 (Spearman is
  undefined there, and a curve that says nothing must not look good). Averaged over episodes.
* AUROC: probability that a random successful episode scores higher than a random failed one
  (ties count half), from the final value of each curve.
* MSE against the ground-truth progress (t + 1) / T.
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
