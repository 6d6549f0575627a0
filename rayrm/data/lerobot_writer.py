"""Write episodes as a LeRobot v3 dataset (layout in ``rayrm.data.schema``): for tests, for
``rayrm synth`` and for anyone who wants rayrm's synthetic data in LeRobot tools.

What LeRobot writes and this writer matches (``src/lerobot/datasets/``: ``utils.py`` for the
paths and ``DatasetInfo``, ``dataset_metadata.py`` for the episode rows and ``tasks.parquet``,
``dataset_writer.py`` for the video timestamps, ``feature_utils.py`` for ``info.json``):

- ``meta/info.json`` with ``codebase_version`` "v3.0", ``fps``, ``features`` (cameras as
  ``dtype`` "video", ``shape`` [H, W, 3], ``names`` [height, width, channels]; the default
  ``timestamp``, ``frame_index``, ``episode_index``, ``index``, ``task_index`` features),
  the totals, ``chunks_size``, file size limits, ``data_path``, ``video_path``, ``splits``;
- ``meta/tasks.parquet``: ``task_index`` with the task strings as the pandas index ``task``
  (LeRobot reads it with ``pd.read_parquet`` and looks tasks up by that index);
- ``meta/episodes/chunk-000/file-000.parquet``: one row per episode with ``episode_index``,
  ``tasks``, ``length``, ``data/...`` and ``meta/episodes/...`` chunk and file indices,
  ``dataset_from_index``, ``dataset_to_index`` and, per camera, ``videos/<key>/chunk_index``,
  ``file_index``, ``from_timestamp`` and ``to_timestamp``: episodes follow each other in a
  file, the next one starting where the last one's ``to_timestamp`` ended;
- ``data/chunk-000/file-000.parquet``: one row per frame (``index``, ``episode_index``,
  ``frame_index``, ``timestamp`` = frame_index / fps, ``task_index``, optional ``action``).

Not written: ``meta/stats.json`` and the episodes' ``stats/...`` columns (LeRobot's loader
drops those columns and treats missing stats as none). A new file is started after
``episodes_per_file`` episodes rather than at LeRobot's size limits, so small tests get
several files and several episodes per file. Every file is written whole
(``storage.write_bytes``), ``meta/info.json`` last.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from rayrm.data import mp4, schema, storage

DATA_FILE_SIZE_IN_MB = 100  # LeRobot's defaults, recorded in info.json
VIDEO_FILE_SIZE_IN_MB = 200


@dataclass
class LeRobotEpisode:
    """One episode to write: frames per camera key, its task and optional extras."""

    task: str
    frames: dict[str, np.ndarray]  # camera key -> uint8 [T, H, W, 3], the same T for all
    success: bool | None = None
    action: np.ndarray | None = None  # float [T, A]

    @property
    def length(self) -> int:
        return len(next(iter(self.frames.values())))


def chunk_and_file(file_number: int, chunks_size: int) -> tuple[int, int]:
    """The n-th file's (chunk_index, file_index): ``chunks_size`` files per chunk folder, as
    LeRobot's ``update_chunk_file_indices`` counts them."""
    return file_number // chunks_size, file_number % chunks_size


def _check(episodes: Sequence[LeRobotEpisode]) -> list[str]:
    if not episodes:
        raise ValueError("no episodes to write")
    cameras = sorted(episodes[0].frames)
    for i, ep in enumerate(episodes):
        if sorted(ep.frames) != cameras:
            raise ValueError(f"episode {i}: cameras {sorted(ep.frames)}, expected {cameras}")
        for key, frames in ep.frames.items():
            first = episodes[0].frames[key]
            if frames.shape[1:] != first.shape[1:] or len(frames) != ep.length:
                raise ValueError(f"episode {i}, {key}: shape {frames.shape} does not match")
    return cameras


def write_lerobot_dataset(
    root: str,
    episodes: Sequence[LeRobotEpisode],
    fps: int = 10,
    episodes_per_file: int = 2,
    success_column: str | None = "success",
    chunks_size: int = schema.LEROBOT_CHUNKS_SIZE,
    codec: str = mp4.DEFAULT_CODEC,
    robot_type: str | None = "rayrm_synthetic",
) -> str:
    """Write ``episodes`` under ``root`` (local path or URL); returns ``root``."""
    cameras = _check(episodes)
    tasks = list(dict.fromkeys(ep.task for ep in episodes))  # first-seen order
    rows = _episode_rows(episodes, cameras, fps, episodes_per_file, chunks_size)
    if success_column:
        rows[success_column] = [ep.success for ep in episodes]
    codecs = {
        key: _write_videos(root, key, episodes, fps, episodes_per_file, chunks_size, codec)
        for key in cameras
    }
    path = schema.LEROBOT_DATA_PATH.format(chunk_index=0, file_index=0)
    storage.write_parquet(_frame_table(episodes, tasks, fps), storage.join(root, path))
    path = schema.LEROBOT_EPISODES_PATH.format(chunk_index=0, file_index=0)
    storage.write_parquet(pa.table(rows), storage.join(root, path))
    storage.write_bytes(storage.join(root, schema.LEROBOT_TASKS_PATH), _tasks_parquet(tasks))
    info = _info(episodes, codecs, tasks, fps, chunks_size, robot_type)
    storage.write_json(storage.join(root, schema.LEROBOT_INFO_PATH), info)
    return root


def _episode_rows(episodes, cameras, fps, episodes_per_file, chunks_size) -> dict[str, list]:
    lengths = [ep.length for ep in episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    rows: dict[str, list] = {
        "episode_index": list(range(len(episodes))),
        "tasks": [[ep.task] for ep in episodes],
        "length": lengths,
        "data/chunk_index": [0] * len(episodes),
        "data/file_index": [0] * len(episodes),
        "dataset_from_index": starts,
        "dataset_to_index": [s + n for s, n in zip(starts, lengths)],
    }
    placed = [_place(i, episodes, fps, episodes_per_file, chunks_size) for i in range(len(lengths))]
    for key in cameras:
        for n, name in enumerate(("chunk_index", "file_index", "from_timestamp", "to_timestamp")):
            rows[schema.lerobot_video_column(key, name)] = [p[n] for p in placed]
    rows["meta/episodes/chunk_index"] = [0] * len(episodes)
    rows["meta/episodes/file_index"] = [0] * len(episodes)
    return rows


def _place(i: int, episodes, fps: int, episodes_per_file: int, chunks_size: int):
    """Episode ``i``'s (chunk, file, from_timestamp, to_timestamp) in its video file."""
    number, position = divmod(i, episodes_per_file)
    before = sum(ep.length for ep in episodes[i - position : i])
    chunk, file = chunk_and_file(number, chunks_size)
    return chunk, file, before / fps, (before + episodes[i].length) / fps


def _write_videos(root, key, episodes, fps, episodes_per_file, chunks_size, codec) -> str:
    """The camera's video files; returns the stream's codec name for ``info.json``."""
    for number, first in enumerate(range(0, len(episodes), episodes_per_file)):
        group = episodes[first : first + episodes_per_file]
        frames = (frame for ep in group for frame in ep.frames[key])
        chunk, file = chunk_and_file(number, chunks_size)
        path = schema.LEROBOT_VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
        data = mp4.encode_mp4(frames, fps, codec)
        storage.write_bytes(storage.join(root, path), data)
    return mp4.codec_name(data)


def _frame_table(episodes, tasks: list[str], fps: int) -> pa.Table:
    lengths = [ep.length for ep in episodes]
    frame_index = np.concatenate([np.arange(n) for n in lengths])
    columns = {
        "timestamp": pa.array(frame_index / fps, pa.float32()),
        "frame_index": pa.array(frame_index, pa.int64()),
        "episode_index": pa.array(np.repeat(np.arange(len(episodes)), lengths), pa.int64()),
        "index": pa.array(np.arange(sum(lengths)), pa.int64()),
        "task_index": pa.array(np.repeat([tasks.index(ep.task) for ep in episodes], lengths)),
    }
    if all(ep.action is not None for ep in episodes):
        actions = np.concatenate([ep.action for ep in episodes]).astype(np.float32)
        columns["action"] = pa.FixedSizeListArray.from_arrays(actions.ravel(), actions.shape[1])
    return pa.table(columns)


def _tasks_parquet(tasks: list[str]) -> bytes:
    """LeRobot's ``write_tasks``: a DataFrame indexed by the task string, saved by pandas."""
    frame = pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task"))
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def _info(episodes, codecs: dict[str, str], tasks, fps, chunks_size, robot_type) -> dict:
    features = {
        key: _video_feature(episodes[0].frames[key], fps, codec) for key, codec in codecs.items()
    }
    if all(ep.action is not None for ep in episodes):
        dim = int(episodes[0].action.shape[1])
        features["action"] = {"dtype": "float32", "shape": [dim], "names": None}
    for name, dtype in [
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ]:  # LeRobot's DEFAULT_FEATURES
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return {
        "codebase_version": schema.LEROBOT_CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": sum(ep.length for ep in episodes),
        "total_tasks": len(tasks),
        "chunks_size": chunks_size,
        "data_files_size_in_mb": DATA_FILE_SIZE_IN_MB,
        "video_files_size_in_mb": VIDEO_FILE_SIZE_IN_MB,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": schema.LEROBOT_DATA_PATH,
        "video_path": schema.LEROBOT_VIDEO_PATH,
        "features": features,
    }


def _video_feature(frames: np.ndarray, fps: int, codec: str) -> dict:
    height, width, channels = (int(s) for s in frames.shape[1:])
    return {
        "dtype": "video",
        "shape": [height, width, channels],
        "names": ["height", "width", "channels"],
        "info": {
            "video.height": height,
            "video.width": width,
            "video.codec": codec,
            "video.pix_fmt": mp4.PIXEL_FORMAT,
            "video.is_depth_map": False,
            "video.fps": fps,
            "video.channels": channels,
            "has_audio": False,
        },
    }
