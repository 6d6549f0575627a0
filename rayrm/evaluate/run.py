"""Evaluate a checkpoint on embedding shards: curves, metrics JSON, plot.

Run: ``rayrm evaluate --config configs/demo.yaml [--evaluate.checkpoint PATH]``.
By default only the checkpoint's held-out episodes are scored (``evaluate.split: val``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from rayrm.config import Config
from rayrm.data.shards import episode_dataset, read_episode_index, read_manifest
from rayrm.evaluate.curves import CurveScorer
from rayrm.evaluate.report import all_metrics, plot_curves, write_json
from rayrm.runtime import quiet_datasets
from rayrm.train.checkpoint import read_checkpoint_config
from rayrm.train.trainer import find_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    metrics_path: str
    plot_path: str


def _episode_ids(cfg: Config, checkpoint_config: dict) -> list[str]:
    if cfg.evaluate.split == "all":
        return read_episode_index(cfg.evaluate.embeddings).column("episode_id").to_pylist()
    if cfg.evaluate.split == "val":
        return checkpoint_config["split"]["val_episodes"]
    raise ValueError(f"evaluate.split must be 'val' or 'all', got {cfg.evaluate.split!r}")


def score_episodes(embeddings: str, checkpoint: str, ids: list[str], batch_size: int) -> dict:
    """Curves of the given episodes, computed by a Ray Data actor; returns columns as lists."""
    with quiet_datasets():
        dataset = episode_dataset(embeddings, ids).map_batches(
            CurveScorer,
            fn_constructor_kwargs={"checkpoint": checkpoint, "batch_size": batch_size},
            batch_size=16,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0,
        )
    table = pa.concat_tables(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    table = table.sort_by("episode_id")
    if table.num_rows != len(set(ids)):
        raise RuntimeError(f"scored {table.num_rows} of {len(set(ids))} episodes")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def run_evaluate(cfg: Config, checkpoint: str | None = None, title: str = "reward model"):
    ecfg = cfg.evaluate
    checkpoint = (
        checkpoint or ecfg.checkpoint or find_checkpoint(cfg.train.output, cfg.train.run_name)
    )
    read_manifest(ecfg.embeddings)
    checkpoint_config = read_checkpoint_config(checkpoint)
    ids = _episode_ids(cfg, checkpoint_config)
    rows = score_episodes(ecfg.embeddings, checkpoint, ids, ecfg.batch_size)
    result = {
        "checkpoint": checkpoint,
        "split": ecfg.split,
        "blind": bool(checkpoint_config["train"].get("blind", False)),
        "curves": all_metrics(rows),
    }
    metrics_path = os.path.join(ecfg.output, "metrics.json")
    plot_path = os.path.join(ecfg.output, "reward_curves.png")
    write_json(metrics_path, result)
    write_json(os.path.join(ecfg.output, "curves.json"), rows)
    plot_curves(plot_path, rows, title, per_class=ecfg.plot_episodes)
    logger.info("wrote %s and %s", metrics_path, plot_path)
    return EvalResult(result, metrics_path, plot_path)
