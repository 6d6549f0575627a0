"""Writing embedding folders (layout in ``rayrm.data.schema``): chunk files where the
embeddings are made, the episodes table, and the commit by manifest.

:func:`write_chunks` runs inside the embedding actors: it turns a call's frame embeddings into
chunk rows, writes them as one new Parquet file (each row its own row group) and returns only
their locations, so no embedding travels to the driver. The driver builds the episodes table
from those locations (:func:`episode_index_table`) and commits the folder by writing its
manifest last (:func:`commit`). The reader is beside this, in ``rayrm.data.shards``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayrm.data import schema, storage
from rayrm.data.shards import shard_files

logger = logging.getLogger(__name__)

# How chunk files are written. One row group per chunk lets readers fetch single chunks. No
# compression and no dictionary for the embeddings: float embeddings do not compress, and
# pyarrow's default dictionary attempt made the files half as large again as the raw floats
# (bench/RESULTS.md, "Chunk file size").
CHUNK_PARQUET_OPTIONS = {
    "row_group_size": 1,
    "compression": "none",
    "use_dictionary": ["episode_id"],
    "write_statistics": ["episode_id", "frame_start", "num_frames"],
}


# --------------------------------------------------------------------------- writing chunks

CHUNK_RECORD_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),  # relative to the folder; "" for a chunk not written
        pa.field("row_group", pa.int32()),
        pa.field("episode_id", pa.string()),
        pa.field("frame_start", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("problem", pa.string()),  # null, or why the chunk was not written
    ]
)
"""What a write task returns per chunk: its location, never its embeddings."""


def chunk_file_name(run_id: str) -> str:
    return f"{schema.CHUNKS_DIR}/{run_id}-{uuid.uuid4().hex[:12]}.parquet"


def _runs(episode_ids: np.ndarray, frame_index: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) row ranges of consecutive frames of one episode."""
    if not len(episode_ids):
        return []
    breaks = (episode_ids[1:] != episode_ids[:-1]) | (np.diff(frame_index) != 1)
    starts = np.flatnonzero(np.r_[True, breaks])
    return list(zip(starts.tolist(), np.r_[starts[1:], len(episode_ids)].tolist()))


def value_columns(batch: dict[str, np.ndarray]) -> list[str]:
    """The per-frame value columns of a block of embeddings, in stored order: the cameras'
    (``visual_embedding``, ``visual_embedding/<camera>``), then the ``state``."""
    visual = schema.VISUAL_COLUMN
    views = [c for c in batch if c == visual or c.startswith(visual + "/")]
    views.sort(key=lambda c: c != visual)  # the first camera first, the others as they came
    return views + ([schema.STATE_COLUMN] if schema.STATE_COLUMN in batch else [])


def _list_column(values: np.ndarray, keep: list[tuple[int, int]]) -> pa.LargeListArray:
    """Rows [a, b) of ``values`` [N, D] as one list per run, row-major."""
    dim = values.shape[1] if values.ndim == 2 else 0
    sizes = np.array([(b - a) * dim for a, b in keep], np.int64)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    flat = np.concatenate([values[a:b].ravel() for a, b in keep]) if keep else np.zeros(0, "f4")
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def chunk_table(batch: dict[str, np.ndarray]) -> tuple[pa.Table, list[dict]]:
    """Frame rows (episode_id, frame_index, visual_embedding, and any further camera and the
    state) -> chunk rows of the finite runs, and a record for every run that holds a
    non-finite value (not written)."""
    ids, index = batch["episode_id"], batch["frame_index"]
    names = value_columns(batch)
    values = {c: np.asarray(batch[c], dtype=np.float32) for c in names}
    keep, bad = [], []
    for a, b in _runs(ids, index):
        finite = np.ones(b - a, bool)
        culprit = None
        for column, v in values.items():
            ok = np.isfinite(v[a:b]).reshape(b - a, -1).all(axis=1)
            if culprit is None and not ok.all():
                culprit = column
            finite &= ok
        if culprit is None:
            keep.append((a, b))
            continue
        frame = int(index[a + int(np.argmin(finite))])
        what = "visual embedding" if culprit == schema.VISUAL_COLUMN else culprit
        bad.append(
            {
                "episode_id": str(ids[a]),
                "frame_start": int(index[a]),
                "num_frames": b - a,
                "problem": f"non-finite {what} at frame {frame}",
            }
        )
    table = pa.Table.from_pydict(
        {
            "episode_id": pa.array([str(ids[a]) for a, _ in keep], pa.string()),
            "frame_start": pa.array([int(index[a]) for a, _ in keep], pa.int32()),
            "num_frames": pa.array([b - a for a, b in keep], pa.int32()),
            **{c: _list_column(values[c], keep) for c in names},
        },
        schema=schema.chunk_schema(names[1:]),
    )
    return table, bad


def write_chunks(batch: dict[str, np.ndarray], folder: str, run_id: str) -> pa.Table:
    """Ray Data map function: write one block's chunks as a new file under ``folder``; return
    their :data:`CHUNK_RECORD_SCHEMA` records (the only thing the driver receives)."""
    table, bad = chunk_table(batch)
    name = ""
    if table.num_rows:
        name = chunk_file_name(run_id)
        storage.write_parquet(table, storage.join(folder, name), **CHUNK_PARQUET_OPTIONS)
    records = {
        "file": [name] * table.num_rows + [""] * len(bad),
        "row_group": list(range(table.num_rows)) + [-1] * len(bad),
        "episode_id": table.column("episode_id").to_pylist() + [r["episode_id"] for r in bad],
        "frame_start": table.column("frame_start").to_pylist() + [r["frame_start"] for r in bad],
        "num_frames": table.column("num_frames").to_pylist() + [r["num_frames"] for r in bad],
        "problem": [None] * table.num_rows + [r["problem"] for r in bad],
    }
    return pa.Table.from_pydict(records, schema=CHUNK_RECORD_SCHEMA)


def chunk_records(folder: str, name: str) -> pa.Table:
    """The records of a chunk file already written (resume reads them back; small columns)."""
    table = pq.read_table(
        storage.open_input(storage.join(folder, name)),
        columns=["episode_id", "frame_start", "num_frames"],
    )
    n = table.num_rows
    return pa.table(
        {
            "file": pa.array([name] * n, pa.string()),
            "row_group": pa.array(np.arange(n, dtype=np.int32)),
            "episode_id": table.column("episode_id"),
            "frame_start": table.column("frame_start"),
            "num_frames": table.column("num_frames"),
            "problem": pa.nulls(n, pa.string()),
        },
        schema=CHUNK_RECORD_SCHEMA,
    )


@dataclass(frozen=True)
class ChunkLocation:
    file: str
    row_group: int
    start: int
    frames: int


def tile_chunks(records: Iterable[ChunkLocation], num_frames: int) -> list[ChunkLocation] | None:
    """Chunks that cover frames [0, num_frames) exactly once, or None when they do not.

    Candidates may repeat (a retried write task writes its block again under another name)
    or be left over from an earlier attempt at the episode: the first chunk (by file name)
    that starts where the previous one ended is taken, so the choice is deterministic."""
    by_start: dict[int, ChunkLocation] = {}
    for rec in sorted(records, key=lambda r: (r.start, r.file, r.row_group)):
        by_start.setdefault(rec.start, rec)
    tiles, frame = [], 0
    while frame < num_frames:
        rec = by_start.get(frame)
        if rec is None:
            return None
        tiles.append(rec)
        frame += rec.frames
    return tiles if frame == num_frames else None


def _episode_columns(infos: list[Any], language: dict[str, np.ndarray]) -> dict[str, list]:
    """The per-episode columns both episode tables hold, from scanned ``EpisodeInfo``."""
    return {
        "episode_id": [i.episode_id for i in infos],
        "source_file": [i.source_file for i in infos],
        "num_frames": [i.num_frames for i in infos],
        "prompt": [i.prompt for i in infos],
        "success": [i.success for i in infos],
        "stage_boundaries": [list(i.stage_boundaries) for i in infos],
        "language_embedding": [np.asarray(language[i.prompt], np.float32) for i in infos],
        "failure_mode": [i.failure_mode for i in infos],
    }


def episode_index_table(
    episodes: list[Any], language: dict[str, np.ndarray], chunks: dict[str, list[ChunkLocation]]
) -> pa.Table:
    """The episodes table (:data:`schema.EPISODE_INDEX_SCHEMA`) of whole episodes, sorted by id.

    ``episodes`` are :class:`rayrm.data.hdf5.EpisodeInfo`; ``chunks`` their tilings."""
    infos = sorted(episodes, key=lambda e: e.episode_id)
    tiles = [chunks[i.episode_id] for i in infos]
    columns = {
        **_episode_columns(infos, language),
        "chunk_file": [[c.file for c in t] for t in tiles],
        "chunk_row_group": [[c.row_group for c in t] for t in tiles],
        "chunk_start": [[c.start for c in t] for t in tiles],
    }
    return pa.Table.from_pydict(columns, schema=schema.EPISODE_INDEX_SCHEMA)


def whole_episode_table(rows: list[tuple[Any, np.ndarray]], language: dict[str, np.ndarray]):
    """(EpisodeInfo, visual [T, D]) pairs -> whole-episode rows (:data:`schema.EPISODE_SCHEMA`),
    what :class:`EpisodeReader` hands out; for episodes embedded on the fly (evaluation)."""
    infos = [info for info, _ in rows]
    offsets = np.r_[0, np.cumsum([visual.size for _, visual in rows])].astype(np.int64)
    flat = [np.asarray(visual, np.float32).ravel() for _, visual in rows]
    values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
    columns = _episode_columns(infos, language)
    columns["visual_embedding"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.Table.from_pydict(columns, schema=schema.EPISODE_SCHEMA)


def episodes_file_name(run_id: str) -> str:
    return f"{schema.EPISODES_PREFIX}{run_id}-{uuid.uuid4().hex[:8]}.parquet"


# --------------------------------------------------------------------------- committing


def commit(folder: str, manifest: dict[str, Any]) -> None:
    """Publish ``manifest`` (it names the episodes table and every chunk file), then remove
    the files of this folder that no manifest names any more."""
    storage.write_json(storage.join(folder, schema.MANIFEST_NAME), manifest)
    remove_unreferenced(folder, manifest)


def _referenced(manifest: dict[str, Any]) -> set[str]:
    return {manifest["episodes"], manifest.get("failures") or "", *manifest["chunks"]}


def remove_unreferenced(folder: str, manifest: dict[str, Any]) -> None:
    """Best effort: chunk files, episodes tables and failure lists the manifest does not name
    (an earlier version's, a crashed or retried task's). Other files are left alone."""
    keep = _referenced(manifest)
    ours = shard_files(folder)
    ours += [
        n
        for n in storage.listdir(folder)
        if n.startswith((schema.EPISODES_PREFIX, schema.FAILURES_PREFIX))
    ]
    for name in ours:
        if name not in keep:
            try:
                storage.delete(storage.join(folder, name))
            except OSError as err:
                logger.warning("could not remove %s from %s: %s", name, folder, err)


def write_episode_folder(folder: str, episodes: pa.Table, manifest: dict[str, Any]) -> None:
    """Whole-episode rows (:data:`schema.EPISODE_SCHEMA`) as a committed embedding folder, one
    chunk per episode: for embeddings made elsewhere (benchmarks, imports). ``manifest`` adds
    to what is derived here (``visual_dim`` and ``language_dim`` are required)."""
    run_id = uuid.uuid4().hex[:12]
    lengths = episodes.column("num_frames").to_numpy().astype(np.int64)
    chunks = pa.table(
        {
            "episode_id": episodes.column("episode_id"),
            "frame_start": pa.array(np.zeros(len(lengths), np.int32)),
            "num_frames": pa.array(lengths.astype(np.int32)),
            "visual_embedding": episodes.column("visual_embedding"),
        },
        schema=schema.CHUNK_SCHEMA,
    )
    name = chunk_file_name(run_id)
    storage.write_parquet(chunks, storage.join(folder, name), **CHUNK_PARQUET_OPTIONS)
    index = episodes.drop_columns(["visual_embedding"])
    index = index.append_column(
        schema.CHUNK_LOCATION_FIELDS[0], pa.array([[name]] * len(lengths), pa.list_(pa.string()))
    )
    index = index.append_column(
        schema.CHUNK_LOCATION_FIELDS[1],
        pa.array([[i] for i in range(len(lengths))], pa.list_(pa.int32())),
    )
    index = index.append_column(
        schema.CHUNK_LOCATION_FIELDS[2], pa.array([[0]] * len(lengths), pa.list_(pa.int32()))
    )
    episodes_name = episodes_file_name(run_id)
    storage.write_parquet(index, storage.join(folder, episodes_name))
    full = {
        "format": schema.EMBEDDINGS_FORMAT,
        "num_episodes": len(lengths),
        "num_frames": int(lengths.sum()),
        "num_failed_episodes": 0,
        "episodes": episodes_name,
        "chunks": [name],
        "run_id": run_id,
        **manifest,
    }
    commit(folder, full)
