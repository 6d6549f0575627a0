"""Driver side of training: split episodes, check everything, run ``TorchTrainer``.

Every check that can fail (missing shards, no training or held-out episodes, more workers than
episodes or than the cluster can place) runs here, before any worker starts, so a bad run
fails in seconds with a message instead of hanging. On an autoscaling cluster
``train.wait_for_resources_s`` turns the last check into a bounded wait for new nodes.

Run: ``rayrm train --config configs/demo.yaml`` (or ``jobs/train.py`` on a cluster). Re-running
with the same ``train.output`` and ``train.run_name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.autoscaler import sdk as autoscaler
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rayrm.config import Config, TrainConfig
from rayrm.data import schema, storage
from rayrm.data.shards import (
    EpisodeReader,
    ShardError,
    check_columns,
    split_episodes,
    task_vectors,
)
from rayrm.errors import UserError
from rayrm.stages import stage_priors
from rayrm.train.checkpoint import RESULT_FILE
from rayrm.train.loop import PLAN_KEY, WorkerPlan, train_loop_per_worker
from rayrm.train.tracking import check_trackers

logger = logging.getLogger(__name__)
_RESOURCE_POLL_S = 2.0  # seconds between looks at the cluster while nodes start


@dataclass
class EpisodeSplit:
    train: list[str]
    val: list[str]
    train_frames: int
    frames: dict[str, int]


def make_split(cfg: Config, index: pa.Table) -> EpisodeSplit:
    ids = index.column("episode_id").to_pylist()
    success = index.column("success").to_pylist()
    frames = dict(zip(ids, index.column("num_frames").to_pylist()))
    short = [e for e in ids if frames[e] < schema.MIN_EPISODE_FRAMES]
    if short:
        logger.warning("skipping %d episode(s) shorter than 4 frames: %s", len(short), short[:5])
    if len(short) == len(ids):
        raise ShardError(f"no episode has the {schema.MIN_EPISODE_FRAMES} frames a window needs")
    prompts = index.column("prompt").to_pylist()
    modes = (
        index.column("failure_mode").to_pylist()
        if "failure_mode" in index.column_names
        else [None] * len(ids)
    )
    strata = list(zip(prompts, success, modes))  # held out per task, outcome and failure mode
    held_out = split_episodes(ids, success, cfg.train.val_ratio, cfg.train.seed, strata)
    held_out -= set(short)
    usable = [s is not False or not cfg.train.only_successful for s in success]
    train = [e for e, ok in zip(ids, usable) if ok and e not in held_out and e not in short]
    val = sorted(held_out)
    if not train:
        raise ShardError("no training episodes (all held out, or none successful)")
    if not any(s is not False for e, s in zip(ids, success) if e in held_out):
        raise ShardError(
            f"the validation split ({len(val)} episodes, val_ratio={cfg.train.val_ratio}) "
            "holds no successful episode; raise train.val_ratio or add episodes"
        )
    return EpisodeSplit(train, val, sum(frames[e] for e in train), frames)


def assign_episodes(ids: list[str], frames: dict[str, int], world: int) -> list[list[str]]:
    """Whole episodes to ranks, longest first to the least-loaded rank: deterministic and
    balanced by frames, so every rank's windows come from a similar amount of data."""
    ranks: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for episode in sorted(ids, key=lambda e: (-frames[e], e)):
        r = loads.index(min(loads))
        ranks[r].append(episode)
        loads[r] += frames[episode]
    return [sorted(r) for r in ranks]


def task_table(index: pa.Table) -> tuple[list[str], np.ndarray]:
    """Distinct prompts and their language embeddings (one small vector per episode)."""
    first = task_vectors(index)
    tasks = sorted(first)
    return tasks, np.array([first[t] for t in tasks], dtype=np.float32).reshape(len(tasks), -1)


def _check_dims(reader: EpisodeReader, split: EpisodeSplit) -> None:
    """The shortest training episode's frame vectors must be num_frames x the manifest's
    frame dim (``visual_dim``, or the frame layout's with several cameras or a state): a
    cheap look before any worker starts; every rank checks its own episodes."""
    episode = min(split.train, key=lambda e: (split.frames[e], e))
    table = reader.read([episode], ["episode_id", "num_frames", "visual_embedding"])
    size = pc.list_value_length(table.column("visual_embedding"))[0].as_py()
    dim = reader.layout.dim
    if size != split.frames[episode] * dim:
        raise ShardError(
            f"{reader.path}: episode {episode}'s visual_embedding holds {size} values, not "
            f"num_frames x {dim} (the manifest's visual_dim / frame_layout)"
        )


def _check_resources(cfg: Config, num_train_episodes: int) -> None:
    tcfg = cfg.train
    if tcfg.num_workers > num_train_episodes:
        raise UserError(
            f"train.num_workers={tcfg.num_workers} but only {num_train_episodes} training "
            "episodes: every worker needs at least one"
        )
    need = _workers_need(tcfg)
    if not _shortfall(need, ray.cluster_resources()):
        return
    if tcfg.wait_for_resources_s <= 0:
        raise UserError(
            f"train.num_workers={tcfg.num_workers} needs {_describe(need)} but the cluster "
            f"has {_describe(_have(need))}; lower num_workers or cpus_per_worker, or, on an "
            "autoscaling cluster, set train.wait_for_resources_s to wait for its new nodes"
        )
    _wait_for_autoscaler(tcfg, need)


def _workers_need(tcfg: TrainConfig) -> dict[str, float]:
    need = {"CPU": tcfg.num_workers * tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        need["GPU"] = float(tcfg.num_workers)
    return need


def _shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {key: amount for key, amount in need.items() if have.get(key, 0.0) < amount}


def _have(need: dict[str, float]) -> dict[str, float]:
    total = ray.cluster_resources()
    return {key: total.get(key, 0.0) for key in need}


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {key}" for key, amount in resources.items())


def _wait_for_autoscaler(tcfg: TrainConfig, need: dict[str, float]) -> None:
    """Ask the autoscaler for the workers' resources and wait until the cluster holds them.

    For a train-only job on a cluster whose GPU nodes were scaled down (to 0 when idle in
    cluster.yaml): the autoscaler can add them, but the check above would fail first."""
    bundle = {key: amount / tcfg.num_workers for key, amount in need.items()}
    autoscaler.request_resources(bundles=[bundle] * tcfg.num_workers)
    logger.info(
        "the cluster has %s of the %s the workers need; asked the autoscaler for the rest, "
        "waiting up to %.0f s (train.wait_for_resources_s)",
        _describe(_have(need)),
        _describe(need),
        tcfg.wait_for_resources_s,
    )
    deadline = time.monotonic() + tcfg.wait_for_resources_s
    try:
        while _shortfall(need, ray.cluster_resources()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"train.num_workers={tcfg.num_workers} needs {_describe(need)}; after "
                    f"{tcfg.wait_for_resources_s:g} s the cluster has {_describe(_have(need))} "
                    "(check the autoscaler: `ray status`, node types and max_workers)"
                )
            time.sleep(_RESOURCE_POLL_S)
    finally:
        # The request persists until replaced: withdraw it, so the nodes can scale down
        # once training ends (until then the workers' own demand keeps them).
        autoscaler.request_resources(bundles=[])
    logger.info("the cluster now has %s", _describe(_have(need)))


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str
    latest_checkpoint: str
    metrics: dict[str, Any]


def train_columns(cfg: Config) -> list[str]:
    sarm = cfg.model.num_stages > 0
    return schema.TRAIN_COLUMNS + (schema.STAGE_COLUMNS if sarm else [])


def _stage_split(
    cfg: Config, manifest: dict, split: EpisodeSplit
) -> tuple[EpisodeSplit, list[float]]:
    """SARM: the split with only annotated training episodes, and failures (their frames
    train the success head and the ranking loss, never the stage heads); and the stage
    priors of the annotated training episodes."""
    k = cfg.model.num_stages
    if manifest.get("num_stages") != k:
        raise ShardError(
            f"{cfg.train.embeddings}: model.num_stages={k} but the shards hold "
            f"{manifest.get('num_stages', 'no')} annotated stages (run `rayrm annotate`)"
        )
    table = EpisodeReader(cfg.train.embeddings, manifest).index()
    ids = table.column("episode_id").to_pylist()
    stages = dict(zip(ids, table.column("stage").to_pylist()))
    annotated = {e for e, labels in stages.items() if len(labels) == split.frames[e]}
    failed = {e for e, s in zip(ids, table.column("success").to_pylist()) if s is False}
    labelled_train = [e for e in split.train if e in annotated and e not in failed]
    if not labelled_train:
        raise ShardError("no annotated training episode: SARM training needs stage labels")
    if not annotated.intersection(split.val):
        raise ShardError("no annotated held-out episode to validate stage predictions on")
    train = [e for e in split.train if e in annotated or e in failed]
    kept = dataclasses.replace(split, train=train, train_frames=sum(split.frames[e] for e in train))
    priors = stage_priors([stages[e] for e in labelled_train], k, cfg.train.stage_prior)
    return kept, priors.tolist()


@dataclass
class CheckedInputs:
    """What the driver's checks found: the shards, the split, the task table and (SARM) the
    stage priors."""

    reader: EpisodeReader
    split: EpisodeSplit
    tasks: list[str]
    task_language: np.ndarray
    stage_prior: list[float] | None


def _check_inputs(cfg: Config) -> CheckedInputs:
    """Everything that can be wrong with the inputs, checked before any worker starts."""
    tcfg = cfg.train
    storage.check_writable(tcfg.output, "train.output")
    reader = EpisodeReader(tcfg.embeddings)
    columns = pa.schema([pa.field(c, pa.null()) for c in reader.columns()])
    check_columns(columns, train_columns(cfg), tcfg.embeddings)
    split = make_split(cfg, reader.index())
    stage_prior = None
    if cfg.model.num_stages > 0:
        split, stage_prior = _stage_split(cfg, reader.manifest, split)
    tasks, task_language = task_table(reader.index())
    if tcfg.mismatch_prob > 0 and len(tasks) < 2:
        raise UserError("train.mismatch_prob > 0 needs episodes of at least 2 distinct prompts")
    check_trackers(tcfg.loggers)
    _check_resources(cfg, len(split.train))
    _check_dims(reader, split)
    return CheckedInputs(reader, split, tasks, task_language, stage_prior)


def log_failure_use(
    tcfg: TrainConfig, split: EpisodeSplit, success: dict[str, bool | None]
) -> None:
    """Say what the failed training episodes are used for, or that there are none."""
    failures = sum(success[e] is False for e in split.train)
    if tcfg.only_successful:
        logger.info("train.only_successful: failed episodes are left out of training")
    elif failures == 0:
        logger.info(
            "no failed training episode: the success head learns done / not yet done from the "
            "successes alone, and the ranking loss is off (it needs failures)"
        )
    else:
        pairs = "in proportion to them" if tcfg.rank_pairs is None else tcfg.rank_pairs
        logger.info(
            "%d failed training episode(s): success head (weight %g) and ranking loss (weight "
            "%g, pairs per step: %s); no progress target on them",
            failures,
            tcfg.success_weight,
            tcfg.rank_weight,
            pairs,
        )


def run_train(cfg: Config) -> TrainResult:
    tcfg = cfg.train
    checked = _check_inputs(cfg)
    reader, split, manifest = checked.reader, checked.split, checked.reader.manifest
    total_steps, val_every = steps_for(tcfg, split.train_frames)
    storage_path = storage.absolute(tcfg.output)
    run_dir = storage.join(storage_path, tcfg.run_name)
    logger.info(
        "training on %d episodes (%d frames), validating on %d; %d steps, batch %d, %d worker(s)",
        len(split.train),
        split.train_frames,
        len(split.val),
        total_steps,
        tcfg.batch_size,
        tcfg.num_workers,
    )
    index = reader.index()
    success = dict(zip(index.column("episode_id").to_pylist(), index.column("success").to_pylist()))
    log_failure_use(tcfg, split, success)
    meta = {
        "embeddings": reader.path,
        "backbone": manifest["backbone"],
        # the cameras and state each frame vector holds: what raw input must be embedded from
        "frame_layout": schema.FrameLayout.from_manifest(manifest).to_dict(),
        "stage_names": manifest.get("stage_names"),
        "split": {"val_ratio": tcfg.val_ratio, "seed": tcfg.seed, "val_episodes": split.val},
    }
    plan = WorkerPlan(
        train=tcfg,
        model=cfg.model,
        total_steps=total_steps,
        val_every=val_every,
        log_level=cfg.log_level,
        embeddings=reader.path,
        manifest=manifest,
        columns=train_columns(cfg),
        rank_episodes=assign_episodes(split.train, split.frames, tcfg.num_workers),
        val_episodes=split.val,
        tasks=checked.tasks,
        task_language=checked.task_language,
        run_dir=run_dir,
        stage_prior=checked.stage_prior,
        meta=meta,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={PLAN_KEY: plan},
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
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.num_to_keep or None,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
    )
    result = trainer.fit()
    return _write_result(run_dir, result)


def _write_result(run_dir: str, result) -> TrainResult:
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training in {run_dir} produced no checkpoint")
    out = TrainResult(
        run_dir=run_dir,
        # Ray gives paths within the storage's file system ("bucket/key" on S3): as URLs
        best_checkpoint=storage.as_url(run_dir, best.path),
        latest_checkpoint=storage.as_url(run_dir, result.checkpoint.path),
        metrics=dict(result.metrics or {}),
    )
    storage.write_json(storage.join(run_dir, RESULT_FILE), vars(out))
    logger.info("best checkpoint %s (metrics %s)", out.best_checkpoint, out.metrics)
    return out


def steps_for(cfg: TrainConfig, train_frames: int) -> tuple[int, int]:
    """(total steps, steps between validations). An epoch = as many windows as frames."""
    steps_per_epoch = max(1, math.ceil(train_frames / cfg.batch_size))
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
    val_every = cfg.val_every if cfg.val_every > 0 else 10 * steps_per_epoch
    return total, max(1, min(val_every, total))
