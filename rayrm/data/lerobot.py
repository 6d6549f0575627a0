"""LeRobot v3 datasets as input: scan the metadata, read frames with Ray Data.

A dataset root (local path or URL; layout in ``rayrm.data.schema``) is recognised by its
``meta/info.json``. Scanning (:func:`scan_lerobot`) reads only metadata: ``info.json``,
``meta/tasks.parquet``, the ``meta/episodes/`` rows and each video file's header (size and
duration, :func:`rayrm.data.mp4.probe`). Problems of the whole dataset (no ``info.json``, a
``codebase_version`` other than v3.0, an unknown camera key or success column) raise
:class:`LeRobotDatasetError` at once; problems of single episodes (too short, a task missing
from ``tasks.parquet``, a video that cannot be opened or ends before the episode does) are
returned as :class:`EpisodeProblem` with the video file, episode and camera key, so the
caller puts those episodes in the failures table and goes on with the others.

Frames are decoded with PyAV inside Ray Data read tasks (:class:`LeRobotEpisodeDatasource`;
why not Ray's ``read_lerobot``: see ``rayrm.data.mp4``). A task decodes its episodes one
after another, each from its ``from_timestamp`` in its file, straight into blocks of
``frames_per_block`` frames with the same columns as the HDF5 source, so memory per task is
a block or two whatever the episodes' length. An episode that fails to decode is logged and
dropped (its frames already sent stay incomplete downstream, where :func:`read_error` names
the reason), and the task goes on with its other episodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource
from ray.data.block import BlockAccessor

from rayrm.data import mp4, schema, storage
from rayrm.data.hdf5 import (
    EpisodeInfo,
    EpisodeProblem,
    episode_read_tasks,
    frame_columns,
    task_count,
)
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

# Metadata columns read per episode (the ``stats/...`` columns are left on disk).
_BASE_COLUMNS = ["episode_index", "length", "tasks", "dataset_from_index"]
_VIDEO_NAMES = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")


class LeRobotDatasetError(UserError):
    """The dataset as a whole cannot be read (the message names the dataset and the key)."""


@dataclass(frozen=True)
class LeRobotView:
    """Where a further camera's frames of an episode are (``embed.cameras``)."""

    camera: str
    source_file: str  # its mp4 file
    from_timestamp: float  # of frame 0 in that file
    frame_shape: tuple[int, int, int]


@dataclass(frozen=True)
class LeRobotEpisodeInfo(EpisodeInfo):
    """An episode of a LeRobot dataset: ``source_file`` is the mp4 file of its (first)
    camera; ``extra_views`` the further cameras fused with it, in ``embed.cameras`` order."""

    camera: str
    episode_index: int
    dataset_from_index: int  # global ``index`` of frame 0
    from_timestamp: float  # of frame 0 in ``source_file``
    fps: float
    extra_views: tuple[LeRobotView, ...] = ()

    def views(self) -> list[LeRobotView]:
        """Every camera of the episode, the first one first."""
        first = LeRobotView(self.camera, self.source_file, self.from_timestamp, self.frame_shape)
        return [first, *self.extra_views]


Mapper = Callable[[Callable, Iterable], Iterable]  # ``map``, or one that runs in Ray tasks


def is_lerobot_root(spec: str) -> bool:
    """Whether ``spec`` is a folder with a ``meta/info.json`` (a LeRobot dataset root)."""
    try:
        return storage.is_file(storage.join(spec, schema.LEROBOT_INFO_PATH))
    except OSError:
        return False


# --------------------------------------------------------------------------- metadata


def read_info(root: str) -> dict:
    """``meta/info.json``, checked to be a v3.0 dataset."""
    path = storage.join(root, schema.LEROBOT_INFO_PATH)
    if not storage.is_file(path):
        raise LeRobotDatasetError(f"{root}: not a LeRobot dataset ({path} is missing)")
    info = storage.read_json(path)
    version = info.get("codebase_version")
    if version != schema.LEROBOT_CODEBASE_VERSION:
        raise LeRobotDatasetError(
            f"{root}: codebase_version {version!r} in {path} is not supported; rayrm reads "
            f"LeRobot {schema.LEROBOT_CODEBASE_VERSION} datasets (convert older ones with "
            "lerobot's convert_dataset_v21_to_v30)"
        )
    for key in ("fps", "features", "video_path"):
        if not info.get(key):
            raise LeRobotDatasetError(f"{root}: {path} has no {key!r}")
    return info


def video_keys(info: dict) -> list[str]:
    return sorted(k for k, f in info["features"].items() if f.get("dtype") == "video")


def check_cameras(root: str, info: dict, cameras: list[str]) -> None:
    available = video_keys(info)
    unknown = [c for c in cameras if c not in available]
    if unknown:
        raise LeRobotDatasetError(
            f"{root}: unknown camera key(s) {', '.join(unknown)}; the dataset's video keys "
            f"are: {', '.join(available) or 'none'}"
        )


def read_tasks(root: str) -> dict[int, str]:
    """``meta/tasks.parquet``: task_index -> task string (the string is the pandas index
    ``task`` in LeRobot's files, stored as a column of that name)."""
    path = storage.join(root, schema.LEROBOT_TASKS_PATH)
    if not storage.is_file(path):
        raise LeRobotDatasetError(f"{root}: {path} is missing")
    with storage.open_input(path) as f:
        table = pq.read_table(f)
    if "task" not in table.column_names or "task_index" not in table.column_names:
        raise LeRobotDatasetError(f"{path}: needs columns task and task_index")
    return dict(zip(table.column("task_index").to_pylist(), table.column("task").to_pylist()))


def read_episode_rows(root: str, cameras: list[str], success_column: str | None) -> pa.Table:
    """The ``meta/episodes/`` rows (every file, in path order) with the columns rayrm uses."""
    folder = storage.join(root, schema.LEROBOT_EPISODES_DIR)
    files = [f for f in storage.list_files(folder, recursive=True) if f.endswith(".parquet")]
    if not files:
        raise LeRobotDatasetError(f"{root}: no episode files under {folder}")
    wanted = _BASE_COLUMNS + [
        schema.lerobot_video_column(c, n) for c in cameras for n in _VIDEO_NAMES
    ]
    if success_column:
        wanted.append(success_column)
    tables = []
    for file in files:
        with storage.open_input(file) as f:
            present = pq.read_schema(f).names
            missing = [c for c in wanted if c not in present]
            if missing:
                raise LeRobotDatasetError(
                    f"{file}: no column(s) {', '.join(missing)} (has: {', '.join(present)})"
                )
            tables.append(pq.read_table(f, columns=wanted))
    return pa.concat_tables(tables).sort_by("episode_index")


# --------------------------------------------------------------------------- scanning


def probe_video(path: str) -> mp4.VideoFacts | str:
    """A video file's facts, or why it cannot be opened. Picklable: runs in Ray tasks."""
    try:
        return mp4.probe(path)
    except mp4.DECODE_ERRORS as err:
        return f"cannot decode the video file: {type(err).__name__}: {err}"


@dataclass(frozen=True)
class _Scan:
    """What checking one episode row needs from the dataset."""

    root: str
    info: dict
    tasks: set[str]
    facts: dict[str, mp4.VideoFacts | str]  # video file -> facts or why it can't be opened
    camera_as_episode: bool  # each camera an episode of its own (ids episode_000007:<key>)
    prompt: str | None


def scan_lerobot(
    root: str,
    cameras: list[str],
    prompt: str | None = None,
    success_column: str | None = None,
    mapper: Mapper = map,
    camera_as_episode: bool = False,
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Every episode of the dataset at ``root`` and the problems found.

    An episode's id is ``episode_000007`` and it holds every camera of ``cameras`` (the
    first one's file is ``source_file``, the others are ``extra_views``); with
    ``camera_as_episode`` each camera's view is an episode of its own, ``episode_000007:<key>``
    (``rayrm.data.schema.lerobot_episode_id``). ``mapper`` probes the video files (``map``
    here; the embed driver passes Ray tasks)."""
    info = read_info(root)
    check_cameras(root, info, cameras)
    tasks = set(read_tasks(root).values())
    rows = read_episode_rows(root, cameras, success_column).to_pylist()
    files = sorted({video_file(root, info, row, c) for row in rows for c in cameras})
    facts = dict(zip(files, mapper(probe_video, files)))
    as_episodes = camera_as_episode and len(cameras) > 1
    scan = _Scan(root, info, tasks, facts, as_episodes, prompt)
    episodes, problems = [], []
    for row in rows:
        success = row[success_column] if success_column else None
        for views in [[c] for c in cameras] if as_episodes else [cameras]:
            result = _episode(scan, row, views, success)
            (problems.extend if isinstance(result, list) else episodes.append)(result)
    return episodes, problems


def video_file(root: str, info: dict, row: dict, camera: str) -> str:
    """The mp4 file that holds ``camera``'s frames of the episode ``row``."""
    path = info["video_path"].format(
        video_key=camera,
        chunk_index=row[schema.lerobot_video_column(camera, "chunk_index")],
        file_index=row[schema.lerobot_video_column(camera, "file_index")],
    )
    return storage.join(root, path)


def _episode(
    scan: _Scan, row: dict, cameras: list[str], success
) -> EpisodeInfo | list[EpisodeProblem]:
    """The cameras of one episode row: its info, or every problem found in it."""
    index = int(row["episode_index"])
    episode_id = schema.lerobot_episode_id(index, cameras[0] if scan.camera_as_episode else None)
    problems: list[EpisodeProblem] = []
    first_video = video_file(scan.root, scan.info, row, cameras[0])

    def problem(key: str, reason: str) -> None:  # of the episode, not of one camera
        problems.append(EpisodeProblem(first_video, episode_id, key, reason))

    length = int(row["length"])
    if length < schema.MIN_EPISODE_FRAMES:
        problem("length", f"{length} frames, need >= {schema.MIN_EPISODE_FRAMES}")
    views = [_view(scan, row, camera, episode_id, problems) for camera in cameras]
    task = _task(row, scan.tasks, problem)
    if problems:
        return problems
    return LeRobotEpisodeInfo(
        episode_id=episode_id,
        source_file=views[0].source_file,
        num_frames=length,
        frame_shape=views[0].frame_shape,
        prompt=scan.prompt or task,
        success=None if success is None else bool(success),
        stage_boundaries=(),
        camera=cameras[0],
        episode_index=index,
        dataset_from_index=int(row["dataset_from_index"]),
        from_timestamp=views[0].from_timestamp,
        fps=float(scan.info["fps"]),
        extra_views=tuple(views[1:]),
    )


def _view(scan: _Scan, row: dict, camera: str, episode_id: str, problems: list) -> LeRobotView:
    """Where ``camera``'s frames of the episode ``row`` are; its problems go to ``problems``
    (each names the camera's video file, the episode and the camera key)."""
    video = video_file(scan.root, scan.info, row, camera)

    def problem(key: str, reason: str) -> None:
        problems.append(EpisodeProblem(video, episode_id, key, reason))

    fps = float(scan.info["fps"])
    length = int(row["length"])
    start = float(row[schema.lerobot_video_column(camera, "from_timestamp")])
    end = float(row[schema.lerobot_video_column(camera, "to_timestamp")])
    if abs((end - start) * fps - length) > 0.5:
        problem(
            camera,
            f"from/to timestamps {start:.4f}-{end:.4f} s hold {(end - start) * fps:.1f} frames "
            f"at {fps:g} fps, but the episode's length is {length}",
        )
    fact = scan.facts[video]
    if isinstance(fact, str):
        problem(camera, fact)
        return LeRobotView(camera, video, start, (0, 0, 3))
    _check_video(fact, scan.info["features"][camera], end, problem, camera)
    return LeRobotView(camera, video, start, (fact.height, fact.width, 3))


def _task(row: dict, known: set[str], problem) -> str | None:
    """The episode's instruction: its first task, which must be in ``meta/tasks.parquet``."""
    tasks = row["tasks"] or []
    if not tasks:
        problem("tasks", "the episode lists no task")
        return None
    if tasks[0] not in known:
        problem("tasks", f"task {tasks[0]!r} is not in {schema.LEROBOT_TASKS_PATH}")
    return tasks[0]


def _check_video(fact: mp4.VideoFacts, feature: dict, end: float, problem, camera: str) -> None:
    shape = tuple(int(s) for s in feature.get("shape", ()))[:2]
    if shape and shape != (fact.height, fact.width):
        problem(camera, f"video is {fact.height}x{fact.width}, info.json says {shape}")
    if end > fact.duration_s + mp4.TIMESTAMP_TOLERANCE_S:
        problem(
            camera,
            f"video is shorter than its episode: it ends at {fact.duration_s:.4f} s, the "
            f"episode needs it up to {end:.4f} s",
        )


# --------------------------------------------------------------------------- reading frames


class _FramePacker:
    """Copies decoded frames into fixed-size block buffers (one per camera: ``frame``,
    ``frame/<camera>``), episode after episode."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[tuple[LeRobotEpisodeInfo, int, int]] = []  # (episode, first t, n)
        self.buffers: dict[str, np.ndarray] = {}
        self.filled = 0

    def add_episode(self, info: LeRobotEpisodeInfo) -> Iterator[dict]:
        """Decode all of ``info``'s frames (every camera, in lockstep); yield every block
        that becomes full."""
        views = info.views()
        shapes = {schema.frame_column(i, v.camera): v.frame_shape for i, v in enumerate(views)}
        if self.buffers and {c: b.shape[1:] for c, b in self.buffers.items()} != shapes:
            yield from self.flush()  # a block holds one image size (per camera)
        decoders = [decode_view(info, view) for view in views]
        for t, frames in enumerate(zip(*decoders, strict=True)):
            if not self.buffers:
                self.buffers = {
                    c: np.empty((self.size, *shape), dtype=np.uint8) for c, shape in shapes.items()
                }
            for (column, shape), frame in zip(shapes.items(), frames):
                if frame.shape != shape:
                    raise ValueError(f"{column} frame {t} is {frame.shape}, expected {shape}")
                self.buffers[column][self.filled] = frame
            self._count(info, t)
            if self.filled == self.size:
                yield from self.flush()

    def _count(self, info: LeRobotEpisodeInfo, t: int) -> None:
        if self.parts and self.parts[-1][0] is info:
            episode, first, n = self.parts[-1]
            self.parts[-1] = (episode, first, n + 1)
        else:
            self.parts.append((info, t, 1))
        self.filled += 1

    def drop_episode(self, info: LeRobotEpisodeInfo) -> None:
        """Forget the unsent frames of an episode that failed mid-decode."""
        if self.parts and self.parts[-1][0] is info:
            self.filled -= self.parts.pop()[2]

    def flush(self) -> Iterator[dict]:
        if self.filled:
            first = self.buffers[schema.FRAME_COLUMN]
            pieces, offset = [], 0
            for info, t, n in self.parts:
                pieces.append(frame_columns(info, t, first[offset : offset + n]))
                offset += n
            block = {
                key: np.concatenate([p[key] for p in pieces])
                for key in ("episode_id", "frame_index", "prompt")
            }
            for column, buffer in self.buffers.items():
                block[column] = buffer[: self.filled]  # filled in place: no copy
            yield block
        self.parts, self.buffers, self.filled = [], {}, 0


def read_packed_blocks(
    episodes: list[LeRobotEpisodeInfo], frames_per_block: int
) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of ``frames_per_block`` frames spanning episodes, in file and time order; an
    episode that fails to decode is logged and skipped."""
    packer = _FramePacker(frames_per_block)
    for info in sorted(episodes, key=lambda e: (e.source_file, e.from_timestamp)):
        try:
            yield from packer.add_episode(info)
        except mp4.DECODE_ERRORS as err:
            packer.drop_episode(info)
            logger.warning(
                "%s episode %s: decode failed: %s", info.source_file, info.episode_id, err
            )
    yield from packer.flush()


def decode_episode(info: LeRobotEpisodeInfo) -> Iterator[np.ndarray]:
    """The episode's frames (of its first camera) in order, decoded from its video file."""
    return mp4.decode_range(info.source_file, info.from_timestamp, info.num_frames, info.fps)


def decode_view(info: LeRobotEpisodeInfo, view: LeRobotView) -> Iterator[np.ndarray]:
    """One camera's frames of the episode in order."""
    return mp4.decode_range(view.source_file, view.from_timestamp, info.num_frames, info.fps)


def read_error(info: LeRobotEpisodeInfo) -> str | None:
    """Decode all of one episode's frames (every camera); the error as text, naming the
    camera's file and key, None when they decode."""
    for view in info.views():
        try:
            for _ in decode_view(info, view):
                pass
        except mp4.DECODE_ERRORS as err:
            where = f" ({view.camera}, {view.source_file})" if info.extra_views else ""
            return f"frames cannot be decoded{where}: {type(err).__name__}: {err}"
    return None


class LeRobotEpisodeDatasource(Datasource):
    """Ray Data source over scanned LeRobot episodes; one row per frame, the same columns
    as :class:`rayrm.data.hdf5.HDF5EpisodeDatasource` (``episode_id``, ``frame_index``,
    ``prompt``, ``frame``), so the embedding pipeline does not care which one it reads."""

    def __init__(self, episodes: list[LeRobotEpisodeInfo], frames_per_block: int = 64):
        super().__init__()
        self.episodes = episodes
        self.frames_per_block = frames_per_block

    def estimate_inmemory_data_size(self) -> int:
        return sum(e.num_frames * int(np.prod(e.frame_shape)) for e in self.episodes)

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        groups = _file_groups(self.episodes, task_count(parallelism, len(self.episodes)))
        return episode_read_tasks(groups, self._read_fn, per_task_row_limit)

    def _read_fn(self, group: list[LeRobotEpisodeInfo]):
        frames_per_block = self.frames_per_block

        def read():
            for batch in read_packed_blocks(group, frames_per_block):
                yield BlockAccessor.batch_to_block(batch)

        return read


def _file_groups(episodes: list[LeRobotEpisodeInfo], n_groups: int) -> list[list]:
    """Exactly ``n_groups`` (at most one per episode) consecutive runs of episodes in (file,
    time) order with about equal frame counts: a task then reads its files front to back and
    few files are opened by two tasks. Exactly: with fewer read tasks than it asked for, Ray
    Data splits every block to make up the count (blocks of 8 frames arrive as two of 4)."""
    ordered = sorted(episodes, key=lambda e: (e.source_file, e.from_timestamp))
    n_groups = min(n_groups, len(ordered))
    total = sum(e.num_frames for e in ordered)
    groups: list[list] = [[]]
    done = 0
    for k, info in enumerate(ordered):
        to_open = n_groups - len(groups)  # groups not started yet
        must = to_open == len(ordered) - k  # one episode left for each of them
        if groups[-1] and to_open and (must or done >= total * len(groups) / n_groups):
            groups.append([])
        groups[-1].append(info)
        done += info.num_frames
    return groups
