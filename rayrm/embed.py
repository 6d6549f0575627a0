"""Embedding on Ray Data: raw HDF5 episodes in, Parquet episode shards out.

::

    HDF5EpisodeDatasource (read tasks, frame chunks)
      -> map_batches(FrameEmbedder, actor pool; GPUs when configured)
      -> groupby(episode_id, ~episodes/episodes_per_shard partitions)
         .map_groups(assemble_episode)                       # one row per episode
      -> write_parquet(<output>.partial-*/shards) -> manifest.json -> rename to <output>

Prompts are embedded once per distinct prompt (a single remote task), not once per frame.
Every input episode is checked before any frame is read; any problem aborts the run with one
line per problem and nothing written. The output folder appears only when complete (written
under a temporary name, then renamed), so a reader never sees a half-written embedding set;
``embed.overwrite`` moves the old output aside and deletes it only once the new one is in.

Run: ``rayrm embed --config configs/demo.yaml`` (or ``jobs/embed.py`` on a cluster).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from rayrm.backbones import build_backbone
from rayrm.backbones.base import backbone_class
from rayrm.config import BackboneConfig, Config
from rayrm.data import schema
from rayrm.data.hdf5 import (
    EpisodeInfo,
    HDF5EpisodeDatasource,
    InvalidEpisodesError,
    list_hdf5_files,
    scan_episodes,
)

logger = logging.getLogger(__name__)


class FrameEmbedder:
    """Ray Data callable class: loads the backbone once per actor, then embeds batches.

    A batch may hold frames of several episodes, and episodes may differ in image size: Ray
    Data then hands over an object array of per-frame arrays, which is embedded one image
    size at a time (the backbone resizes, so sizes need not match across calls).
    """

    def __init__(self, backbone_cfg: BackboneConfig):
        self.backbone = build_backbone(backbone_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames, prompts = batch["frame"], list(batch["prompt"])
        if frames.dtype == object:
            visual = self._embed_by_shape(frames, prompts)
        else:
            visual = self._embed(frames, prompts)
        return {
            "episode_id": batch["episode_id"],
            "frame_index": batch["frame_index"],
            "visual_embedding": visual,
        }

    def _embed(self, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
        visual = np.asarray(self.backbone.embed_frames(frames, prompts), dtype=np.float32)
        expected = (len(frames), self.backbone.visual_dim)
        if visual.shape != expected:
            name = self.backbone.cfg.name
            raise RuntimeError(f"backbone '{name}' returned {visual.shape}, expected {expected}")
        return visual

    def _embed_by_shape(self, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
        visual = np.empty((len(frames), self.backbone.visual_dim), dtype=np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(np.shape(frame), []).append(i)
        for rows in by_shape.values():
            stacked = np.stack([frames[i] for i in rows])
            visual[rows] = self._embed(stacked, [prompts[i] for i in rows])
        return visual


def embed_prompts(backbone_cfg: BackboneConfig, prompts: list[str]) -> dict[str, np.ndarray]:
    """Runs inside a Ray task so a GPU backbone never loads on the driver."""
    vectors = build_backbone(backbone_cfg).embed_prompts(prompts)
    return dict(zip(prompts, vectors))


def describe_backbone(
    backbone_cfg: BackboneConfig, prompts: list[str]
) -> tuple[dict[str, np.ndarray], int, int]:
    """Prompt vectors and the backbone's (visual_dim, language_dim), from one model load.

    Runs inside a Ray task (like :func:`embed_prompts`) so a GPU backbone never loads on the
    driver; the dims go into the manifest without reading the written shards back."""
    backbone = build_backbone(backbone_cfg)
    vectors = np.asarray(backbone.embed_prompts(prompts), dtype=np.float32)
    if vectors.shape != (len(prompts), backbone.language_dim):
        raise RuntimeError(
            f"backbone '{backbone_cfg.name}' returned prompt embeddings of shape "
            f"{vectors.shape}, expected {(len(prompts), backbone.language_dim)}"
        )
    return dict(zip(prompts, vectors)), int(backbone.visual_dim), int(backbone.language_dim)


def assemble_episode(
    frames: dict[str, np.ndarray],
    episodes: dict[str, EpisodeInfo],
    language: dict[str, np.ndarray],
) -> pa.Table:
    """All frame rows of one episode -> one row of ``schema.EPISODE_SCHEMA``."""
    info = episodes[str(frames["episode_id"][0])]
    order = np.argsort(frames["frame_index"], kind="stable")
    if not np.array_equal(frames["frame_index"][order], np.arange(info.num_frames)):
        raise RuntimeError(f"episode {info.episode_id}: frames missing or repeated")
    visual = np.asarray(frames["visual_embedding"], dtype=np.float32)[order]
    if not np.isfinite(visual).all():
        bad = int(np.flatnonzero(~np.isfinite(visual).all(axis=1))[0])
        raise FloatingPointError(
            f"episode {info.episode_id} ({info.source_file}): non-finite visual embedding at "
            f"frame {bad}"
        )
    progress = (np.arange(info.num_frames, dtype=np.float32) + 1) / info.num_frames
    row = {
        "episode_id": [info.episode_id],
        "source_file": [info.source_file],
        "num_frames": [info.num_frames],
        "prompt": [info.prompt],
        "success": [info.success],
        "stage_boundaries": [list(info.stage_boundaries)],
        "visual_embedding": [visual.ravel()],
        "language_embedding": [language[info.prompt]],
        "progress": [progress],
    }
    return pa.Table.from_pydict(row, schema=schema.EPISODE_SCHEMA)


@dataclass
class EmbedResult:
    output: str
    num_episodes: int
    num_frames: int
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / max(self.seconds, 1e-9)


def _scan_inputs(cfg: Config) -> list[EpisodeInfo]:
    files = list_hdf5_files(cfg.embed.input)
    episodes, problems = scan_episodes(files, cfg.embed.camera, cfg.embed.prompt)
    if problems:
        raise InvalidEpisodesError(problems)
    logger.info(
        "embedding %d episodes (%d frames) from %d file(s) with backbone '%s'",
        len(episodes),
        sum(e.num_frames for e in episodes),
        len(files),
        cfg.backbone.name,
    )
    return episodes


def _prepare_output(output: str, overwrite: bool) -> str:
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass --embed.overwrite true to replace it")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return _sibling(output, "partial")


def _sibling(output: str, tag: str) -> str:
    """A unique hidden folder next to ``output`` (same file system, so renames are atomic)."""
    parent = os.path.dirname(os.path.abspath(output))
    return os.path.join(parent, f".{os.path.basename(output)}.{tag}-{uuid.uuid4().hex[:8]}")


def _publish(partial: str, output: str) -> None:
    """Move the finished ``partial`` folder to ``output``, replacing an old one.

    The old output is renamed aside first and deleted only once the new one is in place, so
    a failure in between leaves the old output where it was."""
    if not os.path.exists(output):
        os.replace(partial, output)
        return
    old = _sibling(output, "old")
    os.replace(output, old)
    try:
        os.replace(partial, output)
    except BaseException:
        os.replace(old, output)
        raise
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def _shuffle_partitions(num_episodes: int, episodes_per_shard: int) -> int:
    """Hash partitions for regrouping frames into episodes: about one shard file each.

    Ray's default (200) starts up to 128 aggregator actors, which on a small cluster costs
    far more than embedding a small dataset, and writes up to 200 tiny files."""
    return max(1, math.ceil(num_episodes / max(1, episodes_per_shard)))


def build_dataset(cfg: Config, episodes: list[EpisodeInfo], language: dict[str, np.ndarray]):
    ecfg = cfg.embed
    frames = ray.data.read_datasource(
        HDF5EpisodeDatasource(episodes, ecfg.camera, ecfg.frames_per_block)
    )
    embedded = frames.map_batches(
        FrameEmbedder,
        fn_constructor_kwargs={"backbone_cfg": cfg.backbone},
        batch_size=ecfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ecfg.num_actors),
        num_gpus=ecfg.num_gpus_per_actor,
        num_cpus=ecfg.num_cpus_per_actor,
    )
    by_id = {e.episode_id: e for e in episodes}
    groups = _shuffle_partitions(len(episodes), ecfg.episodes_per_shard)
    return embedded.groupby("episode_id", num_partitions=groups).map_groups(
        assemble_episode,
        fn_kwargs={"episodes": by_id, "language": language},
        batch_format="numpy",
    )


def _write_manifest(path: str, cfg: Config, episodes: list[EpisodeInfo], dims: dict) -> None:
    manifest: dict[str, Any] = {
        "format": "rayrm.embeddings/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": asdict(cfg.backbone),
        "camera": cfg.embed.camera,
        **dims,
        "num_episodes": len(episodes),
        "num_frames": sum(e.num_frames for e in episodes),
        "input_files": sorted({e.source_file for e in episodes}),
        "shards": sorted(os.listdir(os.path.join(path, schema.SHARDS_DIR))),
    }
    with open(os.path.join(path, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2)


def _check_written(path: str, episodes: list[EpisodeInfo]) -> None:
    """Every input episode written exactly once (reads only the id column back)."""
    ids = pq.read_table(os.path.join(path, schema.SHARDS_DIR), columns=["episode_id"])
    written = ids.column("episode_id").to_pylist()
    expected = sorted(e.episode_id for e in episodes)
    if sorted(written) != expected:
        missing = sorted(set(expected) - set(written))[:5]
        raise RuntimeError(
            f"wrote {len(written)} episode rows ({len(set(written))} distinct), expected "
            f"{len(expected)}; missing e.g. {missing}"
        )


def run_embed(cfg: Config) -> EmbedResult:
    """Embed ``cfg.embed.input`` into ``cfg.embed.output`` (both already resolved)."""
    start = time.perf_counter()
    ecfg = cfg.embed
    backbone_class(cfg.backbone.name)  # an unknown name fails here, before any work
    episodes = _scan_inputs(cfg)
    partial = _prepare_output(ecfg.output, ecfg.overwrite)
    try:
        prompts = sorted({e.prompt for e in episodes})
        prompt_task = ray.remote(describe_backbone).options(
            num_gpus=ecfg.num_gpus_per_actor, num_cpus=ecfg.num_cpus_per_actor
        )
        language, visual_dim, language_dim = ray.get(prompt_task.remote(cfg.backbone, prompts))
        dataset = build_dataset(cfg, episodes, language)
        dataset.write_parquet(
            os.path.join(partial, schema.SHARDS_DIR), min_rows_per_file=ecfg.episodes_per_shard
        )
        _check_written(partial, episodes)
        dims = {"visual_dim": visual_dim, "language_dim": language_dim}
        _write_manifest(partial, cfg, episodes, dims)
        _publish(partial, ecfg.output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - start
    result = EmbedResult(ecfg.output, len(episodes), sum(e.num_frames for e in episodes), seconds)
    logger.info(
        "wrote %d episodes (%d frames) to %s in %.1f s (%.0f frames/s)",
        result.num_episodes,
        result.num_frames,
        result.output,
        seconds,
        result.frames_per_second,
    )
    return result
