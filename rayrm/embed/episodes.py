"""Episodes embedded on the fly, nothing written: whole-episode rows in the layout
:class:`rayrm.data.shards.EpisodeReader` hands out, for scoring raw input (``rayrm evaluate``,
``rayrm score``) through the same Ray Data pipeline as ``rayrm embed``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from rayrm.config import Config
from rayrm.data import schema
from rayrm.data.chunks import whole_episode_table
from rayrm.data.hdf5 import EpisodeInfo
from rayrm.embed.pipeline import build_dataset

_EPISODES_PER_GROUP = 64  # episodes assembled per groupby partition


def episode_rows_dataset(
    cfg: Config, episodes: list[EpisodeInfo], language: dict[str, np.ndarray]
) -> ray.data.Dataset:
    """``episodes`` through ``cfg.backbone`` (cameras and state of ``cfg.embed``) as one row
    per episode; ``language`` holds each prompt's vector (:class:`PromptVectors`)."""
    views = cfg.embed.views()
    # each frame's values in the frame layout's order: the cameras, then the state
    columns = [schema.view_column(i, c) for i, c in enumerate(views)]
    columns += [schema.STATE_COLUMN] if cfg.embed.state else []
    # Frame embeddings -> one row per episode, inside Ray Data (a groupby: scoring needs
    # whole episodes, and the embedding pipeline cuts them into blocks).
    groups = max(1, len(episodes) // _EPISODES_PER_GROUP)
    return (
        build_dataset(cfg, episodes)
        .groupby("episode_id", num_partitions=groups)
        .map_groups(
            _episode_row,
            fn_kwargs={
                "episodes": {e.episode_id: e for e in episodes},
                "language": language,
                "columns": columns,
            },
            batch_format="numpy",
        )
    )


def _episode_row(frames: dict, episodes: dict, language: dict, columns: list[str]) -> pa.Table:
    """All frame embeddings of one episode -> its row in the embedding-shard layout (each
    frame's cameras and state side by side, as the shards' reader hands them out)."""
    info = episodes[str(frames["episode_id"][0])]
    order = np.argsort(frames["frame_index"], kind="stable")
    if not np.array_equal(frames["frame_index"][order], np.arange(info.num_frames)):
        raise RuntimeError(f"episode {info.episode_id}: frames missing or repeated")
    parts = [np.asarray(frames[c], np.float32).reshape(len(order), -1) for c in columns]
    visual = np.hstack(parts)[order]
    return whole_episode_table([(info, visual)], language)
