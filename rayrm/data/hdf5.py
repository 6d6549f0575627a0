"""Raw HDF5 episodes: find them, check them, and read their frames with Ray Data.

The driver only reads metadata (:func:`scan_episodes`: group names, shapes, dtypes,
attributes). Frames are read inside Ray Data read tasks by :class:`HDF5EpisodeDatasource`, in
chunks of ``frames_per_block`` frames, so no frame passes through the driver and no block holds
a whole long episode.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from rayrm.data import schema

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


@dataclass(frozen=True)
class EpisodeInfo:
    """What the driver knows about one episode before reading any frame."""

    episode_id: str
    source_file: str
    num_frames: int
    frame_shape: tuple[int, int, int]
    prompt: str
    success: bool | None
    stage_boundaries: tuple[int, ...]


@dataclass(frozen=True)
class EpisodeProblem:
    """One reason an input can't be used, with the place it was found."""

    file: str
    episode: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} [episode {self.episode}, key {self.key}]: {self.reason}"


class InvalidEpisodesError(ValueError):
    def __init__(self, problems: list[EpisodeProblem]):
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the input episodes:\n  {lines}")


def list_hdf5_files(spec: str) -> list[str]:
    """An HDF5 file, a folder of them, or a glob -> sorted list of files."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(HDF5_SUFFIXES)]
    elif any(c in spec for c in "*?["):
        files = glob.glob(spec)
    else:
        files = [spec] if os.path.exists(spec) else []
    if not files:
        raise FileNotFoundError(f"no HDF5 episode files at '{spec}'")
    return sorted(os.path.abspath(f) for f in files)


def _attr(obj: h5py.HLObject, name: str):
    value = obj.attrs.get(name)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "OSUb":
        value = value.item()  # a one-element array attribute holding a string or flag
    return value.decode() if isinstance(value, bytes) else value


def _check_frames(frames, camera: str, problem) -> int | None:
    """Problems of the camera dataset; its frame count when it has one."""
    if frames.dtype != np.uint8:
        problem(camera, f"dtype {frames.dtype}, expected uint8")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        problem(camera, f"shape {frames.shape}, expected [T, H, W, 3]")
    if frames.ndim == 0:
        return None
    num_frames = int(frames.shape[0])
    if num_frames < schema.MIN_EPISODE_FRAMES:
        problem(camera, f"{num_frames} frames, need >= {schema.MIN_EPISODE_FRAMES}")
    return num_frames


def _stage_boundaries(group: h5py.Group, num_frames: int | None, problem) -> tuple[int, ...]:
    """The ``stage_boundaries`` attribute: strictly increasing frame indices in (0, T)."""
    raw = group.attrs.get(schema.ATTR_STAGE_BOUNDARIES)
    if raw is None or isinstance(raw, h5py.Empty):
        return ()
    values = np.atleast_1d(np.asarray(raw))
    if values.ndim != 1 or values.dtype.kind not in "iuf" or np.any(values != np.round(values)):
        problem(schema.ATTR_STAGE_BOUNDARIES, f"{raw!r} is not a list of frame indices")
        return ()
    values = values.astype(np.int64)
    upper = num_frames if num_frames is not None else np.inf
    if np.any(np.diff(values) <= 0) or (len(values) and (values[0] <= 0 or values[-1] >= upper)):
        problem(
            schema.ATTR_STAGE_BOUNDARIES,
            f"{values.tolist()} must increase strictly and lie in 1..T-1 (T={num_frames})",
        )
    return tuple(int(b) for b in values)


def _check_episode(
    group: h5py.Group, file: str, camera: str, prompt: str | None
) -> EpisodeInfo | list[EpisodeProblem]:
    """The episode's metadata, or every problem found in it (not just the first)."""
    name = group.name.lstrip("/")
    problems: list[EpisodeProblem] = []

    def problem(key: str, reason: str) -> None:
        problems.append(EpisodeProblem(file, name, key, reason))

    frames = group.get(camera)
    num_frames = None
    if isinstance(frames, h5py.Dataset):
        num_frames = _check_frames(frames, camera, problem)
    else:
        problem(camera, f"missing camera dataset (has: {', '.join(sorted(group)) or 'nothing'})")
    action = group.get(schema.ACTION_KEY)
    if action is not None:
        if not isinstance(action, h5py.Dataset) or action.ndim == 0:
            problem(schema.ACTION_KEY, "not an array with one row per frame")
        elif num_frames is not None and len(action) != num_frames:
            problem(schema.ACTION_KEY, f"{len(action)} actions but {num_frames} frames")
    prompt = prompt or _attr(group, schema.ATTR_PROMPT) or _attr(group.file, schema.ATTR_PROMPT)
    if not prompt or not isinstance(prompt, str):
        problem(schema.ATTR_PROMPT, "no prompt attribute and no embed.prompt given")
    success = _attr(group, schema.ATTR_SUCCESS)
    boundaries = _stage_boundaries(group, num_frames, problem)
    if problems:
        return problems
    return EpisodeInfo(
        episode_id=name,
        source_file=file,
        num_frames=int(num_frames),
        frame_shape=tuple(int(s) for s in frames.shape[1:]),
        prompt=prompt,
        success=None if success is None else bool(success),
        stage_boundaries=boundaries,
    )


# What h5py raises for damaged files and objects it cannot read.
_READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def _scan_file(file: str, camera: str, prompt: str | None) -> tuple[list, list]:
    episodes, problems = [], []
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        return [], [EpisodeProblem(file, "-", "-", f"cannot open as HDF5: {err}")]
    with handle:
        try:
            groups = [k for k in sorted(handle) if isinstance(handle.get(k), h5py.Group)]
        except _READ_ERRORS as err:
            return [], [EpisodeProblem(file, "-", "-", f"cannot list episodes: {err}")]
        if not groups:
            problems.append(EpisodeProblem(file, "-", "-", "file holds no episode groups"))
        for key in groups:
            try:
                result = _check_episode(handle[key], file, camera, prompt)
            except _READ_ERRORS as err:
                result = [EpisodeProblem(file, key, "-", f"cannot read episode: {err}")]
            (problems.extend if isinstance(result, list) else episodes.append)(result)
    return episodes, problems


def scan_episodes(
    files: list[str], camera: str, prompt: str | None = None
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Read every episode's metadata; collect all problems instead of stopping at the first."""
    episodes: list[EpisodeInfo] = []
    problems: list[EpisodeProblem] = []
    seen: dict[str, str] = {}
    for file in files:
        found, bad = _scan_file(file, camera, prompt)
        problems.extend(bad)
        for info in found:
            if info.episode_id in seen:
                reason = f"episode id also in {seen[info.episode_id]}; ids must be unique"
                problems.append(EpisodeProblem(file, info.episode_id, "-", reason))
                continue
            seen[info.episode_id] = file
            episodes.append(info)
    return episodes, problems


def _balanced_groups(episodes: list[EpisodeInfo], n_groups: int) -> list[list[EpisodeInfo]]:
    """Greedy longest-first split so read tasks get similar frame counts."""
    groups: list[list[EpisodeInfo]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    for info in sorted(episodes, key=lambda e: -e.num_frames):
        i = loads.index(min(loads))
        groups[i].append(info)
        loads[i] += info.num_frames
    return [sorted(g, key=lambda e: (e.source_file, e.episode_id)) for g in groups if g]


def read_frame_blocks(
    episodes: list[EpisodeInfo], camera: str, frames_per_block: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yield frame chunks of the given episodes as column batches (the datasource's rows)."""
    for file in sorted({e.source_file for e in episodes}):
        with h5py.File(file, "r") as handle:
            for info in (e for e in episodes if e.source_file == file):
                frames = handle[info.episode_id][camera]
                for start in range(0, info.num_frames, frames_per_block):
                    chunk = frames[start : start + frames_per_block]
                    n = len(chunk)
                    yield {
                        "episode_id": np.full(n, info.episode_id, dtype=object),
                        "frame_index": np.arange(start, start + n, dtype=np.int32),
                        "prompt": np.full(n, info.prompt, dtype=object),
                        "frame": chunk,
                    }


class HDF5EpisodeDatasource(Datasource):
    """Ray Data source over already-scanned episodes; one row per frame.

    ===============  ================  =====================================
    column           type              meaning
    ===============  ================  =====================================
    ``episode_id``   str               HDF5 group name
    ``frame_index``  int32             t in 0..T-1
    ``prompt``       str               the episode's task instruction
    ``frame``        uint8 [H, W, 3]   the ``camera`` image at t
    ===============  ================  =====================================
    """

    def __init__(self, episodes: list[EpisodeInfo], camera: str, frames_per_block: int = 64):
        super().__init__()
        self.episodes = episodes
        self.camera = camera
        self.frames_per_block = frames_per_block

    def estimate_inmemory_data_size(self) -> int:
        return sum(e.num_frames * int(np.prod(e.frame_shape)) for e in self.episodes)

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        n_tasks = max(1, min(parallelism if parallelism > 0 else 1, len(self.episodes)))
        tasks = []
        for group in _balanced_groups(self.episodes, n_tasks):
            metadata = BlockMetadata(
                num_rows=sum(e.num_frames for e in group),
                size_bytes=sum(e.num_frames * int(np.prod(e.frame_shape)) for e in group),
                input_files=sorted({e.source_file for e in group}),
                exec_stats=None,
            )
            tasks.append(
                ReadTask(self._read_fn(group), metadata, per_task_row_limit=per_task_row_limit)
            )
        return tasks

    def _read_fn(self, group: list[EpisodeInfo]):
        camera, frames_per_block = self.camera, self.frames_per_block

        def read():
            for batch in read_frame_blocks(group, camera, frames_per_block):
                yield BlockAccessor.batch_to_block(batch)

        return read
