"""The training-window sampler (rayrm.train.windows) against docs/recipe.md#windows, worked by hand.

The reference below (``reference_sequence``) is a plain-Python transcription of §4, written
independently of the vectorised sampler: window frames a..b-1, optional rewind b-2 down to s+1,
targets (f - a) / (T - a), then pad by repeating the last item or subsample at
``np.linspace(0, n-1, L).astype(int)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayrm.train.windows import (
    prefix_positions,
    prefix_read_position,
    sample_windows,
    sequence_positions,
)

SEQ_LENS = (1, 2, 3, 8, 32)


def to_length(items: list, seq_len: int) -> list:
    """docs/recipe.md#windows "to length L", as the reference pipeline writes it with numpy."""
    n = len(items)
    if seq_len == 1:
        # Deliberate deviation from the reference: np.linspace(0, n-1, 1) is [0] (the first item),
        # but the one slot holds the last item, so a length-1 prefix window still ends at its
        # own frame (the prefix read position min(i, L-1) = 0 must hold frame i).
        return [items[-1]]
    if n <= seq_len:
        return items + [items[-1]] * (seq_len - n)
    return [items[k] for k in np.linspace(0, n - 1, seq_len).astype(int)]


def reference_sequence(T: int, a: int, b: int, s: int | None, seq_len: int):
    """(frames, targets) of one window; s=None means no rewind."""
    frames = list(range(a, b))
    if s is not None:
        frames += list(range(b - 2, s, -1))
    frames = to_length(frames, seq_len)
    return frames, [(f - a) / (T - a) for f in frames]


def all_windows(T: int, rewind: bool):
    """Every (a, b, s) the sampler may draw for an episode of T frames."""
    for a in range(0, T - 3):
        for b in range(a + 3, T):
            if rewind:
                for s in range(a, b - 2):
                    yield a, b, s
            else:
                yield a, b, None


def sample(lengths, batch, seq_len, rewind_prob, seed=0):
    lengths = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    g = torch.Generator().manual_seed(seed)
    return sample_windows(lengths, offsets, batch, seq_len, rewind_prob, g), lengths, offsets


# --- sequence_positions ------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_sequence_positions_match_the_reference_pad_and_linspace(seq_len):
    n = torch.arange(1, 201)
    got = sequence_positions(n, seq_len).numpy()
    assert got.shape == (200, seq_len) and got.dtype == np.int64
    for row, count in zip(got, n.tolist()):
        if count <= seq_len:  # pad by repeating the last item
            expected = np.minimum(np.arange(seq_len), count - 1)
        elif seq_len == 1:  # the last item, not linspace's first: see to_length
            expected = np.array([count - 1])
        else:
            expected = np.linspace(0, count - 1, seq_len).astype(int)
        np.testing.assert_array_equal(row, expected, err_msg=f"n={count}, L={seq_len}")


def test_sequence_positions_hand_worked():
    # n=5 items into L=8 slots: pad with the last item.
    assert sequence_positions(torch.tensor([5]), 8).tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]
    # n=10 into L=4: linspace(0, 9, 4) = [0, 3, 6, 9].
    assert sequence_positions(torch.tensor([10]), 4).tolist() == [[0, 3, 6, 9]]
    # n=16 into L=8: k * 15/7 = 0, 2.14, 4.29, 6.43, 8.57, 10.71, 12.86, 15 -> truncated.
    assert sequence_positions(torch.tensor([16]), 8).tolist() == [[0, 2, 4, 6, 8, 10, 12, 15]]
    # n == L is the identity either way.
    assert sequence_positions(torch.tensor([8]), 8).tolist() == [list(range(8))]


# --- sample_windows without rewind -------------------------------------------------------


@pytest.mark.parametrize("seq_len", [32, 4])
def test_forward_windows_follow_spec(seq_len):
    """rewind_prob=0: every row is frames a..b-1 brought to L, targets (f-a)/(T-a), and every
    allowed (a, b) is drawn (edges a=0, a=T-4, b=a+3, b=T-1 included), nothing else."""
    lengths = [10, 4, 7]
    batch, lengths_t, offsets = sample(lengths, 20_000, seq_len, rewind_prob=0.0)
    episodes = batch.episode.numpy()
    frames, targets = batch.local_frame.numpy(), batch.target.numpy()
    assert frames.shape == targets.shape == (20_000, seq_len)
    assert batch.target.dtype == torch.float32
    np.testing.assert_array_equal(
        batch.frame_index.numpy(), offsets.numpy()[episodes][:, None] + frames
    )
    T = np.array(lengths)[episodes][:, None]
    a, b = frames[:, :1], frames[:, -1:] + 1  # both ends survive padding and subsampling
    np.testing.assert_allclose(targets, (frames - a) / (T - a), rtol=1e-6, atol=1e-7)
    windows = np.unique(np.concatenate([episodes[:, None], frames], axis=1), axis=0)
    seen = {e: set() for e in range(len(lengths))}
    for ep, *row in windows.tolist():
        a, b = row[0], row[-1] + 1
        assert row == reference_sequence(lengths[ep], a, b, None, seq_len)[0], (ep, a, b)
        seen[ep].add((a, b))
    for ep, T in enumerate(lengths):
        allowed = {(a, b) for a, b, _ in all_windows(T, rewind=False)}
        assert seen[ep] == allowed, f"T={T}: drawn windows differ from [0,T-4]x[a+3,T-1]"
        starts = {a for a, _ in seen[ep]}
        ends = {b for _, b in seen[ep]}
        assert min(starts) == 0 and max(starts) == T - 4
        assert max(ends) == T - 1 and all((a, a + 3) in seen[ep] for a in starts)
        # a window never shows the last frame T-1 (b is an exclusive end <= T-1)
        assert frames[episodes == ep].max() == T - 2


def test_start_and_end_are_uniform():
    """a uniform over [0, T-4]; b uniform over [a+3, T-1] given a (T=10, 40k draws)."""
    T, draws = 10, 40_000
    batch, _, _ = sample([T], draws, 32, rewind_prob=0.0, seed=5)
    rows = batch.local_frame.numpy()
    a, b = rows[:, 0], rows[:, -1] + 1
    counts = np.bincount(a, minlength=T - 3)
    expected = draws / (T - 3)
    assert ((counts - expected) ** 2 / expected).sum() < 25  # chi2, 6 dof: p < 1e-3
    a0 = b[a == 0]  # b given a = 0 is uniform over 3..9
    counts = np.bincount(a0 - 3, minlength=T - 3)
    expected = len(a0) / (T - 3)
    assert ((counts - expected) ** 2 / expected).sum() < 25


# --- sample_windows with rewind ----------------------------------------------------------


def _unpadded_length(row: np.ndarray) -> int:
    """Length of a (window + rewind) sequence before padding: consecutive items always differ
    (rising by 1, then falling by 1), so the first repeat is where padding starts."""
    repeats = np.nonzero(row[1:] == row[:-1])[0]
    return int(repeats[0]) + 1 if len(repeats) else len(row)


def test_rewind_hand_worked_example():
    # T=10, a=2, b=7, s=3, L=8, worked by hand:
    #   window frames a..b-1          = 2, 3, 4, 5, 6
    #   rewind b-2 down to s+1        = 5, 4
    #   sequence                      = [2, 3, 4, 5, 6, 5, 4]       (7 items <= L: pad)
    #   padded to 8                   = [2, 3, 4, 5, 6, 5, 4, 4]
    #   targets (f - a) / (T - a)     = [0, 1, 2, 3, 4, 3, 2, 2] / 8
    assert reference_sequence(10, 2, 7, 3, 8) == (
        [2, 3, 4, 5, 6, 5, 4, 4],
        [x / 8 for x in [0, 1, 2, 3, 4, 3, 2, 2]],
    )
    # And a subsampled one: T=10, a=0, b=9, s=0, L=8: sequence 0..8 then 7..1 (16 items);
    # linspace(0, 15, 8) -> [0, 2, 4, 6, 8, 10, 12, 15] -> frames [0, 2, 4, 6, 8, 6, 4, 1].
    assert reference_sequence(10, 0, 9, 0, 8)[0] == [0, 2, 4, 6, 8, 6, 4, 1]

    batch, _, _ = sample([10], 20_000, 8, rewind_prob=1.0, seed=1)
    rows, targets = batch.local_frame.numpy(), batch.target.numpy()
    for frames, target_values in [
        ([2, 3, 4, 5, 6, 5, 4, 4], [0, 1, 2, 3, 4, 3, 2, 2]),
        ([0, 2, 4, 6, 8, 6, 4, 1], [0, 2, 4, 6, 8, 6, 4, 1]),
    ]:
        hits = (rows == np.array(frames)).all(axis=1)
        assert hits.any(), f"{frames} never sampled"
        expected = np.array(target_values) / (10 - frames[0])
        np.testing.assert_allclose(targets[hits], np.broadcast_to(expected, (hits.sum(), 8)))


def test_rewind_windows_follow_spec():
    """rewind_prob=1, L larger than any sequence: recover (a, b, s) from each row and check the
    exact sequence a..b-1, b-2..s+1 with s in [a, b-3]; every allowed triple is drawn."""
    T, seq_len = 10, 32  # longest sequence: 9 + 7 = 16 < 32, so rows are only padded
    batch, _, _ = sample([T], 20_000, seq_len, rewind_prob=1.0, seed=2)
    frames, targets = batch.local_frame.numpy(), batch.target.numpy()
    a = frames[:, :1]
    np.testing.assert_allclose(targets, (frames - a) / (T - a), rtol=1e-6, atol=1e-7)
    seen = set()
    for row in np.unique(frames, axis=0):
        n = _unpadded_length(row)
        a, b, s = int(row[0]), int(row.max()) + 1, int(row[n - 1]) - 1
        assert a <= s <= b - 3, (a, b, s)
        ref_frames, ref_targets = reference_sequence(T, a, b, s, seq_len)
        assert row.tolist() == ref_frames, (a, b, s)
        peak = int(np.argmax(ref_targets))  # rises, then falls (mirrored targets)
        assert np.all(np.diff(ref_targets[: peak + 1]) > 0)
        assert np.all(np.diff(ref_targets[peak:n]) < 0)
        seen.add((a, b, s))
    assert seen == set(all_windows(T, rewind=True))  # 84 triples, edges included


@pytest.mark.parametrize("seq_len", [8, 4, 1])
def test_rewind_windows_subsampled_match_reference(seq_len):
    """With subsampling (L < sequence length) every row is one of the reference windows."""
    T = 10
    references = {}
    for a, b, s in all_windows(T, rewind=True):
        frames, targets = reference_sequence(T, a, b, s, seq_len)
        references.setdefault(tuple(frames), set()).add(tuple(targets))
    batch, _, _ = sample([T], 5_000, seq_len, rewind_prob=1.0, seed=3)
    both = np.concatenate([batch.local_frame.numpy(), batch.target.numpy()], axis=1)
    drawn = set()
    for row in np.unique(both, axis=0):
        key = tuple(int(f) for f in row[:seq_len])
        assert key in references, key
        assert any(np.allclose(row[seq_len:], ref, rtol=1e-6) for ref in references[key])
        drawn.add(key)
    assert len(drawn) > 0.9 * len(references)


def test_rewind_probability():
    batch, _, _ = sample([12, 30], 20_000, 32, rewind_prob=0.3, seed=4)
    rewound = (np.diff(batch.local_frame.numpy(), axis=1) < 0).any(axis=1)
    assert abs(rewound.mean() - 0.3) < 0.015  # std 0.0032


# --- episodes ----------------------------------------------------------------------------


def test_episode_choice_proportional_to_length():
    lengths = [4, 40, 10]
    draws = 20_000
    batch, _, _ = sample(lengths, draws, 8, rewind_prob=0.8, seed=6)
    counts = np.bincount(batch.episode.numpy(), minlength=len(lengths))
    expected = draws * np.array(lengths) / sum(lengths)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20, (counts, expected)  # 2 dof: p ~ 5e-5; uniform choice gives ~ 9000


def test_smallest_episode_has_exactly_one_window():
    # T=4: a=0, b=3, s=0 are forced. Forward [0,1,2]; rewound [0,1,2,1]; targets f/4.
    for prob, frames in [(0.0, [0, 1, 2, 2, 2, 2]), (1.0, [0, 1, 2, 1, 1, 1])]:
        batch, _, _ = sample([4, 4], 50, 6, rewind_prob=prob)
        assert (batch.local_frame == torch.tensor(frames)).all()
        assert torch.equal(
            batch.target, torch.tensor(frames, dtype=torch.float32).expand(50, 6) / 4
        )
        assert torch.equal(batch.frame_index, batch.local_frame + 4 * batch.episode[:, None])


def test_same_seed_same_windows():
    first, _, _ = sample([5, 17, 9], 256, 8, rewind_prob=0.8, seed=11)
    again, _, _ = sample([5, 17, 9], 256, 8, rewind_prob=0.8, seed=11)
    other, _, _ = sample([5, 17, 9], 256, 8, rewind_prob=0.8, seed=12)
    for field in ("frame_index", "episode", "target", "local_frame"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert not torch.equal(first.frame_index, other.frame_index)


# --- prefixes (evaluation) ---------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 5, 8, 9, 40])
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_prefix_read_position_is_the_prefix_last_frame(num_frames, seq_len):
    positions = prefix_positions(num_frames, seq_len)
    read = prefix_read_position(num_frames, seq_len)
    assert positions.shape == (num_frames, seq_len) and read.shape == (num_frames,)
    assert read.tolist() == [min(i, seq_len - 1) for i in range(num_frames)]
    for i in range(num_frames):
        prefix = list(range(i + 1))  # prefix i = frames 0..i, brought to L
        assert positions[i].tolist() == to_length(prefix, seq_len)
        assert positions[i, read[i]].item() == i  # the prediction read is at frame i


def test_prefix_hand_worked():
    # T=5, L=8: prefix 2 = frames 0..2, padded; read at position 2.
    assert prefix_positions(5, 8)[2].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert prefix_read_position(5, 8)[2].item() == 2
    # T=10, L=4: prefix 9 = frames 0..9, subsampled to [0, 3, 6, 9]; read at position 3.
    assert prefix_positions(10, 4)[9].tolist() == [0, 3, 6, 9]
    assert prefix_read_position(10, 4)[9].item() == 3
