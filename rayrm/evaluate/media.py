"""Per-episode PNGs and mp4s, one Ray task per episode (figures and encoding are CPU work that
spreads over a cluster like any other).

Videos need the raw frames: they are read from the episode's ``source_file`` (the HDF5 file
the embeddings came from, or the raw input being evaluated). When that file is gone, the
video is skipped and the reason returned, and the driver logs it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import ray

from rayrm.data import storage
from rayrm.data.hdf5 import open_hdf5
from rayrm.data.schema import safe_name

logger = logging.getLogger(__name__)


@dataclass
class MediaJob:
    """What one task draws: the episode's row, the blind control's row, where to write."""

    row: dict
    blind: dict | None
    stage_names: list[str]
    num_stages: int
    output: str
    video: bool
    camera: str
    fps: int


@dataclass
class MediaResult:
    episode_id: str
    png: str
    video: str | None
    skipped: str | None = None  # why there is no video, if one was asked for


def media_paths(output: str, episode_id: str) -> tuple[str, str]:
    name = safe_name(episode_id)
    return (
        os.path.join(output, "episodes", f"{name}.png"),
        os.path.join(output, "videos", f"{name}.mp4"),
    )


def read_frames(row: dict, camera: str) -> np.ndarray | str:
    """The sequence's camera frames (in its step order), or why they can't be read."""
    source = row["source_file"]
    if not source or not storage.exists(source):
        return f"source file {source or '(none)'} not found"
    try:
        with open_hdf5(source) as handle:
            frames = handle[row["source_episode"]][camera][:]
    except (OSError, KeyError) as err:
        return f"cannot read {camera} of {row['source_episode']} in {source}: {err}"
    return frames[np.asarray(row["frame_index"], dtype=np.int64)]


def render_episode(job: MediaJob) -> MediaResult:
    from rayrm.evaluate.figures import save_episode_png, video_frames
    from rayrm.video import write_mp4

    row = job.row
    png, video = media_paths(job.output, row["episode_id"])
    save_episode_png(png, row, job.blind, job.stage_names, job.num_stages)
    if not job.video:
        return MediaResult(row["episode_id"], png, None)
    frames = read_frames(row, job.camera)
    if isinstance(frames, str):
        return MediaResult(row["episode_id"], png, None, skipped=frames)
    write_mp4(video, video_frames(frames, row, job.blind, job.stage_names, job.num_stages), job.fps)
    return MediaResult(row["episode_id"], png, video)


def render_all(jobs: list[MediaJob]) -> list[MediaResult]:
    """Run the jobs as Ray tasks; log skipped videos once each."""
    if not jobs:
        return []
    task = ray.remote(render_episode).options(num_cpus=1)
    results = ray.get([task.remote(job) for job in jobs])
    for result in results:
        if result.skipped:
            logger.info("no video for %s: %s", result.episode_id, result.skipped)
    made = sum(r.video is not None for r in results)
    logger.info("wrote %d episode figures and %d videos", len(results), made)
    return results
