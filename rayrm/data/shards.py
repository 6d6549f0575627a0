"""Reading embedding shards (layout in ``rayrm.data.schema``), splitting episodes, and putting a
finished shard folder in place (``rayrm embed`` and ``rayrm annotate`` both publish one)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from rayrm.data import schema


class ShardError(ValueError):
    """Embedding shards that are missing, incomplete or inconsistent."""


def sibling_path(path: str, tag: str) -> str:
    """A unique hidden name next to ``path`` (same file system, so renames are atomic)."""
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:8]}")


def replace_folder(new: str, target: str) -> None:
    """Move the finished folder ``new`` to ``target``, replacing whatever is there.

    The old ``target`` is renamed aside first and deleted only once the new one is in place,
    so a failure in between leaves the old one where it was."""
    if not os.path.exists(target):
        os.replace(new, target)
        return
    old = sibling_path(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def read_manifest(path: str) -> dict[str, Any]:
    manifest = os.path.join(path, schema.MANIFEST_NAME)
    if not os.path.exists(manifest):
        raise ShardError(
            f"{path}: no {schema.MANIFEST_NAME}; not an embedding folder, or the embedding "
            "run did not finish (run `rayrm embed` first)"
        )
    with open(manifest) as f:
        return json.load(f)


def shard_dir(path: str) -> str:
    return os.path.join(path, schema.SHARDS_DIR)


def read_episode_index(path: str) -> pa.Table:
    """The small per-episode columns of every shard (no embeddings) for the driver."""
    table = pq.read_table(
        shard_dir(path),
        columns=["episode_id", "num_frames", "prompt", "success", "stage_boundaries"],
    )
    return table.sort_by("episode_id")


def episode_dataset(
    path: str, episode_ids: list[str] | None = None, columns: list[str] | None = None
) -> ray.data.Dataset:
    """Ray Dataset of the shards' rows (``columns``, default the training columns),
    optionally only some episodes."""
    columns = columns or schema.TRAIN_COLUMNS
    dataset = ray.data.read_parquet(shard_dir(path)).select_columns(columns)
    if episode_ids is None:
        return dataset
    keep = pa.array(episode_ids, type=pa.string())

    def select(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("episode_id"), value_set=keep))

    return dataset.map_batches(select, batch_format="pyarrow")


def check_columns(table_schema: pa.Schema, required: Iterable[str], where: str) -> None:
    missing = [c for c in required if c not in table_schema.names]
    if missing:
        raise ShardError(f"{where}: shards lack column(s) {', '.join(missing)}")


def split_episodes(
    episode_ids: list[str], success: list[bool | None], val_ratio: float, seed: int
) -> set[str]:
    """Held-out episode ids: a stable hash order, stratified by the success flag.

    The same ids, ratio and seed always give the same split, whatever the shard order, and
    both successes and failures are held out (AUROC needs both).
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    held_out: set[str] = set()
    for flag in (True, False, None):
        ids = [e for e, s in zip(episode_ids, success) if s is flag]
        ids.sort(key=lambda e: hashlib.sha1(f"{seed}:{e}".encode()).hexdigest())
        n_val = round(val_ratio * len(ids))
        if val_ratio > 0 and len(ids) >= 2:
            n_val = max(1, min(n_val, len(ids) - 1))
        held_out.update(ids[:n_val])
    return held_out


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
    )


def _take_frames(batch: EpisodeBatch, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    parts = [values[batch.offsets[i] : batch.offsets[i + 1]] for i in idx]
    return np.concatenate(parts) if parts else values[:0]
