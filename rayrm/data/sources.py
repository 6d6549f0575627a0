"""Which reader an input needs: HDF5 episode files, or a LeRobot v3 dataset root.

The embedding pipeline, its driver and evaluation of raw input ask here, so they handle
both the same way: the scanned episodes (``EpisodeInfo``; LeRobot's carry where their
frames are in the video), a Ray Data source yielding the same block columns for either,
and the reason an episode's frames could not be read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ray.data import Datasource

from rayrm.data import hdf5, lerobot
from rayrm.data.hdf5 import EpisodeInfo


def scan_raw_input(
    spec: str,
    cameras: str | Sequence[str],
    prompt: str | None,
    success_column: str | None = None,
    state: str | None = None,
) -> tuple[list[EpisodeInfo], list[hdf5.EpisodeProblem]]:
    """The episodes of raw input read in one process (evaluation of raw episodes): HDF5
    files, or a LeRobot v3 root with its success column, each episode with every camera of
    ``cameras`` (and, HDF5 only, the ``state``); ``rayrm embed`` scans in Ray tasks itself."""
    cameras = hdf5.as_cameras(cameras)
    if lerobot.is_lerobot_root(spec):
        check_lerobot_state(spec, state)
        return lerobot.scan_lerobot(spec, cameras, prompt, success_column)
    episodes, problems = hdf5.scan_episodes(hdf5.list_hdf5_files(spec), cameras, prompt, state)
    episodes, mismatched = hdf5.check_state_dims(episodes, state)
    return episodes, problems + mismatched


def check_lerobot_state(spec: str, state: str | None) -> None:
    """LeRobot input has no per-frame state reader yet: ``embed.state`` is refused there."""
    if state:
        raise lerobot.LeRobotDatasetError(
            f"{spec}: a robot state ({state!r}) is read from HDF5 episodes only; LeRobot "
            "datasets are embedded without one (leave embed.state empty)"
        )


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
    episodes: list[EpisodeInfo],
    cameras: str | Sequence[str],
    frames_per_block: int,
    state: str | None = None,
) -> Datasource:
    """Frames of ``episodes`` (HDF5: the ``cameras`` datasets and the ``state``; LeRobot:
    each episode's own cameras)."""
    if is_lerobot(episodes):
        return lerobot.LeRobotEpisodeDatasource(episodes, frames_per_block)
    return hdf5.HDF5EpisodeDatasource(episodes, cameras, frames_per_block, state)


def read_error(
    info: EpisodeInfo, cameras: str | Sequence[str], state: str | None = None
) -> str | None:
    """Why one episode's frames cannot be read, or None when they can."""
    if isinstance(info, lerobot.LeRobotEpisodeInfo):
        return lerobot.read_error(info)
    return hdf5.read_error(info, cameras, state=state)
