"""``rayrm score``: a checkpoint and a dataset in, one reward per frame out (Parquet).

The rewards are computed by evaluation's scorer (``rayrm.evaluate.run.score_episodes``: Ray
Data, the model in an actor, raw input embedded on the fly through the embed pipeline), so
``progress_sparse`` is the causal reward ``RewardScorer`` gives frame by frame and ``prefix``
the prefix curve ``rayrm evaluate`` reports. This module lays those curves out one row per
frame with LeRobot's column names (layout: ``rayrm.data.schema``, "Per-frame rewards"),
adds RA-BC weights when asked, and writes the file whole (``storage.write_parquet``).

Frames get LeRobot's global ``index`` and ``episode_index`` when the episodes come from a
LeRobot v3 root (``score.input``, or ``score.dataset`` beside its embeddings); otherwise
episodes are numbered in id order and their frames counted on.

Not yet (issue 14): resuming a killed run (the file is all or nothing), SARM subtask
progress, a progress log line of its own, several cameras per LeRobot episode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

import rayrm
from rayrm.config import Config, to_dict
from rayrm.data import schema, storage
from rayrm.data.lerobot import is_lerobot_root, read_episode_rows
from rayrm.data.shards import read_episode_index
from rayrm.score.rabc import rabc_weights

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    output: str
    num_episodes: int
    num_frames: int


def hdf5_placement(ids: list[str], lengths: list[int]) -> dict[str, tuple[int, int]]:
    """episode id -> (episode_index, index of its frame 0): episodes in id order, frames
    counted on over them."""
    placement, start = {}, 0
    for episode_id, length in sorted(zip(ids, lengths)):
        placement[episode_id] = (len(placement), start)
        start += length
    return placement


def lerobot_placement(root: str, ids: list[str]) -> dict[str, tuple[int, int]]:
    """episode id -> (episode_index, dataset_from_index) from the root's ``meta/episodes``."""
    rows = read_episode_rows(root, [], None).to_pylist()
    by_id = {
        schema.lerobot_episode_id(r["episode_index"]): (r["episode_index"], r["dataset_from_index"])
        for r in rows
    }
    unknown = [e for e in ids if e not in by_id]
    if unknown:
        raise ValueError(
            f"{root}: episode(s) {', '.join(unknown[:5])} are not this dataset's episodes "
            "(one camera per episode is supported: ids like episode_000007)"
        )
    return {e: by_id[e] for e in ids}


def frame_table(
    curves: dict[str, list],
    placement: dict[str, tuple[int, int]],
    rabc_chunk: int = 0,
    rabc_kappa: float = 0.01,
) -> pa.Table:
    """Evaluation's curve rows (recorded episodes only) -> one row per frame
    (:data:`rayrm.data.schema.SCORE_SCHEMA`), sorted by ``index``."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in schema.SCORE_SCHEMA.names}
    seen: set[str] = set()
    for row in _recorded(curves):
        episode_id = row["episode_id"]
        if episode_id in seen:  # exactly once: a repeat means a scoring bug, not bad input
            raise RuntimeError(f"episode {episode_id} was scored twice")
        seen.add(episode_id)
        frames = np.asarray(row["frame_index"], np.int64)
        episode_index, first = placement[episode_id]
        parts["index"].append(first + frames)
        parts["episode_index"].append(np.full(len(frames), episode_index, np.int64))
        parts["frame_index"].append(frames)
        parts["progress_sparse"].append(np.asarray(row["causal"], np.float32))
        parts["episode_id"].append(np.full(len(frames), episode_id, dtype=object))
        parts["prefix"].append(np.asarray(row["prefix"], np.float32))
        stage = row["causal_stage_pred"]
        parts["stage"].append(np.asarray(stage, np.float64) if len(stage) else _nulls(frames))
    missing = sorted(set(placement) - seen)
    if missing:
        raise RuntimeError(f"{len(missing)} episode(s) not scored, e.g. {missing[:5]}")
    columns = {
        k: np.concatenate(v) for k, v in parts.items() if k not in ("rabc_delta", "rabc_weight")
    }
    n = len(columns["index"])
    if len(np.unique(columns["index"])) != n:  # two episodes placed over the same frames
        raise RuntimeError("frames of different episodes were given the same index")
    if rabc_chunk > 0:
        rabc = rabc_weights(
            columns["index"], columns["episode_index"], columns["progress_sparse"],
            rabc_chunk, kappa=rabc_kappa,
        )  # fmt: skip
        columns["rabc_delta"], columns["rabc_weight"] = rabc.delta, rabc.weight
    else:
        columns["rabc_delta"] = columns["rabc_weight"] = np.full(n, np.nan)
    table = pa.table(
        {f.name: _array(columns[f.name], f) for f in schema.SCORE_SCHEMA},
        schema=schema.SCORE_SCHEMA,
    )
    return table.sort_by("index")


def _recorded(curves: dict[str, list]):
    names = list(curves)
    for values in zip(*(curves[k] for k in names)):
        row = dict(zip(names, values))
        if row["kind"] == "episode":
            yield row


def _nulls(frames: np.ndarray) -> np.ndarray:
    return np.full(len(frames), np.nan)


def _array(values: np.ndarray, field: pa.Field) -> pa.Array:
    """NaN is null in the nullable columns (no stage, no RA-BC weight, no valid delta)."""
    if field.nullable and values.dtype.kind == "f":
        return pa.array(values, field.type, mask=np.isnan(values))
    return pa.array(values, field.type)


def _provenance(cfg: Config, checkpoint: str, dataset: str) -> dict[bytes, bytes]:
    record = {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "rayrm_version": rayrm.__version__,
        "config": to_dict(cfg.score),
    }
    return {
        schema.LEROBOT_REWARD_MODEL_KEY.encode(): checkpoint.encode(),
        schema.SCORE_METADATA_KEY.encode(): json.dumps(record).encode(),
    }


def run_score(cfg: Config, checkpoint: str | None = None) -> ScoreResult:
    """Score every episode of ``score.input`` (or of ``score.embeddings``) into
    ``score.output``; nothing is written unless every episode was scored."""
    from rayrm.evaluate.run import score_episodes
    from rayrm.train.trainer import find_checkpoint

    scfg = cfg.score
    if scfg.rabc_chunk < 0:
        raise ValueError(f"score.rabc_chunk must be >= 0, got {scfg.rabc_chunk}")
    checkpoint = (
        checkpoint or scfg.checkpoint or find_checkpoint(cfg.train.output, cfg.train.run_name)
    )
    if storage.exists(scfg.output) and not scfg.overwrite:
        raise FileExistsError(f"{scfg.output} exists; pass --score.overwrite true to replace it")
    storage.check_writable(scfg.output, "score.output")
    evaluate = dataclasses.replace(
        cfg.evaluate,
        input=scfg.input,
        embeddings=scfg.embeddings,
        split="all",
        rewind=False,
        batch_size=scfg.batch_size,
    )
    ids = (
        None if scfg.input else read_episode_index(scfg.embeddings).column("episode_id").to_pylist()
    )
    curves = score_episodes(dataclasses.replace(cfg, evaluate=evaluate), checkpoint, ids)
    recorded = list(_recorded(curves))
    episode_ids = [r["episode_id"] for r in recorded]
    root = scfg.input if scfg.input and is_lerobot_root(scfg.input) else scfg.dataset
    if root:
        placement = lerobot_placement(root, episode_ids)
    else:
        placement = hdf5_placement(episode_ids, [r["num_frames"] for r in recorded])
    table = frame_table(curves, placement, scfg.rabc_chunk, scfg.rabc_kappa)
    dataset = scfg.input or scfg.embeddings
    table = table.replace_schema_metadata(_provenance(cfg, checkpoint, dataset))
    storage.write_parquet(table, scfg.output)
    logger.info("wrote %d frames of %d episodes to %s", table.num_rows, len(recorded), scfg.output)
    return ScoreResult(scfg.output, len(recorded), table.num_rows)
