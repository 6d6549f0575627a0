"""Per-frame reward rows: where each episode's frames go (``index``, ``episode_index``), the
rows of a scored episode, and the RA-BC columns over a whole table (layout:
``rayrm.data.schema``, "Per-frame rewards").

Frames get LeRobot's global ``index`` and ``episode_index`` when the episodes come from a
LeRobot v3 root; otherwise episodes are numbered in id order and their frames counted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayrm.data import schema
from rayrm.data.lerobot import read_episode_rows
from rayrm.errors import UserError
from rayrm.score.rabc import rabc_weights


@dataclass(frozen=True)
class Placement:
    """Where an episode's frames go in the output."""

    episode_index: int
    first_index: int  # global index of frame 0
    num_frames: int


def hdf5_placement(ids: list[str], lengths: list[int]) -> dict[str, Placement]:
    """Episodes in id order, frames counted on over them."""
    placement, start = {}, 0
    for episode_id, length in sorted(zip(ids, lengths)):
        placement[episode_id] = Placement(len(placement), start, int(length))
        start += int(length)
    return placement


def lerobot_placement(root: str, ids: list[str], lengths: list[int]) -> dict[str, Placement]:
    """LeRobot's own ``episode_index`` and ``dataset_from_index`` from ``meta/episodes``."""
    rows = read_episode_rows(root, [], None).to_pylist()
    by_id = {schema.lerobot_episode_id(r["episode_index"]): r for r in rows}
    unknown = [e for e in ids if e not in by_id]
    if unknown:
        raise UserError(
            f"{root}: episode(s) {', '.join(unknown[:5])} are not this dataset's episodes "
            "(ids like episode_000007; embeddings made with embed.camera_as_episode hold "
            "one episode per camera, episode_000007:<key>, which LeRobot's index has no "
            "place for)"
        )
    return {
        e: Placement(by_id[e]["episode_index"], by_id[e]["dataset_from_index"], int(n))
        for e, n in zip(ids, lengths)
    }


def frame_rows(curves: pa.Table, placement: dict[str, Placement]) -> pa.Table:
    """Evaluation's curve rows (``rayrm.evaluate.curves.CURVE_SCHEMA``; recorded episodes)
    -> one row per frame (:data:`rayrm.data.schema.SCORE_PART_SCHEMA`)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in schema.SCORE_PART_SCHEMA.names}
    for row in curves.to_pylist():
        if row["kind"] != "episode":
            continue
        where = placement[row["episode_id"]]
        frames = np.asarray(row["frame_index"], np.int64)
        if len(frames) != where.num_frames:
            raise RuntimeError(
                f"episode {row['episode_id']}: {len(frames)} frames scored, {where.num_frames} "
                "expected"
            )
        parts["index"].append(where.first_index + frames)
        parts["episode_index"].append(np.full(len(frames), where.episode_index, np.int64))
        parts["frame_index"].append(frames)
        parts["progress_sparse"].append(np.asarray(row["causal"], np.float32))
        parts["episode_id"].append(np.full(len(frames), row["episode_id"], dtype=object))
        parts["prefix"].append(np.asarray(row["prefix"], np.float32))
        parts["stage"].append(_or_nulls(row["causal_stage_pred"], len(frames)))
        parts["subtask_progress"].append(_or_nulls(row["subtask_pred"], len(frames)))
        parts["success"].append(_or_nulls(row["success_pred"], len(frames)))
    if not parts["index"]:
        return schema.SCORE_PART_SCHEMA.empty_table()
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    return pa.table(
        {f.name: _array(columns[f.name], f) for f in schema.SCORE_PART_SCHEMA},
        schema=schema.SCORE_PART_SCHEMA,
    )


def with_rabc(frames: pa.Table, rabc_chunk: int, rabc_kappa: float) -> pa.Table:
    """All frames (:data:`SCORE_PART_SCHEMA`) -> :data:`SCORE_SCHEMA`, sorted by ``index``,
    with RA-BC weights over the whole table when ``rabc_chunk`` > 0 (null otherwise)."""
    frames = frames.sort_by("index")
    index = frames.column("index").to_numpy()
    if len(np.unique(index)) != len(index):  # two episodes placed over the same frames
        raise RuntimeError("frames of different episodes were given the same index")
    if rabc_chunk > 0:
        rabc = rabc_weights(
            index,
            frames.column("episode_index").to_numpy(),
            frames.column("progress_sparse").to_numpy(),
            rabc_chunk,
            kappa=rabc_kappa,
        )
        delta, weight = rabc.delta, rabc.weight.astype(np.float64)
    else:
        delta = weight = np.full(len(index), np.nan)
    for field, values in zip(schema.RABC_FIELDS, (delta, weight)):
        frames = frames.append_column(field, _array(values, field))
    return frames


def _or_nulls(values: list, n: int) -> np.ndarray:
    """A SARM head's per-frame values, or NaN (null) for a model without that head."""
    return np.asarray(values, np.float64) if len(values) else np.full(n, np.nan)


def _array(values: np.ndarray, field: pa.Field) -> pa.Array:
    """NaN is null in the nullable columns (no stage, no RA-BC weight, no valid delta)."""
    if field.nullable and values.dtype.kind == "f":
        return pa.array(values, field.type, mask=np.isnan(values), from_pandas=False)
    return pa.array(values, field.type)
