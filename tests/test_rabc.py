"""RA-BC weights against numbers worked by hand from the SARM paper's Eq. 8-9 (as LeRobot's
``RABCWeights`` computes them): every expected value below is written out, not recomputed by
the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayrm.score.rabc import progress_deltas, rabc_weights

# Two episodes; episode 1's indices do not start where episode 0's end (bounds come from the
# indices, not from row positions). Rows are given out of order on purpose.
INDEX = [0, 1, 2, 3, 4, 10, 11, 12]
EPISODE = [0, 0, 0, 0, 0, 1, 1, 1]
PROGRESS = [0.0, 0.2, 0.4, 0.4, 0.2, 0.5, 0.55, 0.55]
# chunk 2: t=0: p2-p0; t=1: p3-p1; t=2: p4-p2; t=3: 3+2=5 > 4, clamped: p4-p3; t=4: p4-p4;
# t=10: p12-p10; t=11: clamped to 12: p12-p11; t=12: p12-p12
DELTAS = [0.4, 0.2, -0.2, -0.2, 0.0, 0.05, 0.0, 0.0]
SHUFFLE = [5, 2, 7, 0, 3, 6, 1, 4]


def _shuffled(values):
    return np.asarray(values)[SHUFFLE]


def test_deltas_look_chunk_ahead_and_clamp_at_the_episode_end():
    delta = progress_deltas(_shuffled(INDEX), _shuffled(EPISODE), _shuffled(PROGRESS), 2)
    assert delta == pytest.approx(_shuffled(DELTAS), abs=1e-12)


def test_weights_follow_eq_8_and_9():
    kappa, eps = 0.1, 1e-6
    mean = (0.4 + 0.2 - 0.2 - 0.2 + 0.0 + 0.05 + 0.0 + 0.0) / 8  # 0.03125 > 0: not clamped
    std = math.sqrt(sum((d - mean) ** 2 for d in DELTAS) / 8)  # population std
    low = mean - 2 * std

    def soft(d):  # Eq. 8; 0 <= d <= kappa for both uses below, and the value lies in (0, 1)
        return (d - low) / (4 * std + eps)

    expected = [
        1.0,  # 0.4 > kappa
        1.0,  # 0.2 > kappa
        0.0,  # negative progress
        0.0,
        soft(0.0),  # 0 <= d <= kappa
        soft(0.05),
        soft(0.0),
        soft(0.0),
    ]
    assert 0 < soft(0.0) < soft(0.05) < 1
    result = rabc_weights(
        _shuffled(INDEX), _shuffled(EPISODE), _shuffled(PROGRESS), 2, kappa=kappa, epsilon=eps
    )
    assert result.delta_mean == pytest.approx(0.03125)
    assert result.delta_std == pytest.approx(std)
    assert result.weight == pytest.approx(_shuffled(expected), rel=1e-6)
    assert result.weight.dtype == np.float32


def test_a_negative_mean_delta_is_clamped_to_zero():
    # deltas with chunk 1: -0.1, -0.1, 0.0 (last frame clamped to itself); mean -1/15 -> 0
    result = rabc_weights([0, 1, 2], [7, 7, 7], [0.3, 0.2, 0.1], 1, kappa=0.01, epsilon=0.0)
    mean = (-0.1 - 0.1 + 0.0) / 3
    std = math.sqrt(((-0.1 - mean) ** 2 * 2 + (0.0 - mean) ** 2) / 3)
    assert result.delta_mean == 0.0
    assert result.delta_std == pytest.approx(std)
    # soft(0) = (0 - (0 - 2 std)) / (4 std) = 1/2 exactly when epsilon is 0
    assert result.weight == pytest.approx([0.0, 0.0, 0.5], abs=1e-6)


def test_constant_progress_uses_epsilon_as_std():
    # every delta 0: mean 0, std 0 -> epsilon; soft(0) = 2 eps / (4 eps + eps) = 0.4
    result = rabc_weights([0, 1, 2, 3], [0, 0, 0, 0], [0.5] * 4, 3, kappa=0.01, epsilon=1e-6)
    assert result.delta_std == 1e-6
    assert result.weight == pytest.approx([0.4] * 4, rel=1e-5)


def test_missing_or_nan_progress_gets_the_fallback_weight_and_no_say_in_the_stats():
    # frame 2 has no row (a gap) and frame 4's progress is NaN; chunk 1:
    # t=0: p1-p0 = 0.2; t=1: future 2 missing -> NaN; t=3: future 4 is NaN -> NaN;
    # t=4: its own progress is NaN -> NaN; t=5: last frame, clamped: 0.0
    index = [0, 1, 3, 4, 5]
    progress = [0.0, 0.2, 0.5, float("nan"), 0.9]
    result = rabc_weights(index, [0] * 5, progress, 1, kappa=0.1, fallback_weight=0.25)
    assert np.isnan(result.delta).tolist() == [False, True, True, True, False]
    assert result.delta_mean == pytest.approx((0.2 + 0.0) / 2)  # NaN rows left out
    assert result.delta_std == pytest.approx(0.1)  # deviations +-0.1
    # t=0: 0.2 > kappa -> 1; t=5: soft(0) = (0 - (0.1 - 0.2)) / (0.4 + 1e-6)
    assert result.weight == pytest.approx([1.0, 0.25, 0.25, 0.25, 0.1 / 0.400001], rel=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="once"):
        rabc_weights([0, 0], [0, 0], [0.1, 0.2], 1)
    with pytest.raises(ValueError, match="one value per frame"):
        rabc_weights([0, 1], [0], [0.1, 0.2], 1)
    with pytest.raises(ValueError, match=">= 0"):
        rabc_weights([0, 1], [0, 0], [0.1, 0.2], -1)
