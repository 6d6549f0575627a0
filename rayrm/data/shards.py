"""Reading embedding folders (layout in ``rayrm.data.schema``; the writer is beside this, in
``rayrm.data.chunks``), and the episode batches training and evaluation work on.

The reader (:class:`EpisodeReader`) opens the manifest, the episodes table and then only the
row groups of the episodes asked for: a training rank reading its own episodes reads its share
of the bytes and nothing else (``bytes_read`` counts them). :func:`episode_dataset` is the same
as a Ray Dataset of whole-episode rows for evaluation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from rayrm.data import schema, storage
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

_READ_THREADS = 8  # chunk files fetched at once (object stores answer slowly but in parallel)


class ShardError(UserError):
    """Embedding shards that are missing, incomplete or inconsistent."""


# --------------------------------------------------------------------------- reading


def read_manifest(path: str) -> dict[str, Any]:
    """The committed manifest of an embedding folder (local path or URL)."""
    where = storage.join(path, schema.MANIFEST_NAME)
    try:
        found = storage.exists(where)
    except OSError as err:
        raise ShardError(f"{path}: cannot read there: {err}") from err
    if not found:
        raise ShardError(
            f"{path}: no {schema.MANIFEST_NAME}; not an embedding folder, or the embedding "
            "run did not finish (run `rayrm embed` first)"
        )
    manifest = storage.read_json(where)
    if manifest.get("format") != schema.EMBEDDINGS_FORMAT:
        raise ShardError(
            f"{path}: embeddings of format {manifest.get('format')!r}, this rayrm reads "
            f"{schema.EMBEDDINGS_FORMAT!r}: embed them again"
        )
    return manifest


class EpisodeReader:
    """Whole episodes of one committed embedding folder, reading only the chunks they need.

    ``index()`` is the episodes table (small: no frame embeddings); ``read(ids, columns)``
    returns whole-episode rows (:data:`schema.EPISODE_SCHEMA` columns, plus the stage labels
    when annotated) sorted by episode id. ``bytes_read`` adds up the Parquet bytes of the
    chunk row groups fetched so far."""

    def __init__(self, path: str, manifest: dict[str, Any] | None = None):
        self.path = storage.absolute(path)
        self.manifest = manifest or read_manifest(path)
        # visual_embedding is handed out as each frame's [view_0 | view_1 | ... | state]
        self.layout = schema.FrameLayout.from_manifest(self.manifest)
        self.bytes_read = 0
        self._index: pa.Table | None = None

    def index(self) -> pa.Table:
        if self._index is None:
            where = storage.join(self.path, self.manifest["episodes"])
            with storage.open_input(where) as f:
                self._index = pq.read_table(f).sort_by("episode_id")
        return self._index

    def columns(self) -> list[str]:
        """Every column ``read`` can return."""
        names = [n for n in self.index().column_names if n not in schema.CHUNK_LOCATION_COLUMNS]
        return names[:6] + ["visual_embedding"] + names[6:]

    def read(self, ids: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
        index = self.index()
        if ids is not None:
            keep = pc.is_in(index.column("episode_id"), value_set=pa.array(ids, pa.string()))
            index = index.filter(keep)
        columns = columns or self.columns()
        check_columns(
            pa.schema([pa.field(c, pa.null()) for c in self.columns()]), columns, self.path
        )
        out = index.select([c for c in columns if c != "visual_embedding"])
        if "visual_embedding" in columns:
            position = columns.index("visual_embedding")
            out = out.add_column(position, schema.VISUAL_FIELD, self._visual(index))
        return out

    def _visual(self, index: pa.Table) -> pa.LargeListArray:
        files = index.column("chunk_file").to_pylist()
        groups = index.column("chunk_row_group").to_pylist()
        starts = index.column("chunk_start").to_pylist()
        wanted: dict[str, set[int]] = {}
        for names, rgs in zip(files, groups):
            for name, rg in zip(names, rgs):
                wanted.setdefault(name, set()).add(rg)
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            results = list(pool.map(lambda item: self._fetch(*item), sorted(wanted.items())))
        fetched = {name: chunks for name, chunks, _ in results}
        self.bytes_read += sum(nbytes for _, _, nbytes in results)
        episode_ids = index.column("episode_id").to_pylist()
        lengths = index.column("num_frames").to_pylist()
        parts, sizes = [], []
        for row, (names, rgs, chunk_starts) in enumerate(zip(files, groups, starts)):
            frame, size = 0, 0
            for name, rg, start in zip(names, rgs, chunk_starts):
                episode, first, n, values = fetched[name][rg]
                if episode != episode_ids[row] or not first == start == frame:
                    raise ShardError(
                        f"{self.path}: {name} row group {rg} is not the chunk the episodes "
                        f"table names for {episode_ids[row]} at frame {frame}; the folder "
                        "is damaged"
                    )
                parts.append(values)
                frame += n
                size += len(values)
            if frame != lengths[row]:
                raise ShardError(
                    f"{self.path}: episode {episode_ids[row]}: chunks hold {frame} of its "
                    f"{lengths[row]} frames; the folder is damaged"
                )
            sizes.append(size)
        offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        values = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))

    def _fetch(self, name: str, row_groups: set[int]) -> tuple[str, dict[int, tuple], int]:
        """Row groups of one chunk file -> (name, {row group: (episode_id, frame_start,
        frames, values)}, Parquet bytes read); values are the chunk's frame vectors, row-major
        (each camera's embedding and the state side by side, ``self.layout``)."""
        order = sorted(row_groups)
        values = self.layout.columns()
        columns = ["episode_id", "frame_start", "num_frames", *values]
        with storage.open_input(storage.join(self.path, name)) as f:
            parquet = pq.ParquetFile(f)
            table = parquet.read_row_groups(order, columns=columns)
            meta = parquet.metadata
            nbytes = sum(
                meta.row_group(g).column(c).total_compressed_size
                for g in order
                for c in range(meta.num_columns)
                if _top_column(meta.row_group(g).column(c).path_in_schema, columns)
            )
        ids = table.column("episode_id").to_pylist()
        firsts = table.column("frame_start").to_pylist()
        counts = table.column("num_frames").to_pylist()
        parts = [_list_parts(table.column(c)) for c in values]
        chunks = {
            g: (ids[i], firsts[i], counts[i], self._frame_vectors(parts, i, counts[i], name))
            for i, g in enumerate(order)
        }
        return name, chunks, nbytes

    def _frame_vectors(self, parts: list, row: int, frames: int, name: str) -> np.ndarray:
        """Row ``row``'s values of every layout column, side by side per frame, flat."""
        pieces = [flat[offsets[row] : offsets[row + 1]] for offsets, flat in parts]
        if len(pieces) == 1:  # one camera: the stored values as they are, no copy
            return pieces[0]
        dims = [*self.layout.view_dims, self.layout.state_dim][: len(pieces)]
        for column, piece, dim in zip(self.layout.columns(), pieces, dims):
            if len(piece) != frames * dim:
                raise ShardError(
                    f"{self.path}: {name}: {column} holds {len(piece)} values for {frames} "
                    f"frames, the manifest's frame_layout says {dim} per frame"
                )
        return np.hstack([p.reshape(frames, -1) for p in pieces]).ravel()


def _top_column(path: str, columns: list[str]) -> bool:
    """Whether a Parquet leaf path (``visual_embedding.list.element``) is in one of
    ``columns`` (whose names may hold dots themselves: LeRobot camera keys)."""
    return any(path == c or path.startswith(c + ".") for c in columns)


def _list_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (offsets, flat values)."""
    lists = column.combine_chunks()
    return lists.offsets.to_numpy(), lists.values.to_numpy(zero_copy_only=False)


def shard_files(folder: str, run_id: str | None = None) -> list[str]:
    """The chunk files under ``folder`` (relative names, ``chunks/<run>-<unique>.parquet``),
    sorted; only run ``run_id``'s when given (an empty id is no run's: none). What is on
    disk, committed or not: readers go by the manifest's list instead."""
    where = storage.join(folder, schema.CHUNKS_DIR)
    prefix = "" if run_id is None else f"{run_id}-"
    return sorted(
        f"{schema.CHUNKS_DIR}/{name}"
        for name in storage.listdir(where)
        if name.startswith(prefix) and name.endswith(".parquet")
    )


def task_vectors(index: pa.Table, ids: list[str] | None = None) -> dict[str, list[float]]:
    """prompt -> language vector of each task in an episodes table (of the episodes ``ids``
    only, when given), taken from its first episode: the vector depends on the prompt alone."""
    if ids is not None:
        keep = pc.is_in(index.column("episode_id"), value_set=pa.array(ids, pa.string()))
        index = index.filter(keep)
    found: dict[str, list[float]] = {}
    prompts = index.column("prompt").to_pylist()
    vectors = index.column("language_embedding").to_pylist()
    for prompt, vector in zip(prompts, vectors):
        found.setdefault(prompt, vector)
    return found


def read_episode_index(path: str) -> pa.Table:
    """The small per-episode columns of every episode (no embeddings), sorted by id."""
    columns = ["episode_id", "num_frames", "prompt", "success", "stage_boundaries"]
    return EpisodeReader(path).index().select(columns)


def read_episodes(
    path: str, ids: list[str] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Whole-episode rows (default: every column) of ``ids`` (default: all), sorted by id."""
    return EpisodeReader(path).read(ids, columns)


def _read_group(batch: pa.Table, path: str, manifest: dict, columns: list[str]) -> pa.Table:
    ids = [i for group in batch.column("ids").to_pylist() for i in group]
    return EpisodeReader(path, manifest).read(ids, columns)


def episode_dataset(
    path: str,
    episode_ids: list[str] | None = None,
    columns: list[str] | None = None,
    frames_per_task: int = 1 << 16,
) -> ray.data.Dataset:
    """Ray Dataset of whole-episode rows (``columns``, default the training columns) of
    ``episode_ids`` (default all): read tasks of about ``frames_per_task`` frames, each
    fetching only its episodes' chunks."""
    reader = EpisodeReader(path)
    columns = columns or schema.TRAIN_COLUMNS
    index = reader.index().select(["episode_id", "num_frames"])
    if episode_ids is not None:
        keep = pc.is_in(index.column("episode_id"), value_set=pa.array(episode_ids, pa.string()))
        index = index.filter(keep)
    groups, group, frames = [], [], 0
    for episode, n in zip(index.column(0).to_pylist(), index.column(1).to_pylist()):
        group.append(episode)
        frames += n
        if frames >= frames_per_task:
            groups.append(group)
            group, frames = [], 0
    groups += [group] if group else []
    items = ray.data.from_items([{"ids": g} for g in groups], override_num_blocks=len(groups) or 1)
    return items.map_batches(
        _read_group,
        fn_kwargs={"path": reader.path, "manifest": reader.manifest, "columns": columns},
        batch_size=1,
        batch_format="pyarrow",
    )


def check_columns(table_schema: pa.Schema, required: Iterable[str], where: str) -> None:
    missing = [c for c in required if c not in table_schema.names]
    if missing:
        raise ShardError(f"{where}: shards lack column(s) {', '.join(missing)}")


def split_episodes(
    episode_ids: list[str],
    success: list[bool | None],
    val_ratio: float,
    seed: int,
    strata: list[Any] | None = None,
) -> set[str]:
    """Held-out episode ids: ``val_ratio`` of the successes and of the failures (at least one
    of each flag that has two or more episodes), chosen in a stable hash order.

    Within a flag, ``strata`` (one hashable key per episode; training uses (task, success,
    failure mode)) are held out in proportion: each stratum's episodes are placed at
    (k + 0.5) / its size for k in its hash order, and the first ones of that order over all
    strata are taken (systematic sampling), so every task and failure mode is held out in its
    share, and a stratum of one episode when the share reaches it. The same ids, ratio and
    seed always give the same split, whatever the shard order.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"val_ratio must be in [0, 1), got {val_ratio}")
    strata = [None] * len(episode_ids) if strata is None else list(strata)
    held_out: set[str] = set()
    for flag in (True, False, None):
        members = [(e, k) for e, s, k in zip(episode_ids, success, strata) if s is flag]
        n_val = round(val_ratio * len(members))
        if val_ratio > 0 and len(members) >= 2:
            n_val = max(1, min(n_val, len(members) - 1))
        held_out.update(_proportional_order(members, seed)[:n_val])
    return held_out


def _proportional_order(members: list[tuple[str, Any]], seed: int) -> list[str]:
    """Episode ids ordered so that any first n holds each stratum in proportion."""
    by_stratum: dict[str, list[str]] = {}
    for episode, key in members:
        by_stratum.setdefault(repr(key), []).append(episode)
    placed = []
    for key, ids in by_stratum.items():
        ids.sort(key=lambda e: hashlib.sha1(f"{seed}:{e}".encode()).hexdigest())
        placed += [((k + 0.5) / len(ids), key, e) for k, e in enumerate(ids)]
    return [e for _, _, e in sorted(placed)]


@dataclass
class EpisodeBatch:
    """Episodes packed flat: frames of episode i are ``visual[offsets[i]:offsets[i+1]]``."""

    episode_ids: list[str]
    visual: np.ndarray  # float32 [sum T, D]
    language: np.ndarray  # float32 [N, D_lang] (D_lang may be 0)
    offsets: np.ndarray  # int64 [N + 1]
    success: list[bool | None]
    stage_boundaries: list[list[int]]
    prompts: list[str]
    # SARM labels per frame, flat like ``visual``; -1 / NaN where an episode has none.
    stage: np.ndarray | None = None  # int64 [sum T]
    subtask: np.ndarray | None = None  # float32 [sum T]
    failure_modes: list[str | None] | None = None  # when the folder records them

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.episode_ids)

    def episode(self, i: int) -> np.ndarray:
        return self.visual[self.offsets[i] : self.offsets[i + 1]]


def _flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


def episodes_from_table(table: pa.Table, where: str = "shards") -> EpisodeBatch:
    """Arrow rows of the episode schema -> one flat :class:`EpisodeBatch` (no per-row loop)."""
    check_columns(table.schema, schema.TRAIN_COLUMNS, where)
    lengths = table.column("num_frames").to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = _flat_values(table.column("visual_embedding")).astype(np.float32, copy=False)
    n_frames, n_episodes = int(offsets[-1]), len(lengths)
    if n_frames == 0 or flat.size % n_frames:
        raise ShardError(f"{where}: visual_embedding sizes do not match num_frames")
    dim = flat.size // n_frames
    row_sizes = pc.list_value_length(table.column("visual_embedding")).to_numpy()
    if not np.array_equal(row_sizes, lengths * dim):
        bad = table.column("episode_id")[int(np.argmax(row_sizes != lengths * dim))]
        raise ShardError(f"{where}: episode {bad}: visual_embedding is not num_frames x {dim}")
    language = _flat_values(table.column("language_embedding")).astype(np.float32)
    stage, subtask = (
        _stage_labels(table, lengths) if "stage" in table.column_names else (None, None)
    )
    return EpisodeBatch(
        episode_ids=table.column("episode_id").to_pylist(),
        visual=flat.reshape(n_frames, dim),
        language=language.reshape(n_episodes, language.size // max(n_episodes, 1)),
        offsets=offsets,
        success=table.column("success").to_pylist(),
        stage_boundaries=table.column("stage_boundaries").to_pylist(),
        prompts=table.column("prompt").to_pylist(),
        stage=stage,
        subtask=subtask,
        failure_modes=(
            table.column("failure_mode").to_pylist()
            if "failure_mode" in table.column_names
            else None
        ),
    )


def _stage_labels(table: pa.Table, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat per-frame stage/subtask labels; unannotated episodes (empty lists) get -1 / NaN."""
    annotated = pc.list_value_length(table.column("stage")).to_numpy() == lengths
    stage = np.full(int(lengths.sum()), -1, dtype=np.int64)
    subtask = np.full(int(lengths.sum()), np.nan, dtype=np.float32)
    frame_annotated = np.repeat(annotated, lengths)
    stage[frame_annotated] = _flat_values(table.column("stage"))
    subtask[frame_annotated] = _flat_values(table.column("subtask_progress"))
    return stage, subtask


def select_episodes(batch: EpisodeBatch, keep: np.ndarray) -> EpisodeBatch:
    """The episodes where ``keep`` is true, packed flat again."""
    idx = np.flatnonzero(keep)
    return EpisodeBatch(
        episode_ids=[batch.episode_ids[i] for i in idx],
        visual=np.concatenate([batch.episode(i) for i in idx]) if len(idx) else batch.visual[:0],
        language=batch.language[idx],
        offsets=np.concatenate([[0], np.cumsum(batch.lengths[idx])]).astype(np.int64),
        success=[batch.success[i] for i in idx],
        stage_boundaries=[batch.stage_boundaries[i] for i in idx],
        prompts=[batch.prompts[i] for i in idx],
        stage=None if batch.stage is None else _take_frames(batch, idx, batch.stage),
        subtask=None if batch.subtask is None else _take_frames(batch, idx, batch.subtask),
        failure_modes=None
        if batch.failure_modes is None
        else [batch.failure_modes[i] for i in idx],
    )


def _take_frames(batch: EpisodeBatch, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    parts = [values[batch.offsets[i] : batch.offsets[i + 1]] for i in idx]
    return np.concatenate(parts) if parts else values[:0]
