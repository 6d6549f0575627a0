"""A tiny LeRobot v3 dataset made in the tests: 2 cameras, 3 tasks, several episodes per
mp4 file, and an independent PyAV decode of it to compare rayrm's reader with."""

from __future__ import annotations

import av
import numpy as np

from rayrm.data.lerobot_writer import LeRobotEpisode, write_lerobot_dataset

TOP, WRIST = "observation.images.top", "observation.images.wrist"
CAMERAS = (TOP, WRIST)
TASKS = ("Pick the red cube.", "Open the drawer.", "Stack the blocks.")
FPS = 10
SIZE = 16
LENGTHS = (5, 7, 6, 9, 4, 8)  # episode i: task i % 3, success when i is even
EPISODES_PER_FILE = 2  # 3 mp4 files per camera, 2 episodes each


def episode_frames(i: int, camera: str, length: int) -> np.ndarray:
    """Smooth frames (they survive h264) that differ between episodes, cameras and frames:
    brightness encodes the frame, a coloured bar's place the episode."""
    frames = np.zeros((length, SIZE, SIZE, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)[None, :, None]
    for t in range(length):
        base = 40 + 20 * t + (60 if camera == WRIST else 0)
        frames[t] = np.clip(base + 30 * ramp, 0, 255).astype(np.uint8)
        frames[t, 2 * (i % 6) : 2 * (i % 6) + 3, :, i % 3] = 250
    return frames


def make_episodes() -> list[LeRobotEpisode]:
    return [
        LeRobotEpisode(
            task=TASKS[i % 3],
            frames={cam: episode_frames(i, cam, n) for cam in CAMERAS},
            success=i % 2 == 0,
            action=np.full((n, 2), i, dtype=np.float32),
        )
        for i, n in enumerate(LENGTHS)
    ]


def write_dataset(root: str) -> str:
    return write_lerobot_dataset(
        str(root), make_episodes(), fps=FPS, episodes_per_file=EPISODES_PER_FILE
    )


def decode_file(path: str) -> np.ndarray:
    """Every frame of an mp4 file, decoded with PyAV directly (not through rayrm)."""
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def video_path(root: str, camera: str, file_index: int) -> str:
    return f"{root}/videos/{camera}/chunk-000/file-{file_index:03d}.mp4"


def decoded_episode(root: str, camera: str, i: int) -> np.ndarray:
    """Episode ``i``'s frames, cut from its file by position (episodes fill files in order)."""
    first = i - i % EPISODES_PER_FILE
    start = sum(LENGTHS[first:i])
    return decode_file(video_path(root, camera, i // EPISODES_PER_FILE))[start : start + LENGTHS[i]]
