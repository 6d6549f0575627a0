"""What an embedding run has committed, and the state that lets a rerun resume it.

The chunk files are the ledger. A write task's file appears whole or not at all
(``rayrm.data.storage.write_bytes``) and is named ``chunks/<run id>-<unique>.parquet``, so the
files of this run's id that exist are exactly the chunks it committed, whatever happened to
the driver: a rerun reads their small columns back (:meth:`RunFolder.committed`) and embeds
only the episodes they do not cover yet. :class:`ChunkLedger` keeps, per episode, the chunks
seen so far and tells when they tile the episode (``rayrm.data.chunks.tile_chunks``): a
repeat from a retried task, or a piece of an episode whose later frames failed, is never
used twice nor half.

``<output>/_run/`` holds the rest of an unfinished run's state:

=================  ========================================================================
``run.json``       the settings that decide the embeddings, and the run id
``inputs.parquet`` episode_id, source_file, num_frames of the input when the run last started:
                   committed episodes must still be in the input as they were to be resumed
``failures.json``  the failures table of a run that stopped on too many failures
=================  ========================================================================

Local folders are locked (``flock`` on ``_run``, released by the OS when the process dies);
object stores have no lock, so one run per output at a time is the user's to ensure there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from rayrm.config import settings_diff
from rayrm.data import schema, storage
from rayrm.data.chunks import CHUNK_RECORD_SCHEMA, ChunkLocation, chunk_records, tile_chunks
from rayrm.data.hdf5 import EpisodeInfo, EpisodeProblem
from rayrm.data.shards import shard_files
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
INPUTS_FILE = "inputs.parquet"
FAILURES_FILE = "failures.json"
_MAX_RECORD_TASKS = 64


class ResumeError(UserError):
    """An unfinished run's folder that this run can't continue."""


def run_dir(output: str) -> str:
    """Where a run on ``output`` keeps its own state (a fixed name, so a rerun finds it)."""
    return storage.join(output, schema.RUN_DIR)


@dataclass
class RunFolder:
    """``<output>/_run``: settings, run id, lock, failures of one unfinished run."""

    output: str
    run_id: str = ""
    _lock_fd: int | None = None

    @property
    def path(self) -> str:
        return run_dir(self.output)

    def open(self, settings: dict[str, Any], overwrite: bool) -> RunFolder:
        """Take over the unfinished run with these settings, or start a new one."""
        storage.makedirs(self.path)
        self._lock()
        try:
            self._prepare(settings, overwrite)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self, settings: dict[str, Any], overwrite: bool) -> None:
        previous = self._read_json(RUN_FILE)
        published = _published_run(self.output)
        if previous is not None and previous["run_id"] == published:
            previous = None  # that run finished; only its clean-up was cut short
        if previous is not None and previous["settings"] != settings:
            if not overwrite:
                raise ResumeError(
                    f"{self.path} holds an unfinished embedding with other settings "
                    f"({settings_diff(previous['settings'], settings)}); pass "
                    "--embed.overwrite true to discard it"
                )
            self.discard(previous["run_id"])
            previous = None
        self.run_id = previous["run_id"] if previous else uuid.uuid4().hex[:12]
        storage.write_json(self._file(RUN_FILE), {"settings": settings, "run_id": self.run_id})

    def _lock(self) -> None:
        if not storage.is_local(self.path):
            return
        # flock on the folder itself: released by the OS when the process dies, so no stale
        # lock file is ever left behind.
        self._lock_fd = os.open(storage.filesystem(self.path)[1], os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise FileExistsError(f"another embedding run is writing {self.output}") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def chunk_files(self, run_id: str | None = None) -> list[str]:
        """This run's chunk files (relative names), each one a whole commit."""
        return shard_files(self.output, run_id or self.run_id)

    def committed(self) -> pa.Table:
        """The records of every chunk this run committed before (read back in Ray tasks when
        there are many files)."""
        names = self.chunk_files()
        if len(names) <= 8:
            tables = [chunk_records(self.output, n) for n in names]
        else:
            n_tasks = min(len(names), _MAX_RECORD_TASKS)
            task = ray.remote(_records_of).options(num_cpus=0.5)
            refs = [task.remote(self.output, names[i::n_tasks]) for i in range(n_tasks)]
            tables = [t for part in ray.get(refs) for t in part]
        return pa.concat_tables(tables) if tables else _empty_records()

    def check_inputs(self, episodes: list[EpisodeInfo], committed_ids: set[str], overwrite: bool):
        """Committed episodes must be in the input as they were; then record the input."""
        before = self._read_inputs()
        now = {e.episode_id: (e.source_file, e.num_frames) for e in episodes}
        stale = sorted(e for e in committed_ids if before.get(e) is None or now.get(e) != before[e])
        if stale and not overwrite:
            raise ResumeError(
                f"{self.path} holds {len(stale)} committed episode(s) that are not in the input "
                f"as they were (e.g. {stale[:3]}); pass --embed.overwrite true to start again"
            )
        if stale:
            logger.warning("discarding %s: the input changed since it was started", self.path)
            self.discard(self.run_id)
        table = pa.table(
            {
                "episode_id": [e.episode_id for e in episodes],
                "source_file": [e.source_file for e in episodes],
                "num_frames": pa.array([e.num_frames for e in episodes], pa.int32()),
            }
        )
        storage.write_parquet(table, self._file(INPUTS_FILE))
        return bool(stale)

    def _read_inputs(self) -> dict[str, tuple[str, int]]:
        if not storage.exists(self._file(INPUTS_FILE)):
            return {}
        with storage.open_input(self._file(INPUTS_FILE)) as f:
            table = pq.read_table(f)
        rows = zip(
            *(table.column(c).to_pylist() for c in ("episode_id", "source_file", "num_frames"))
        )
        return {e: (s, n) for e, s, n in rows}

    def discard(self, run_id: str) -> None:
        """Drop a run's chunks and failures (its id stays in use when it is this run's)."""
        for name in self.chunk_files(run_id):
            storage.delete(storage.join(self.output, name))
        for name in (INPUTS_FILE, FAILURES_FILE):
            storage.delete(self._file(name))

    def write_failures(self, problems: list[EpisodeProblem]) -> None:
        storage.write_json(self._file(FAILURES_FILE), failure_rows(problems))

    def has_progress(self) -> bool:
        return bool(self.chunk_files()) or storage.exists(self._file(FAILURES_FILE))

    def remove(self) -> None:
        """The run is published (or gave up with nothing to resume): drop its state."""
        self.close()
        storage.delete(self.path)
        storage.remove_if_empty(self.output)

    def _file(self, name: str) -> str:
        return storage.join(self.path, name)

    def _read_json(self, name: str) -> Any:
        path = self._file(name)
        return storage.read_json(path) if storage.exists(path) else None


def failure_rows(problems: list[EpisodeProblem]) -> list[dict[str, str]]:
    return [
        {"episode": p.episode, "file": p.file, "key": p.key, "reason": p.reason} for p in problems
    ]


def _published_run(output: str) -> str | None:
    manifest = storage.join(output, schema.MANIFEST_NAME)
    return storage.read_json(manifest).get("run_id") if storage.exists(manifest) else None


def _records_of(output: str, names: list[str]) -> list[pa.Table]:
    return [chunk_records(output, n) for n in names]


def _empty_records() -> pa.Table:
    return CHUNK_RECORD_SCHEMA.empty_table()


class ChunkLedger:
    """Chunks committed per episode, and which episodes they cover whole."""

    def __init__(self, episodes: list[EpisodeInfo]):
        self.info = {e.episode_id: e for e in episodes}
        self.chunks: dict[str, list[ChunkLocation]] = defaultdict(list)
        self.tiles: dict[str, list[ChunkLocation]] = {}
        self.problems: dict[str, EpisodeProblem] = {}

    def add(self, records: pa.Table) -> tuple[int, int]:
        """Take chunk records; (frames embedded, episodes completed) by them."""
        frames, completed = 0, 0
        ok = pc.is_null(records.column("problem")).to_pylist()
        columns = [records.column(c).to_pylist() for c in CHUNK_COLUMNS]
        for good, (file, row_group, episode, start, n, problem) in zip(ok, zip(*columns)):
            info = self.info.get(episode)
            if info is None:
                continue  # committed earlier for an episode no longer asked for
            frames += n
            if not good:
                self.problems[episode] = EpisodeProblem(
                    info.source_file, episode, "visual_embedding", problem
                )
                continue
            if episode in self.tiles:
                continue  # a repeat of a whole episode (a retried task)
            self.chunks[episode].append(ChunkLocation(file, row_group, start, n))
            tiles = tile_chunks(self.chunks[episode], info.num_frames)
            if tiles is not None:
                self.tiles[episode] = tiles
                del self.chunks[episode]
                completed += 1
        return frames, completed

    def complete(self) -> set[str]:
        return set(self.tiles)

    def incomplete(self, episodes: list[EpisodeInfo]) -> list[EpisodeInfo]:
        return [
            e
            for e in episodes
            if e.episode_id not in self.tiles and e.episode_id not in self.problems
        ]


CHUNK_COLUMNS = ("file", "row_group", "episode_id", "frame_start", "num_frames", "problem")
