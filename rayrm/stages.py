"""Stage math for SARM-style labels (docs/recipe.md#stages), shared by annotate, train and evaluate.

Plain numpy, no torch and no rayrm imports, so training, evaluation and annotation can all
import it without cycles.

Boundaries are the first frames of stages 2..K: ``[b_1, ..., b_{K-1}]``, strictly increasing
in 1..T-1 (every stage holds at least one frame). With ``s = [0, b_1, ..., b_{K-1}, T]``,
stage k spans frames [s_k, s_{k+1}) and::

    stage[t] = k
    subtask_progress[t] = (t - s_k + 1) / (s_{k+1} - s_k)

e.g. T = 10, boundaries [3, 7] -> stage 0 0 0 1 1 1 1 2 2 2,
subtask 1/3 2/3 1 1/4 2/4 3/4 1 1/3 2/3 1.

Stage priors (the share of the task each stage stands for) turn a (stage, subtask progress)
pair into total progress: ``progress = cumulative_prior[stage] + prior[stage] * subtask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rayrm.errors import UserError

PRIOR_MODES = ("episode", "frame")


def boundary_problem(boundaries: Sequence[int], num_frames: int, num_stages: int) -> str | None:
    """Why ``boundaries`` can't label an episode of ``num_frames`` frames, or None if they can."""
    if len(boundaries) != num_stages - 1:
        return (
            f"{len(boundaries)} boundaries, expected {num_stages - 1} "
            f"(K={num_stages} stages: the first frames of stages 2..K)"
        )
    outside = [int(b) for b in boundaries if not 1 <= b <= num_frames - 1]
    if outside:
        return f"boundaries {outside} outside 1..T-1 (T={num_frames} frames)"
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        return f"boundaries {list(boundaries)} are not strictly increasing"
    return None


def stage_labels(boundaries: Sequence[int], num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``stage`` (int32 [T]) and ``subtask_progress`` (float32 [T]) from boundaries.

    Boundaries must already be valid (see :func:`boundary_problem`)."""
    starts = np.asarray([0, *boundaries, num_frames], dtype=np.int64)
    lengths = np.diff(starts)
    if np.any(lengths < 1):
        raise UserError(f"boundaries {list(boundaries)} leave an empty stage (T={num_frames})")
    stage = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    t = np.arange(num_frames, dtype=np.float64)
    subtask = (t - starts[stage] + 1) / lengths[stage]
    return stage, subtask.astype(np.float32)


def stage_priors(
    stage_lists: Sequence[Sequence[int]], num_stages: int, mode: str = "episode"
) -> np.ndarray:
    """Prior share of each stage, float64 [K], summing to 1.

    * ``episode`` (SARM paper, default): per episode the fraction of its frames in each stage,
      averaged over episodes; every demonstration counts the same, whatever its length.
    * ``frame`` (the reference pipeline's): the share of all frames in each stage; long
      episodes weigh more.

    Empty stage lists (unannotated episodes) are skipped. A stage no episode reaches gets a
    prior of 0.
    """
    if mode not in PRIOR_MODES:
        raise UserError(f"stage prior mode must be one of {PRIOR_MODES}, got {mode!r}")
    counts = [
        np.bincount(np.asarray(s, dtype=np.int64), minlength=num_stages)
        for s in stage_lists
        if len(s)
    ]
    if not counts:
        raise UserError("no annotated episode to compute stage priors from")
    counts = np.stack(counts).astype(np.float64)
    if counts.shape[1] != num_stages:
        raise UserError(f"stage index >= num_stages={num_stages}")
    if mode == "episode":
        return (counts / counts.sum(axis=1, keepdims=True)).mean(axis=0)
    return counts.sum(axis=0) / counts.sum()


def cumulative_prior(priors: Sequence[float]) -> np.ndarray:
    """Exclusive cumulative sum: the progress at the start of each stage."""
    priors = np.asarray(priors, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(priors)[:-1]])


def stage_progress(stage: np.ndarray, subtask: np.ndarray, priors: Sequence[float]) -> np.ndarray:
    """Total progress from stages and subtask progress: cum_prior[stage] + prior[stage] * sub."""
    priors = np.asarray(priors, dtype=np.float64)
    stage = np.asarray(stage, dtype=np.int64)
    return cumulative_prior(priors)[stage] + priors[stage] * np.asarray(subtask, np.float64)
