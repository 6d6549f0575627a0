"""Training windows exactly as docs/recipe.md#windows states, sampled for a whole batch at once.

For an episode of T frames (all numbers are frame indices inside the episode):

* start ``a`` uniform in [0, T-4]; end ``b`` uniform in [a+3, T-1] (exclusive end), so the
  window is frames a..b-1 (at least 3 frames; frame T-1 is never included);
* progress target (ReWiND, relative to the window start): frame f -> (f - a) / (T - a);
* rewind (probability ``rewind_prob``): split ``s`` uniform in [a, b-3]; frames b-2, b-3, ...,
  s+1 are appended in reverse, each with its own progress, so the target rises then falls;
* to length L: a sequence of n <= L items is padded by repeating its last item; a longer one
  is subsampled at ``np.linspace(0, n-1, L).astype(int)``.

Episodes are chosen with probability proportional to their length. Everything is computed as
[B, L] tensors (no per-sample Python loop), returning indices into a flat frame buffer, so the
gather of embeddings happens on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sequence_positions(n: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per row, which of the n items fills each of the L slots: int64 [B, L].

    As the reference pipeline does: pad by repeating the last item, or
    ``np.linspace(0, n-1, L)`` truncated to int (same float64 arithmetic: k * ((n-1)/(L-1)), last
    slot exactly n-1).
    """
    n = n.to(torch.int64).unsqueeze(1)
    k = torch.arange(seq_len, device=n.device).unsqueeze(0)
    padded = torch.minimum(k, n - 1)
    if seq_len == 1:
        return n - 1
    step = (n - 1).to(torch.float64) / (seq_len - 1)
    subsampled = (k.to(torch.float64) * step).to(torch.int64)
    subsampled[:, -1] = (n - 1).squeeze(1)
    return torch.where(n <= seq_len, padded, subsampled)


@dataclass
class WindowBatch:
    frame_index: torch.Tensor  # int64 [B, L], index into the flat frame buffer
    episode: torch.Tensor  # int64 [B], which episode each row came from
    target: torch.Tensor  # float32 [B, L], progress targets
    local_frame: torch.Tensor  # int64 [B, L], frame index inside the episode


def _uniform_int(low: torch.Tensor, high: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive), elementwise."""
    u = torch.rand(low.shape, generator=g, dtype=torch.float64, device=low.device)
    return low + torch.minimum((u * (high - low + 1)).to(torch.int64), high - low)


def sample_windows(
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    seq_len: int,
    rewind_prob: float,
    generator: torch.Generator,
    eligible: torch.Tensor | None = None,
) -> WindowBatch:
    """Sample ``batch_size`` windows over episodes of the given lengths (all >= 4); only
    from the ``eligible`` ones (bool [N]) when given and any is."""
    weights = lengths.to(torch.float64)
    if eligible is not None and bool(eligible.any()):
        weights = weights * eligible
    episode = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    T = lengths[episode]
    a = _uniform_int(torch.zeros_like(T), T - 4, generator)
    b = _uniform_int(a + 3, T - 1, generator)
    s = _uniform_int(a, b - 3, generator)
    do_rewind = torch.rand(batch_size, generator=generator, device=T.device) < rewind_prob
    rewind_len = torch.where(do_rewind, b - 2 - s, torch.zeros_like(s))
    n = (b - a) + rewind_len
    j = sequence_positions(n, seq_len)  # position inside the (window + rewind) sequence
    forward_len = (b - a).unsqueeze(1)
    frame = torch.where(
        j < forward_len, a.unsqueeze(1) + j, (b - 2).unsqueeze(1) - (j - forward_len)
    )
    target = (frame - a.unsqueeze(1)).to(torch.float32) / (T - a).unsqueeze(1).to(torch.float32)
    return WindowBatch(
        frame_index=offsets[episode].unsqueeze(1) + frame,
        episode=episode,
        target=target,
        local_frame=frame,
    )


def prefix_positions(num_frames: int, seq_len: int, device=None) -> torch.Tensor:
    """For each prefix emb[:i+1] of an episode, its L frame indices: int64 [T, L]."""
    n = torch.arange(1, num_frames + 1, device=device)
    return sequence_positions(n, seq_len)


def prefix_read_position(num_frames: int, seq_len: int, device=None) -> torch.Tensor:
    """Where prefix i's own prediction sits in its sequence: min(i, L-1)."""
    return torch.clamp(torch.arange(num_frames, device=device), max=seq_len - 1)


@dataclass
class RankTable:
    """Which (success, failure) pairs of one task a worker can draw, as index tensors."""

    failures: torch.Tensor  # int64 [F], failed episodes whose task has a success here
    successes: torch.Tensor  # int64 [num_tasks, S], each task's successes (padded with -1)
    counts: torch.Tensor  # int64 [num_tasks], successes of each task
    task: torch.Tensor  # int64 [N], task of every episode


def rank_table(task: torch.Tensor, success: torch.Tensor) -> RankTable | None:
    """The pairs of episodes ``task`` [N] / ``success`` (bool [N]) allow; None without any."""
    num_tasks = int(task.max()) + 1 if len(task) else 0
    by_task = [torch.nonzero(success & (task == t)).flatten() for t in range(num_tasks)]
    counts = torch.tensor([len(s) for s in by_task], dtype=torch.int64, device=task.device)
    failures = torch.nonzero(~success & (counts[task] > 0)).flatten()
    if len(failures) == 0:
        return None
    width = int(counts.max())
    successes = torch.full((num_tasks, width), -1, dtype=torch.int64, device=task.device)
    for t, ids in enumerate(by_task):
        successes[t, : len(ids)] = ids
    return RankTable(failures, successes, counts, task)


@dataclass
class PrefixBatch:
    """Prefixes (frames 0..n-1 of an episode) brought to L slots like evaluation's."""

    frame_index: torch.Tensor  # int64 [P, L], index into the flat frame buffer
    read: torch.Tensor  # int64 [P], slot of the prefix's last frame: min(n-1, L-1)
    episode: torch.Tensor  # int64 [P]
    local_frame: torch.Tensor  # int64 [P, L], frame index inside the episode


def prefixes_at(
    episode: torch.Tensor, tau: torch.Tensor, lengths: torch.Tensor, offsets, seq_len: int
) -> PrefixBatch:
    """The prefix of each ``episode`` that covers the share ``tau`` of it (at least 1 frame),
    laid out as the plain prefix curve lays it out (``prefix_positions``)."""
    T = lengths[episode]
    n = torch.clamp(torch.ceil(tau * T).to(torch.int64), min=1)
    n = torch.minimum(n, T)
    slots = sequence_positions(n, seq_len)
    return PrefixBatch(
        frame_index=offsets[episode].unsqueeze(1) + slots,
        read=torch.clamp(n - 1, max=seq_len - 1),
        episode=episode,
        local_frame=slots,
    )


def sample_rank_pairs(
    table: RankTable,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    num_pairs: int,
    seq_len: int,
    min_tau: float,
    generator: torch.Generator,
) -> tuple[PrefixBatch, PrefixBatch, torch.Tensor]:
    """``num_pairs`` (success, failure) prefix pairs of the same task at the same relative
    time tau ~ U[min_tau, 1]: a failure uniformly, then a success of its task uniformly.
    Returns the success prefixes, the failure prefixes and tau (float32 [P])."""
    device = lengths.device
    pick = torch.randint(len(table.failures), (num_pairs,), generator=generator, device=device)
    failure = table.failures[pick]
    task = table.task[failure]
    u = torch.rand(num_pairs, generator=generator, dtype=torch.float64, device=device)
    k = torch.minimum((u * table.counts[task]).to(torch.int64), table.counts[task] - 1)
    success = table.successes[task, k]
    tau = min_tau + (1.0 - min_tau) * torch.rand(num_pairs, generator=generator, device=device)
    return (
        prefixes_at(success, tau, lengths, offsets, seq_len),
        prefixes_at(failure, tau, lengths, offsets, seq_len),
        tau,
    )
