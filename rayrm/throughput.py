"""A log line every few seconds while embedding or scoring: episodes, frames, frames/s, ETA."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)


class HasFrames(Protocol):
    num_frames: int


class ThroughputLog:
    """A log line every ``every_s`` seconds: episodes and frames done, frames/s, ETA.
    ``verb`` names the work (``embedded``, ``scored``). Not named for "progress": in rayrm
    that word is the reward label; this only throttles a log line."""

    def __init__(
        self,
        episodes: Sequence[HasFrames],
        skipped: int,
        every_s: float,
        verb: str = "embedded",
    ):
        self.verb = verb
        self.total_episodes = len(episodes) + skipped
        self.total_frames = sum(e.num_frames for e in episodes)
        self.skipped = skipped
        self.every_s = every_s
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first embeddings arrived
        self.last_log = self.start
        self.frames = 0
        self.episodes = 0

    def update(self, frames: int, episodes: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            logger.info("first results after %.1f s of start-up", now - self.start)
        self.frames += frames
        self.episodes += episodes
        if now - self.last_log >= self.every_s:
            self.last_log = now
            self.log(now)

    def log(self, now: float | None = None) -> None:
        now = now or time.perf_counter()
        # Since the start, start-up included: results may arrive in a few large batches
        # (score's raw input waits for a per-episode groupby), and a rate since the first
        # of them would be meaningless then.
        rate = self.frames / max(now - self.start, 1e-9)
        left = self.total_frames - self.frames
        eta = _duration(left / rate) if rate > 0 else "?"
        logger.info(
            "%s %d/%d episodes (%s earlier), %d/%d frames, %.0f frames/s, ETA %s",
            self.verb,
            self.episodes + self.skipped,
            self.total_episodes,
            self.skipped,
            self.frames,
            self.total_frames,
            rate,
            eta,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
