"""Curve metrics (rayrm.metrics) and chaining (rayrm.evaluate.curves.chain_curve)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from rayrm import metrics
from rayrm.evaluate.curves import chain_curve

# --- VOC ---------------------------------------------------------------------------------


def test_voc_is_spearman_against_time():
    rng = np.random.default_rng(0)
    for length in (2, 3, 7, 50, 300):
        for _ in range(5):
            curve = rng.random(length)
            expected = spearmanr(curve, np.arange(length)).statistic
            assert metrics.voc(curve) == pytest.approx(expected, abs=1e-12)


def test_voc_with_ties_uses_average_ranks_like_spearman():
    rng = np.random.default_rng(1)
    for length in (4, 20, 101):
        curve = rng.integers(0, 4, size=length).astype(float)  # many ties
        if np.all(curve == curve[0]):
            continue
        expected = spearmanr(curve, np.arange(length)).statistic
        assert metrics.voc(curve) == pytest.approx(expected, abs=1e-12)
    # by hand: [0, 1, 1, 2] -> ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert metrics.voc([0, 1, 1, 2]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_voc_extremes():
    assert metrics.voc(np.linspace(0, 1, 10)) == pytest.approx(1.0)
    assert metrics.voc(np.linspace(1, 0, 10)) == pytest.approx(-1.0)
    assert metrics.voc([0.1, 0.2, 0.15, 0.9]) == pytest.approx(0.8)  # only the order counts
    # constant (Spearman undefined) and too-short curves say nothing: 0, never NaN
    assert metrics.voc([0.4] * 12) == 0.0
    assert metrics.voc([0.4]) == 0.0
    assert metrics.voc([]) == 0.0


def test_mean_voc():
    up, down, flat = [0, 1, 2], [2, 1, 0], [1, 1, 1]
    assert metrics.mean_voc([up, down, flat, up]) == pytest.approx(0.25)
    assert math.isnan(metrics.mean_voc([]))


# --- AUROC -------------------------------------------------------------------------------


def brute_force_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_and_sklearn():
    from sklearn.metrics import roc_auc_score  # a dev dependency: never skipped

    rng = np.random.default_rng(2)
    for size in (2, 5, 40):
        for _ in range(5):
            positive = rng.random(size) < 0.5
            if positive.all() or not positive.any():
                positive[0] = not positive[0]
            for scores in (rng.random(size), rng.integers(0, 3, size).astype(float)):  # ties
                got = metrics.auroc(scores, positive)
                assert got == pytest.approx(brute_force_auroc(scores, positive), abs=1e-12)
                assert got == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)


def test_auroc_by_hand():
    assert metrics.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert metrics.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    # pairs (pos 0.5 vs neg 0.5) tie -> 0.5; (pos 0.5 vs neg 0.1) -> 1: mean 0.75
    assert metrics.auroc([0.5, 0.5, 0.1], [True, False, False]) == 0.75


def test_auroc_needs_both_classes():
    assert math.isnan(metrics.auroc([0.1, 0.9], [True, True]))
    assert math.isnan(metrics.auroc([0.1, 0.9], [False, False]))
    assert math.isnan(metrics.auroc([], []))


# --- MSE to progress ---------------------------------------------------------------------


def test_mse_to_progress_by_hand():
    np.testing.assert_allclose(metrics.progress_labels(4), [0.25, 0.5, 0.75, 1.0])
    # curve 1 (T=4): errors 0.25, 0, 0.25, 0 -> squared mean (0.0625 * 2) / 4 = 0.03125
    # curve 2 (T=2): labels [0.5, 1]; curve [0.5, 1] -> 0
    curves = [[0.0, 0.5, 1.0, 1.0], [0.5, 1.0]]
    assert metrics.mse_to_progress(curves) == pytest.approx((0.03125 + 0.0) / 2)
    assert metrics.mse_to_progress([metrics.progress_labels(9)]) == 0.0
    assert math.isnan(metrics.mse_to_progress([]))


# --- chaining (docs/recipe.md#curves) -------------------------------------------------------------


def test_chain_curve_by_hand():
    # total[i] = p[o] + (1 - p[o]) * p[i], o = max(i - L + 1, 0); L = 3
    p = [0.1, 0.2, 0.5, 0.4, 0.9]
    expected = [
        0.1 + 0.9 * 0.1,  # i=0, o=0
        0.1 + 0.9 * 0.2,  # i=1, o=0
        0.1 + 0.9 * 0.5,  # i=2, o=0
        0.2 + 0.8 * 0.4,  # i=3, o=1
        0.5 + 0.5 * 0.9,  # i=4, o=2
    ]
    np.testing.assert_allclose(chain_curve(np.array(p), 3), expected)
    # an episode no longer than L is chained to frame 0 only
    np.testing.assert_allclose(chain_curve(np.array(p), 8), [0.1 + 0.9 * x for x in p])


def test_known_defect_chaining_makes_a_blind_curve_look_perfect():
    """docs/recipe.md#departures-from-the-reference-pipeline: chaining hides what the model sees.

    A model fed zeros (the blind control) cannot see the episode, but it can count positions
    in its window (the language and first-frame tokens dilute attention as the window grows),
    so its plain prefix curve is g(min(i, L-1)) for some increasing g: it rises over the first
    L prefixes and is flat afterwards. Here g barely moves (0.5 .. 0.507), a nearly constant,
    uninformative curve. Its plain VOC is below 1 (the flat tail ties), but chaining turns
    it into a strictly increasing curve for any episode of up to 2L-1 frames, so VOC = 1.0
    exactly: total[i] = p[o] + (1 - p[o]) * p[i] grows with p[o] while o advances. That is why
    metrics are reported on plain prefix curves and beside a blind control.
    """
    seq_len = 8
    num_frames = 2 * seq_len - 1
    blind = 0.5 + 0.001 * np.minimum(np.arange(num_frames), seq_len - 1)
    assert np.ptp(blind) < 0.01  # constant-ish
    chained = chain_curve(blind, seq_len)
    assert np.all(np.diff(chained) > 0)
    assert metrics.voc(chained) == 1.0
    assert metrics.voc(blind) == pytest.approx(0.922, abs=1e-3)  # plain: 8 rising, 7 tied
    # Chaining cannot invent an order from a truly constant curve...
    assert metrics.voc(chain_curve(np.full(num_frames, 0.5), seq_len)) == 0.0
    # ...but it amplifies any tiny monotone trend: a blind curve whose only change is the
    # first position (the first-frame marker) still gets a clearly positive chained VOC.
    marker = np.full(40, 0.5)
    marker[0] = 0.3
    assert metrics.voc(marker) == pytest.approx(0.271, abs=1e-3)
    assert metrics.voc(chain_curve(marker, seq_len)) == pytest.approx(0.695, abs=1e-3)
