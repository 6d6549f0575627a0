"""Driver side of training: split episodes, check everything, run ``TorchTrainer``.

Every check that can fail (missing shards, no training or held-out episodes, more workers than
episodes or than the cluster can place) runs here, before any worker starts, so a bad run
fails in seconds with a message instead of hanging.

Run: ``rayrm train --config configs/demo.yaml`` (or ``jobs/train.py`` on a cluster). Re-running
with the same ``train.output`` and ``train.run_name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rayrm.config import Config
from rayrm.data import schema
from rayrm.data.shards import (
    ShardError,
    check_columns,
    episode_dataset,
    read_episode_index,
    read_manifest,
    shard_dir,
    split_episodes,
)
from rayrm.runtime import quiet_datasets
from rayrm.train.loop import steps_for, train_loop_per_worker

logger = logging.getLogger(__name__)

RESULT_FILE = "rayrm_result.json"  # written next to the checkpoints when a run finishes


@dataclass
class EpisodeSplit:
    train: list[str]
    val: list[str]
    train_frames: int


def make_split(cfg: Config, index: pa.Table) -> EpisodeSplit:
    ids = index.column("episode_id").to_pylist()
    success = index.column("success").to_pylist()
    frames = dict(zip(ids, index.column("num_frames").to_pylist()))
    held_out = split_episodes(ids, success, cfg.train.val_ratio, cfg.train.seed)
    usable = [s is not False or not cfg.train.only_successful for s in success]
    train = [e for e, ok in zip(ids, usable) if ok and e not in held_out]
    val = sorted(held_out)
    if not train:
        raise ShardError("no training episodes (all held out, or none successful)")
    if not any(s is not False for e, s in zip(ids, success) if e in held_out):
        raise ShardError(
            f"the validation split ({len(val)} episodes, val_ratio={cfg.train.val_ratio}) "
            "holds no successful episode; raise train.val_ratio or add episodes"
        )
    return EpisodeSplit(train, val, sum(frames[e] for e in train))


def _check_resources(cfg: Config, num_train_episodes: int) -> None:
    tcfg = cfg.train
    if tcfg.num_workers > num_train_episodes:
        raise ValueError(
            f"train.num_workers={tcfg.num_workers} but only {num_train_episodes} training "
            "episodes: every worker needs at least one"
        )
    available = ray.cluster_resources()
    need = {"CPU": tcfg.num_workers * tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        need["GPU"] = tcfg.num_workers
    for resource, amount in need.items():
        if available.get(resource, 0) < amount:
            raise ValueError(
                f"train.num_workers={tcfg.num_workers} needs {amount:g} {resource} but the "
                f"cluster has {available.get(resource, 0):g}; lower num_workers or "
                "cpus_per_worker (autoscaling clusters: start the workers first)"
            )


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str
    latest_checkpoint: str
    metrics: dict[str, Any]


def run_train(cfg: Config) -> TrainResult:
    tcfg = cfg.train
    manifest = read_manifest(tcfg.embeddings)
    index = read_episode_index(tcfg.embeddings)
    check_columns(
        pq.read_schema(_first_shard(tcfg.embeddings)), schema.TRAIN_COLUMNS, tcfg.embeddings
    )
    split = make_split(cfg, index)
    _check_resources(cfg, len(split.train))
    total_steps, val_every = steps_for(tcfg, split.train_frames)
    logger.info(
        "training on %d episodes (%d frames), validating on %d; %d steps, batch %d, %d worker(s)",
        len(split.train),
        split.train_frames,
        len(split.val),
        total_steps,
        tcfg.batch_size,
        tcfg.num_workers,
    )
    meta = {
        "embeddings": os.path.abspath(tcfg.embeddings),
        "backbone": manifest["backbone"],
        "split": {"val_ratio": tcfg.val_ratio, "seed": tcfg.seed, "val_episodes": split.val},
    }
    with quiet_datasets():
        datasets = {
            "train": episode_dataset(tcfg.embeddings, split.train),
            "val": episode_dataset(tcfg.embeddings, split.val),
        }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": tcfg,
            "model": cfg.model,
            "total_steps": total_steps,
            "val_every": val_every,
            "log_level": cfg.log_level,
            "meta": meta,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={
                "CPU": tcfg.cpus_per_worker,
                **({"GPU": 1} if tcfg.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=tcfg.run_name,
            storage_path=os.path.abspath(tcfg.output),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.num_to_keep or None,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    return _write_result(os.path.join(os.path.abspath(tcfg.output), tcfg.run_name), result)


def _first_shard(path: str) -> str:
    files = sorted(f for f in os.listdir(shard_dir(path)) if f.endswith(".parquet"))
    if not files:
        raise ShardError(f"{path}: no Parquet shards")
    return os.path.join(shard_dir(path), files[0])


def _write_result(run_dir: str, result) -> TrainResult:
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training in {run_dir} produced no checkpoint")
    out = TrainResult(
        run_dir=run_dir,
        best_checkpoint=best.path,
        latest_checkpoint=result.checkpoint.path,
        metrics=dict(result.metrics or {}),
    )
    with open(os.path.join(run_dir, RESULT_FILE), "w") as f:
        json.dump(vars(out), f, indent=2)
    logger.info("best checkpoint %s (metrics %s)", out.best_checkpoint, out.metrics)
    return out


def find_checkpoint(train_output: str, run_name: str) -> str:
    """The best checkpoint of a finished run, for evaluate when no path is given."""
    path = os.path.join(train_output, run_name, RESULT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no finished training run at {os.path.dirname(path)}")
    with open(path) as f:
        return json.load(f)["best_checkpoint"]
