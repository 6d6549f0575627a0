"""Raw HDF5 episodes: find them, check them, and read their frames with Ray Data.

Inputs are local paths or URLs (``s3://``, ``gs://``, ``hdfs://``, ``file://``): a file, a
folder of ``.h5``/``.hdf5``/``.hdf`` files, or a glob. Plain local paths open natively in
h5py; every URL goes through one code path, a pyarrow file system (``FileSystem.from_uri``)
whose random-access file h5py reads as a Python file object. Tests exercise that path with
``file://`` URIs, so s3 and gs run the same code with another file system underneath.

Scanning (:func:`scan_file`, :func:`scan_episodes`) reads metadata and the small per-frame
arrays (pose, action) only: group names, shapes, dtypes, attributes, non-finite values. It
returns every problem it finds as an :class:`EpisodeProblem` (file, episode, key, reason)
instead of stopping at the first one, so a caller can skip the bad episodes and go on.

Frames are read inside Ray Data read tasks by :class:`HDF5EpisodeDatasource`. Each task reads
its episodes in order into blocks of exactly ``frames_per_block`` frames that may span episode
boundaries (only the task's last block, or a change of image size, ends a block early): the
embedding actors then get full batches without Ray re-slicing and copying blocks, and no block
holds a whole long episode. Frames go from HDF5 straight into the block's buffer
(``read_direct``): one copy, no intermediate arrays. An episode whose frames fail to read is
logged and skipped (its frames already sent stay incomplete downstream, where
:func:`read_error` names the reason); the task goes on with its other episodes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np
from pyarrow import fs as pafs
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from rayrm.data import schema, storage
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_GLOB_CHARS = "*?["


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
    # Why a failed episode failed (the ``failure_mode`` attribute), for per-mode metrics.
    failure_mode: str | None = field(default=None, kw_only=True)
    # P, values per frame of the robot state (``embed.state``); 0 without one.
    state_dim: int = field(default=0, kw_only=True)


def as_cameras(cameras: str | Sequence[str]) -> list[str]:
    """One camera name or several -> a list (callers with one camera pass the name)."""
    return [cameras] if isinstance(cameras, str) else list(cameras)


@dataclass(frozen=True)
class EpisodeProblem:
    """One reason an input can't be used, with the place it was found."""

    file: str
    episode: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} [episode {self.episode}, key {self.key}]: {self.reason}"


class InvalidEpisodesError(UserError):
    def __init__(self, problems: list[EpisodeProblem], note: str = "", max_lines: int = 50):
        self.problems = problems
        shown = [str(p) for p in problems[:max_lines]]
        if len(problems) > max_lines:
            shown.append(f"... and {len(problems) - max_lines} more")
        lines = "\n  ".join(shown)
        note = f"\n{note}" if note else ""
        super().__init__(f"{len(problems)} problem(s) in the input episodes:\n  {lines}{note}")


# --------------------------------------------------------------------------- paths and files


def _list_url(spec: str) -> list[str]:
    fs, path = storage.filesystem(spec)
    parts = path.split("/")
    wild = next((i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS)), None)
    if wild is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [storage.as_url(spec, path)]
        if info.type != pafs.FileType.Directory:
            return []
        listing = fs.get_file_info(pafs.FileSelector(path))
        return [storage.as_url(spec, i.path) for i in listing if i.path.endswith(HDF5_SUFFIXES)]
    base = "/".join(parts[:wild]) or "/"
    selector = pafs.FileSelector(base, recursive=len(parts) - wild > 1, allow_not_found=True)
    listing = fs.get_file_info(selector)
    return [
        storage.as_url(spec, i.path)
        for i in listing
        if i.type == pafs.FileType.File and _glob_match(i.path.split("/"), parts)
    ]


def _glob_match(path_parts: list[str], pattern_parts: list[str]) -> bool:
    """Shell-glob semantics per path segment: ``*`` never crosses a ``/``."""
    return len(path_parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(path_parts, pattern_parts)
    )


def _list_local(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(HDF5_SUFFIXES)]
    elif any(c in spec for c in _GLOB_CHARS):
        files = glob.glob(spec)
    else:
        files = [spec] if os.path.exists(spec) else []
    return [os.path.abspath(f) for f in files]


def list_hdf5_files(spec: str) -> list[str]:
    """An HDF5 file, a folder of them, or a glob (local path or URL) -> sorted list of files."""
    files = _list_url(spec) if storage.is_url(spec) else _list_local(spec)
    if not files:
        raise FileNotFoundError(f"no HDF5 episode files at '{spec}'")
    return sorted(files)


@contextlib.contextmanager
def open_hdf5(path: str) -> Iterator[h5py.File]:
    """A read-only h5py file: local paths natively, URLs through a pyarrow file object."""
    if not storage.is_url(path):
        with h5py.File(path, "r") as handle:
            yield handle
        return
    with storage.open_input(path) as raw, h5py.File(raw, "r") as handle:
        yield handle


# --------------------------------------------------------------------------- scanning


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


def _check_state(group: h5py.Group, key: str, problem) -> int:
    """The ``embed.state`` dataset must be numbers [T, P] (stored as float32); its P, 0 when
    it is unusable (the row count and NaN are checked as for any per-frame array)."""
    data = group.get(key)
    if not isinstance(data, h5py.Dataset):
        problem(key, f"missing state dataset (has: {', '.join(sorted(group)) or 'nothing'})")
        return 0
    if data.ndim != 2 or data.dtype.kind not in "fiu":
        problem(key, f"{data.dtype} {data.shape}, expected numbers [T, P]")
        return 0
    return int(data.shape[1])


def _check_per_frame(group: h5py.Group, key: str, noun: str, num_frames, problem) -> None:
    """An optional per-frame array (pose, action): one row per frame, all values finite."""
    data = group.get(key)
    if data is None:
        return
    if not isinstance(data, h5py.Dataset) or data.ndim == 0:
        problem(key, "not an array with one row per frame")
        return
    if num_frames is not None and len(data) != num_frames:
        problem(key, f"{len(data)} {noun} but {num_frames} frames")
    if data.dtype.kind in "fc":  # small ([T, 7]): reading it is cheap next to the frames
        rows_ok = np.isfinite(data[()]).reshape(len(data), -1).all(axis=1)
        if not rows_ok.all():
            problem(key, f"non-finite value (NaN or inf) at frame {int(np.argmin(rows_ok))}")


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


def _check_cameras(group: h5py.Group, cameras: list[str], problem) -> int | None:
    """Every camera's dataset (frame counts must agree); the first one's frame count."""
    counts = []
    for camera in cameras:
        frames = group.get(camera)
        if isinstance(frames, h5py.Dataset):
            counts.append(_check_frames(frames, camera, problem))
        else:
            have = ", ".join(sorted(group)) or "nothing"
            problem(camera, f"missing camera dataset (has: {have})")
            counts.append(None)
    for camera, count in zip(cameras[1:], counts[1:]):
        if None not in (count, counts[0]) and count != counts[0]:
            problem(camera, f"{count} frames but {cameras[0]} has {counts[0]}")
    return counts[0]


def _check_episode(
    group: h5py.Group,
    file: str,
    cameras: list[str],
    prompt: str | None,
    state: str | None = None,
) -> EpisodeInfo | list[EpisodeProblem]:
    """The episode's metadata, or every problem found in it (not just the first)."""
    name = group.name.lstrip("/")
    problems: list[EpisodeProblem] = []

    def problem(key: str, reason: str) -> None:
        problems.append(EpisodeProblem(file, name, key, reason))

    num_frames = _check_cameras(group, cameras, problem)
    state_dim = _check_state(group, state, problem) if state else 0
    _check_per_frame(group, schema.ACTION_KEY, "actions", num_frames, problem)
    _check_per_frame(group, schema.POSE_KEY, "poses", num_frames, problem)
    if state and state != schema.POSE_KEY:  # a state of another name: the same checks
        _check_per_frame(group, state, "state rows", num_frames, problem)
    prompt = prompt or _attr(group, schema.ATTR_PROMPT) or _attr(group.file, schema.ATTR_PROMPT)
    if not prompt or not isinstance(prompt, str):
        problem(schema.ATTR_PROMPT, "no prompt attribute and no embed.prompt given")
    success = _attr(group, schema.ATTR_SUCCESS)
    failure_mode = _attr(group, schema.ATTR_FAILURE_MODE)
    boundaries = _stage_boundaries(group, num_frames, problem)
    if problems:
        return problems
    return EpisodeInfo(
        episode_id=name,
        source_file=file,
        num_frames=int(num_frames),
        frame_shape=tuple(int(s) for s in group[cameras[0]].shape[1:]),
        prompt=prompt,
        success=None if success is None else bool(success),
        stage_boundaries=boundaries,
        failure_mode=str(failure_mode) if failure_mode is not None else None,
        state_dim=state_dim,
    )


# What h5py (and a pyarrow file object under it) raises for damaged files and objects.
_READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def _scan_handle(handle: h5py.File, file: str, cameras: list[str], prompt, state):
    episodes, problems = [], []
    try:
        groups = [k for k in sorted(handle) if isinstance(handle.get(k), h5py.Group)]
    except _READ_ERRORS as err:
        return [], [EpisodeProblem(file, "-", "-", f"cannot list episodes: {err}")]
    if not groups:
        problems.append(EpisodeProblem(file, "-", "-", "file holds no episode groups"))
    for key in groups:
        try:
            result = _check_episode(handle[key], file, cameras, prompt, state)
        except _READ_ERRORS as err:
            result = [EpisodeProblem(file, key, "-", f"cannot read episode: {err}")]
        (problems.extend if isinstance(result, list) else episodes.append)(result)
    return episodes, problems


def scan_file(
    file: str, cameras: str | Sequence[str], prompt: str | None = None, state: str | None = None
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """One file's episodes and problems, with every camera in ``cameras`` (and the ``state``
    dataset) checked. Pure and picklable: callers run it in Ray tasks."""
    try:
        with open_hdf5(file) as handle:
            return _scan_handle(handle, file, as_cameras(cameras), prompt, state)
    except _READ_ERRORS as err:  # per-episode errors are caught inside: this is the file
        return [], [EpisodeProblem(file, "-", "-", f"cannot open as HDF5: {err}")]


def merge_scans(
    scans: Iterable[tuple[list[EpisodeInfo], list[EpisodeProblem]]],
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Per-file scans (in file order) -> all episodes and problems; a repeated episode id is
    a problem of every file after the first that holds it."""
    episodes: list[EpisodeInfo] = []
    problems: list[EpisodeProblem] = []
    seen: dict[str, str] = {}
    for found, bad in scans:
        problems.extend(bad)
        for info in found:
            if info.episode_id in seen:
                reason = f"episode id also in {seen[info.episode_id]}; ids must be unique"
                problems.append(EpisodeProblem(info.source_file, info.episode_id, "-", reason))
                continue
            seen[info.episode_id] = info.source_file
            episodes.append(info)
    return episodes, problems


def scan_episodes(
    files: list[str], cameras: str | Sequence[str], prompt: str | None = None, state=None
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Read every episode's metadata here; collect all problems instead of stopping."""
    return merge_scans(scan_file(file, cameras, prompt, state) for file in files)


def check_state_dims(
    episodes: list[EpisodeInfo], state: str | None
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Every episode's state must have the same P (the model's state projection is one
    size): the episodes whose P differs from the most common one are problems."""
    if not state or not episodes:
        return episodes, []
    dims = [e.state_dim for e in episodes]
    common = max(set(dims), key=dims.count)
    keep = [e for e in episodes if e.state_dim == common]
    problems = [
        EpisodeProblem(
            e.source_file,
            e.episode_id,
            state,
            f"{e.state_dim} values per frame, the other episodes have {common}",
        )
        for e in episodes
        if e.state_dim != common
    ]
    return keep, problems


# --------------------------------------------------------------------------- reading frames


def _by_file(episodes: list[EpisodeInfo]) -> Iterator[tuple[str, list[EpisodeInfo]]]:
    for file in sorted({e.source_file for e in episodes}):
        yield file, [e for e in episodes if e.source_file == file]


def frame_columns(info: EpisodeInfo, start: int, frames: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of a block of frames (one layout for every episode source): frames
    ``start`` .. of ``info``'s episode."""
    n = len(frames)
    return {
        "episode_id": np.full(n, info.episode_id, dtype=object),
        "frame_index": np.arange(start, start + n, dtype=np.int32),
        "prompt": np.full(n, info.prompt, dtype=object),
        "frame": frames,
    }


def episode_sources(
    group: h5py.Group, cameras: list[str], state: str | None
) -> dict[str, h5py.Dataset]:
    """Block column -> the episode's dataset it is read from: ``frame`` (the first camera),
    ``frame/<camera>`` (the others), ``state``."""
    sources = {schema.frame_column(i, c): group[c] for i, c in enumerate(cameras)}
    if state:
        sources[schema.STATE_COLUMN] = group[state]
    return sources


def _buffer_dtype(column: str) -> np.dtype:
    return np.dtype(np.float32) if column == schema.STATE_COLUMN else np.dtype(np.uint8)


class _BlockPacker:
    """Fills fixed-size buffers (one per block column: each camera's frames, the state)
    straight from HDF5, episode after episode."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[dict[str, np.ndarray]] = []  # column pieces of the current block
        self.buffers: dict[str, np.ndarray] = {}
        self.filled = 0

    def _shapes(self, sources: dict[str, h5py.Dataset]) -> dict[str, tuple]:
        return {column: tuple(data.shape[1:]) for column, data in sources.items()}

    def add_episode(self, sources: dict[str, h5py.Dataset], info: EpisodeInfo) -> Iterator[dict]:
        """Read all of ``info``'s frames (every source); yield every block that becomes full."""
        shapes = self._shapes(sources)
        if self.buffers and {c: b.shape[1:] for c, b in self.buffers.items()} != shapes:
            yield from self.flush()  # a block holds one image size (per camera)
        start = 0
        while start < info.num_frames:
            if not self.buffers:
                self.buffers = {
                    c: np.empty((self.size, *shape), dtype=_buffer_dtype(c))
                    for c, shape in shapes.items()
                }
            n = min(self.size - self.filled, info.num_frames - start)
            dest = np.s_[self.filled : self.filled + n]
            for column, data in sources.items():
                self._read(data, self.buffers[column], np.s_[start : start + n], dest)
            part = frame_columns(info, start, self.buffers[schema.FRAME_COLUMN][dest])
            self.parts.append(part)
            self.filled += n
            start += n
            if self.filled == self.size:
                yield from self.flush()

    @staticmethod
    def _read(data: h5py.Dataset, buffer: np.ndarray, source, dest) -> None:
        if data.dtype == buffer.dtype:
            data.read_direct(buffer, source, dest)  # frames: one copy, no intermediate array
        else:
            buffer[dest] = data[source]  # the state: a few floats per frame, any number type

    def drop_episode(self, episode_id: str) -> None:
        """Forget the unsent frames of an episode that failed mid-read."""
        while self.parts and self.parts[-1]["episode_id"][0] == episode_id:
            self.filled -= len(self.parts.pop()["frame_index"])

    def flush(self) -> Iterator[dict]:
        if self.filled:
            block = {
                key: np.concatenate([p[key] for p in self.parts])
                for key in ("episode_id", "frame_index", "prompt")
            }
            for column, buffer in self.buffers.items():
                block[column] = buffer[: self.filled]  # filled in place: no copy
            yield block
        self.parts, self.buffers, self.filled = [], {}, 0


def read_packed_blocks(
    episodes: list[EpisodeInfo],
    cameras: str | Sequence[str],
    frames_per_block: int,
    state: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of ``frames_per_block`` frames spanning episodes (see the module docstring),
    with a column per camera and the state (:func:`episode_sources`).

    An episode (or a whole file) that fails to read is logged and skipped."""
    cameras = as_cameras(cameras)
    packer = _BlockPacker(frames_per_block)
    for file, group in _by_file(episodes):
        try:
            with open_hdf5(file) as handle:
                for info in group:
                    try:
                        sources = episode_sources(handle[info.episode_id], cameras, state)
                        yield from packer.add_episode(sources, info)
                    except _READ_ERRORS as err:
                        packer.drop_episode(info.episode_id)
                        logger.warning("%s episode %s: read failed: %s", file, info.episode_id, err)
        except _READ_ERRORS as err:
            logger.warning("%s: cannot open: %s", file, err)
    yield from packer.flush()


def read_error(
    info: EpisodeInfo,
    cameras: str | Sequence[str],
    frames_per_block: int = 256,
    state: str | None = None,
) -> str | None:
    """Read all of one episode's frames (every camera, the state); the error it raises as
    text, naming the dataset, None when it reads."""
    key = "-"
    try:
        with open_hdf5(info.source_file) as handle:
            sources = episode_sources(handle[info.episode_id], as_cameras(cameras), state)
            for key in sources:  # the key is named in the error
                for start in range(0, info.num_frames, frames_per_block):
                    sources[key][start : start + frames_per_block]
    except _READ_ERRORS as err:
        return f"frames cannot be read ({key}): {type(err).__name__}: {err}"
    return None


class HDF5EpisodeDatasource(Datasource):
    """Ray Data source over already-scanned episodes; one row per frame.

    ====================  ================  =====================================
    column                type              meaning
    ====================  ================  =====================================
    ``episode_id``        str               HDF5 group name
    ``frame_index``       int32             t in 0..T-1
    ``prompt``            str               the episode's task instruction
    ``frame``             uint8 [H, W, 3]   the first camera's image at t
    ``frame/<camera>``    uint8 [H, W, 3]   each further camera's image at t
    ``state``             float32 [P]       with ``state``: the robot state at t
    ====================  ================  =====================================

    Blocks hold ``frames_per_block`` frames and may span episodes; a read task reads its
    episodes in order, so an episode's frames arrive together.
    """

    def __init__(
        self,
        episodes: list[EpisodeInfo],
        cameras: str | Sequence[str],
        frames_per_block: int = 64,
        state: str | None = None,
    ):
        super().__init__()
        self.episodes = episodes
        self.cameras = as_cameras(cameras)
        self.state = state
        self.frames_per_block = frames_per_block

    def estimate_inmemory_data_size(self) -> int:
        per_frame = [len(self.cameras) * int(np.prod(e.frame_shape)) for e in self.episodes]
        return sum(e.num_frames * n for e, n in zip(self.episodes, per_frame))

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        groups = _balanced_groups(self.episodes, task_count(parallelism, len(self.episodes)))
        return episode_read_tasks(groups, self._read_fn, per_task_row_limit)

    def _read_fn(self, group: list[EpisodeInfo]):
        cameras, state, frames_per_block = self.cameras, self.state, self.frames_per_block

        def read():
            for batch in read_packed_blocks(group, cameras, frames_per_block, state):
                yield BlockAccessor.batch_to_block(batch)

        return read


def task_count(parallelism: int, num_episodes: int) -> int:
    """Read tasks for Ray Data's requested ``parallelism`` (-1: one), at most one per episode."""
    return max(1, min(parallelism if parallelism > 0 else 1, num_episodes))


def episode_read_tasks(groups: list[list[EpisodeInfo]], read_fn, per_task_row_limit=None):
    """One ``ReadTask`` per group of episodes, with its rows, bytes and files as metadata;
    ``read_fn(group)`` makes the task's function. Shared by the HDF5 and LeRobot sources."""
    tasks = []
    for group in groups:
        metadata = BlockMetadata(
            num_rows=sum(e.num_frames for e in group),
            size_bytes=sum(e.num_frames * int(np.prod(e.frame_shape)) for e in group),
            input_files=sorted({e.source_file for e in group}),
            exec_stats=None,
        )
        tasks.append(ReadTask(read_fn(group), metadata, per_task_row_limit=per_task_row_limit))
    return tasks


def _balanced_groups(episodes: list[EpisodeInfo], n_groups: int) -> list[list[EpisodeInfo]]:
    """Greedy longest-first split so read tasks get similar frame counts."""
    groups: list[list[EpisodeInfo]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    for info in sorted(episodes, key=lambda e: -e.num_frames):
        i = loads.index(min(loads))
        groups[i].append(info)
        loads[i] += info.num_frames
    return [sorted(g, key=lambda e: (e.source_file, e.episode_id)) for g in groups if g]
