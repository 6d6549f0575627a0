"""A log line every few seconds while embedding: episodes, frames, frames/s, ETA."""

from __future__ import annotations

import logging
import time

from rayrm.data.hdf5 import EpisodeInfo

logger = logging.getLogger(__name__)


class Progress:
    """A log line every ``every_s`` seconds: episodes and frames done, frames/s, ETA."""

    def __init__(self, episodes: list[EpisodeInfo], skipped: int, every_s: float):
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
            logger.info("first embeddings after %.1f s of start-up", now - self.start)
        self.frames += frames
        self.episodes += episodes
        if now - self.last_log >= self.every_s:
            self.last_log = now
            self.log(now)

    def log(self, now: float | None = None) -> None:
        now = now or time.perf_counter()
        rate = self.frames / max(now - (self.first or now), 1e-9)
        left = self.total_frames - self.frames
        eta = _duration(left / rate) if rate > 0 else "?"
        logger.info(
            "embedded %d/%d episodes (%s earlier), %d/%d frames, %.0f frames/s, ETA %s",
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
