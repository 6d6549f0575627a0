"""What a scoring run has committed: its part files, and the state that lets a rerun resume.

``<output>/_run/run.json`` holds the settings that decide the rewards and the run id. Each
part file (``_run/parts/<run id>-<unique>.parquet``) appears whole or not at all
(``rayrm.data.storage.write_bytes``) and holds whole episodes, so the parts of this run id
that exist are exactly the episodes it committed, whatever happened to the driver: a rerun
reads their ``episode_id`` column back and scores only the other episodes. An episode found
in two parts (a call retried after its actor died, or a killed run's actor that finished its
call) is taken from the first part in name order only, so no frame is used twice.

Object stores have no lock: one run per output at a time is the user's to ensure.
"""

from __future__ import annotations

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayrm.config import settings_diff
from rayrm.data import schema, storage
from rayrm.errors import UserError

# Part files read at once (object stores: one request each, latency-bound).
_READ_THREADS = 16

PART_RECORD_SCHEMA = pa.schema(
    [("part", pa.string()), ("episode_id", pa.string()), ("num_frames", pa.int64())]
)


class ScoreResumeError(UserError):
    """An unfinished scoring run's folder that this run can't continue."""


def part_name(run_id: str) -> str:
    """A new part file's name (unique: written once, never replaced)."""
    return f"{run_id}-{uuid.uuid4().hex[:12]}.parquet"


def part_records(part: str, frames: pa.Table) -> pa.Table:
    """One record per episode of a part file: the file, the episode, its frame count."""
    counts = Counter(frames.column("episode_id").to_pylist())
    return pa.table(
        {
            "part": [part] * len(counts),
            "episode_id": list(counts),
            "num_frames": list(counts.values()),
        },
        schema=PART_RECORD_SCHEMA,
    )


@dataclass
class ScoreRun:
    """``<output>/_run``: the settings and run id of one unfinished scoring run, and its
    part files."""

    output: str
    run_id: str = ""

    @property
    def path(self) -> str:
        return storage.join(self.output, schema.RUN_DIR)

    @property
    def parts_dir(self) -> str:
        return storage.join(self.path, schema.SCORE_PARTS_DIR)

    def open(self, settings: dict[str, Any], overwrite: bool) -> ScoreRun:
        """Take over the unfinished run with these settings, or start a new one."""
        run_file = storage.join(self.path, schema.SCORE_RUN_FILE)
        previous = storage.read_json(run_file) if storage.exists(run_file) else None
        if previous is not None and previous["settings"] != settings:
            if not overwrite:
                raise ScoreResumeError(
                    f"{self.path} holds an unfinished scoring run with other settings "
                    f"({settings_diff(previous['settings'], settings)}); pass "
                    "--score.overwrite true to discard it"
                )
            previous = None
        if overwrite or previous is None:
            storage.delete(self.path)  # parts of a discarded run must not be resumed
        self.run_id = previous["run_id"] if previous else uuid.uuid4().hex[:12]
        storage.makedirs(self.parts_dir)
        storage.write_json(run_file, {"settings": settings, "run_id": self.run_id})
        return self

    def part_files(self) -> list[str]:
        """This run's part files (names in ``parts_dir``), sorted."""
        prefix = f"{self.run_id}-"
        return [
            n
            for n in storage.listdir(self.parts_dir)
            if n.startswith(prefix) and n.endswith(".parquet")
        ]

    def committed(self) -> pa.Table:
        """The records of every part this run committed before (:data:`PART_RECORD_SCHEMA`)."""
        names = self.part_files()
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            tables = list(pool.map(self._records_of, names))
        return pa.concat_tables(tables) if tables else PART_RECORD_SCHEMA.empty_table()

    def _records_of(self, name: str) -> pa.Table:
        with storage.open_input(storage.join(self.parts_dir, name)) as f:
            return part_records(name, pq.read_table(f, columns=["episode_id"]))

    def read_frames(self, chosen: dict[str, str]) -> pa.Table:
        """The frames of every episode from the part ``chosen`` for it (episode -> part)."""
        by_part: dict[str, list[str]] = {}
        for episode, part in chosen.items():
            by_part.setdefault(part, []).append(episode)
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            tables = list(pool.map(lambda item: self._frames_of(*item), sorted(by_part.items())))
        if not tables:
            return schema.SCORE_PART_SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def _frames_of(self, name: str, episodes: list[str]) -> pa.Table:
        with storage.open_input(storage.join(self.parts_dir, name)) as f:
            table = pq.read_table(f, schema=schema.SCORE_PART_SCHEMA)
        keep = pc.is_in(table.column("episode_id"), value_set=pa.array(episodes, pa.string()))
        return table.filter(keep)

    def remove(self) -> None:
        """The run is published: drop its state."""
        storage.delete(self.path)


class PartLedger:
    """Which part holds each episode, for the episodes this run must score."""

    def __init__(self, num_frames: dict[str, int]):
        self.num_frames = num_frames  # episode id -> frames it must have
        self.parts: dict[str, str] = {}  # episode id -> the part its frames are taken from

    def add(self, records: pa.Table) -> tuple[int, int]:
        """Take part records; (frames, episodes) newly committed by them."""
        frames, completed = 0, 0
        rows = zip(*(records.column(c).to_pylist() for c in PART_RECORD_SCHEMA.names))
        for part, episode, n in sorted(rows):
            expected = self.num_frames.get(episode)
            if expected is None or episode in self.parts:
                continue  # not asked for any more, or a repeat (a retried call)
            if n != expected:  # a part holds whole episodes: the input changed
                raise ScoreResumeError(
                    f"part {part} holds {n} frames of episode {episode}, the input has "
                    f"{expected}: the input changed since the run started; pass "
                    "--score.overwrite true to start again"
                )
            self.parts[episode] = part
            frames += n
            completed += 1
        return frames, completed

    def missing(self) -> list[str]:
        return sorted(set(self.num_frames) - set(self.parts))
