"""RA-BC sample weights from per-frame progress (SARM paper, arXiv 2509.25358, Eq. 8-9).

The same computation as LeRobot's ``RABCWeights`` (``src/lerobot/rewards/sarm/rabc.py``,
``_compute_global_stats``, ``_compute_delta`` and ``_compute_weights``), done once over a
whole progress table instead of per training batch:

- frames are identified by their global ``index``; an episode spans the indices from its
  smallest to its largest one;
- ``delta[t] = progress[t + N] - progress[t]``, where ``t + N`` past the episode's last
  frame is clamped to that frame (so the last frames compare with the episode's end);
- a delta is invalid (NaN) when ``progress[t]`` or ``progress[t + N]`` is NaN or has no row;
- ``mu = max(mean(deltas), 0)`` and ``sigma = max(std(deltas), epsilon)`` over all valid
  deltas of the table (population std, numpy's default, as LeRobot);
- soft weight (Eq. 8): ``clip((delta - (mu - 2 sigma)) / (4 sigma + epsilon), 0, 1)``;
- weight (Eq. 9): 1 when ``delta > kappa``, the soft weight when ``0 <= delta <= kappa``,
  0 when ``delta < 0``, and ``fallback_weight`` when the delta is invalid.

LeRobot then rescales each training batch's weights to sum to the batch size; that step
belongs to the batch, not to the frame, so it is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# LeRobot's RABCWeights defaults.
DEFAULT_KAPPA = 0.01
DEFAULT_EPSILON = 1e-6
DEFAULT_FALLBACK_WEIGHT = 1.0


@dataclass(frozen=True)
class RabcWeights:
    """Per-frame deltas and weights (in the input's row order) and the global statistics."""

    delta: np.ndarray  # float64, NaN where invalid
    weight: np.ndarray  # float32
    delta_mean: float  # mu
    delta_std: float  # sigma


def progress_deltas(
    index: np.ndarray, episode_index: np.ndarray, progress: np.ndarray, chunk_size: int
) -> np.ndarray:
    """``progress[t + chunk_size] - progress[t]`` for every row, clamped at the episode's
    last index; NaN where either progress value is NaN or the future index has no row."""
    if chunk_size < 0:
        raise ValueError(f"rabc chunk size must be >= 0, got {chunk_size}")
    index = np.asarray(index, dtype=np.int64)
    episode_index = np.asarray(episode_index, dtype=np.int64)
    progress = np.asarray(progress, dtype=np.float64)
    if not (len(index) == len(episode_index) == len(progress)):
        raise ValueError("index, episode_index and progress must have one value per frame")
    if len(np.unique(index)) != len(index):
        raise ValueError("index must identify each frame once (a repeated index was found)")
    episode_end = _episode_last_index(index, episode_index)
    future = np.minimum(index + chunk_size, episode_end)
    order = np.argsort(index)
    pos = np.searchsorted(index[order], future)
    pos_ok = pos < len(index)
    found = np.zeros(len(index), dtype=bool)
    found[pos_ok] = index[order][pos[pos_ok]] == future[pos_ok]
    future_progress = np.full(len(index), np.nan)
    future_progress[found] = progress[order][pos[found]]
    return future_progress - progress  # NaN propagates from either side


def _episode_last_index(index: np.ndarray, episode_index: np.ndarray) -> np.ndarray:
    """For each row, the largest ``index`` of its episode."""
    episodes, inverse = np.unique(episode_index, return_inverse=True)
    last = np.full(len(episodes), np.iinfo(np.int64).min)
    np.maximum.at(last, inverse, index)
    return last[inverse]


def rabc_weights(
    index: np.ndarray,
    episode_index: np.ndarray,
    progress: np.ndarray,
    chunk_size: int,
    kappa: float = DEFAULT_KAPPA,
    epsilon: float = DEFAULT_EPSILON,
    fallback_weight: float = DEFAULT_FALLBACK_WEIGHT,
) -> RabcWeights:
    """RA-BC weights of every frame (see the module docstring for the exact rule)."""
    delta = progress_deltas(index, episode_index, progress, chunk_size)
    valid = ~np.isnan(delta)
    if valid.any():
        mean = max(float(np.mean(delta[valid])), 0.0)
        std = max(float(np.std(delta[valid])), epsilon)
    else:
        mean, std = 0.0, epsilon
    soft = np.clip((delta - (mean - 2 * std)) / (4 * std + epsilon), 0.0, 1.0)
    weight = np.zeros(len(delta), dtype=np.float32)
    weight[delta > kappa] = 1.0
    moderate = (delta >= 0) & (delta <= kappa)
    weight[moderate] = soft[moderate]
    weight[~valid] = fallback_weight
    return RabcWeights(delta=delta, weight=weight, delta_mean=mean, delta_std=std)
