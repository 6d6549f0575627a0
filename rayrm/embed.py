"""Embedding on Ray Data: raw HDF5 episodes in, Parquet episode shards out.

::

    HDF5EpisodeDatasource (read tasks, frame chunks)
      -> map_batches(FrameEmbedder, actor pool; GPUs when configured)
      -> groupby(episode_id).map_groups(assemble_episode)   # one row per episode
      -> write_parquet(<output>.partial-*/shards) -> manifest.json -> rename to <output>

Prompts are embedded once per distinct prompt (a single remote task), not once per frame.
Every input episode is checked before any frame is read; any problem aborts the run with one
line per problem and nothing written. The output folder appears only when complete (written
under a temporary name, then renamed), so a reader never sees a half-written embedding set.

Run: ``rayrm embed --config configs/demo.yaml`` (or ``jobs/embed.py`` on a cluster).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
    """Ray Data callable class: loads the backbone once per actor, then embeds batches."""

    def __init__(self, backbone_cfg: BackboneConfig):
        self.backbone = build_backbone(backbone_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        visual = self.backbone.embed_frames(batch["frame"], list(batch["prompt"]))
        return {
            "episode_id": batch["episode_id"],
            "frame_index": batch["frame_index"],
            "visual_embedding": visual,
        }


def embed_prompts(backbone_cfg: BackboneConfig, prompts: list[str]) -> dict[str, np.ndarray]:
    """Runs inside a Ray task so a GPU backbone never loads on the driver."""
    vectors = build_backbone(backbone_cfg).embed_prompts(prompts)
    return dict(zip(prompts, vectors))


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
    return os.path.join(parent, f".{os.path.basename(output)}.partial-{uuid.uuid4().hex[:8]}")


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
    return embedded.groupby("episode_id").map_groups(
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


def run_embed(cfg: Config) -> EmbedResult:
    """Embed ``cfg.embed.input`` into ``cfg.embed.output`` (both already resolved)."""
    start = time.perf_counter()
    ecfg = cfg.embed
    backbone_class(cfg.backbone.name)  # an unknown name fails here, before any work
    episodes = _scan_inputs(cfg)
    partial = _prepare_output(ecfg.output, ecfg.overwrite)
    try:
        prompts = sorted({e.prompt for e in episodes})
        prompt_task = ray.remote(embed_prompts).options(
            num_gpus=ecfg.num_gpus_per_actor, num_cpus=ecfg.num_cpus_per_actor
        )
        language = ray.get(prompt_task.remote(cfg.backbone, prompts))
        dataset = build_dataset(cfg, episodes, language)
        dataset.write_parquet(
            os.path.join(partial, schema.SHARDS_DIR), min_rows_per_file=ecfg.episodes_per_shard
        )
        written = pq.read_table(
            os.path.join(partial, schema.SHARDS_DIR), columns=["visual_embedding"]
        )
        if written.num_rows != len(episodes):
            raise RuntimeError(f"wrote {written.num_rows} episodes, expected {len(episodes)}")
        sizes = pc.list_value_length(written.column("visual_embedding"))
        visual_dim = int(pc.sum(sizes).as_py()) // sum(e.num_frames for e in episodes)
        language_dim = len(next(iter(language.values())))
        dims = {"visual_dim": visual_dim, "language_dim": language_dim}
        _write_manifest(partial, cfg, episodes, dims)
        if os.path.exists(ecfg.output):
            shutil.rmtree(ecfg.output)
        os.replace(partial, ecfg.output)
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
