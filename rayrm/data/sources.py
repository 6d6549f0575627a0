"""Which reader an input needs: HDF5 episode files, or a LeRobot v3 dataset root.

The embedding pipeline and its driver ask here, so they handle both the same way: the
scanned episodes (``EpisodeInfo``; LeRobot's carry where their frames are in the video), a
Ray Data source yielding the same block columns for either, and the reason an episode's
frames could not be read.
"""

from __future__ import annotations

from ray.data import Datasource

from rayrm.data import hdf5, lerobot
from rayrm.data.hdf5 import EpisodeInfo


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
