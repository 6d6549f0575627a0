"""Which reader an input needs: HDF5 episode files, or a LeRobot v3 dataset root.

The embedding pipeline, its driver and evaluation of raw input ask here, so they handle
both the same way: the scanned episodes (``EpisodeInfo``; LeRobot's carry where their
frames are in the video), a Ray Data source yielding the same block columns for either,
and the reason an episode's frames could not be read.
"""

from __future__ import annotations

import numpy as np
from ray.data import Datasource

from rayrm.data import hdf5, lerobot
from rayrm.data.hdf5 import EpisodeInfo


def scan_raw_input(
    spec: str, camera: str, prompt: str | None, success_column: str | None = None
) -> tuple[list[EpisodeInfo], list[hdf5.EpisodeProblem]]:
    """The episodes of raw input read in one process (evaluation of raw episodes): HDF5
    files, or one camera of a LeRobot v3 root with its success column (``rayrm embed`` scans
    in Ray tasks itself)."""
    if lerobot.is_lerobot_root(spec):
        return lerobot.scan_lerobot(spec, [camera], prompt, success_column)
    return hdf5.scan_episodes(hdf5.list_hdf5_files(spec), camera, prompt)


def read_frames(info: EpisodeInfo, camera: str) -> np.ndarray:
    """All of one episode's frames, uint8 [T, H, W, 3], in memory (one episode's worth: for
    annotation videos, not for the streaming pipeline)."""
    if isinstance(info, lerobot.LeRobotEpisodeInfo):
        return np.stack(list(lerobot.decode_episode(info)))
    with hdf5.open_hdf5(info.source_file) as handle:
        return handle[info.episode_id][camera][:]


def is_lerobot(episodes: list[EpisodeInfo]) -> bool:
    return bool(episodes) and isinstance(episodes[0], lerobot.LeRobotEpisodeInfo)


def episode_datasource(
    episodes: list[EpisodeInfo], camera: str, frames_per_block: int
) -> Datasource:
    """Frames of ``episodes`` (HDF5: the ``camera`` dataset; LeRobot: each episode's own)."""
    if is_lerobot(episodes):
        return lerobot.LeRobotEpisodeDatasource(episodes, frames_per_block)
    return hdf5.HDF5EpisodeDatasource(episodes, camera, frames_per_block)


def read_error(info: EpisodeInfo, camera: str) -> str | None:
    """Why one episode's frames cannot be read, or None when they can."""
    if isinstance(info, lerobot.LeRobotEpisodeInfo):
        return lerobot.read_error(info)
    return hdf5.read_error(info, camera)
