"""The episodes a checkpoint is scored on, as whole episode rows: from embedding shards, or
raw episodes (HDF5 or a LeRobot v3 root) embedded on the fly through the checkpoint's
backbone (``rayrm.embed``'s pipeline, nothing written). ``rayrm evaluate`` and ``rayrm score``
read their episodes through these functions."""

from __future__ import annotations

import dataclasses
import logging

import ray

from rayrm.config import BackboneConfig, Config, from_dict
from rayrm.data import schema, storage
from rayrm.data.hdf5 import EpisodeInfo, InvalidEpisodesError
from rayrm.data.shards import (
    EpisodeReader,
    episode_dataset,
    read_episode_index,
    read_manifest,
    task_vectors,
)
from rayrm.data.sources import scan_raw_input
from rayrm.embed import PromptVectors, PromptVectorsTask, episode_rows_dataset
from rayrm.errors import UserError

logger = logging.getLogger(__name__)


def episode_ids(cfg: Config, checkpoint_config: dict) -> list[str] | None:
    """Episodes to score; None = every episode of the raw input."""
    split = cfg.evaluate.split
    if split == "val":
        return checkpoint_config["split"]["val_episodes"]
    if split != "all":
        raise UserError(f"evaluate.split must be 'val' or 'all', got {split!r}")
    if cfg.evaluate.input:
        return None
    return read_episode_index(cfg.evaluate.embeddings).column("episode_id").to_pylist()


# --------------------------------------------------------------------------- shards


def shard_episode_dataset(embeddings: str, ids: list[str]) -> ray.data.Dataset:
    """Whole episode rows of ``ids`` from embedding shards, with the columns scoring needs."""
    present = EpisodeReader(embeddings).columns()
    optional = ("source_file", "failure_mode", *schema.STAGE_COLUMNS)
    extra = [c for c in optional if c in present]
    return episode_dataset(embeddings, ids, columns=schema.TRAIN_COLUMNS + extra)


def shard_task_vectors(embeddings: str, ids: list[str] | None) -> dict[str, list[float]]:
    """prompt -> language vector of each task among the episodes ``ids`` of the shards."""
    return task_vectors(EpisodeReader(embeddings).index(), ids)


# --------------------------------------------------------------------------- raw input


def _checkpoint_camera(checkpoint_config: dict) -> str:
    """The camera the checkpoint's embeddings were made from, when their manifest is around."""
    embeddings = checkpoint_config.get("embeddings")
    if embeddings and storage.exists(storage.join(embeddings, schema.MANIFEST_NAME)):
        return read_manifest(embeddings).get("camera", "side_cam")
    return "side_cam"


def source_camera(cfg: Config, checkpoint_config: dict) -> str:
    """The camera to embed raw input from and to show in videos: ``evaluate.camera``, else
    the one the evaluated (or, for raw input, the checkpoint's) embeddings were made from."""
    if cfg.evaluate.camera:
        return cfg.evaluate.camera
    if cfg.evaluate.input:
        return _checkpoint_camera(checkpoint_config)
    return read_manifest(cfg.evaluate.embeddings).get("camera", "side_cam")


def raw_sources(cfg: Config, checkpoint_config: dict) -> tuple[list[str], str | None]:
    """(cameras, state) to embed raw input from: a checkpoint that fuses several cameras or
    the robot state needs every one of them, in its order (``evaluate.camera`` then only
    picks the camera the videos show); otherwise the one camera of :func:`source_camera`."""
    if "frame_layout" in checkpoint_config:
        layout = schema.FrameLayout.from_manifest(checkpoint_config)
        if not layout.single_camera:
            return list(layout.cameras), layout.state_key
    return [source_camera(cfg, checkpoint_config)], None


def scan_raw_episodes(
    cfg: Config, checkpoint_config: dict, ids: list[str] | None
) -> list[EpisodeInfo]:
    """The episodes of ``evaluate.input`` (only ``ids`` when given), from the cameras (and
    state) the checkpoint was trained on (:func:`raw_sources`)."""
    ecfg = cfg.evaluate
    cameras, state = raw_sources(cfg, checkpoint_config)
    # a LeRobot root's success flags: the column the embeddings were made with (embed section)
    success_column = cfg.embed.success_column
    episodes, problems = scan_raw_input(ecfg.input, cameras, ecfg.prompt, success_column, state)
    if problems:
        raise InvalidEpisodesError(problems)
    if ids is not None:
        episodes = [e for e in episodes if e.episode_id in set(ids)]
        if not episodes:
            raise UserError(
                f"none of the checkpoint's held-out episodes is in {ecfg.input}; "
                "use --evaluate.split all to score every episode there"
            )
    return episodes


def raw_episode_dataset(
    cfg: Config, checkpoint_config: dict, episodes: list[EpisodeInfo]
) -> tuple[ray.data.Dataset, dict]:
    """Raw ``episodes`` through the checkpoint's backbone as whole episode rows, and the
    prompt vectors of their tasks."""
    embed_cfg = _checkpoint_embed_config(cfg, checkpoint_config)
    prompts = PromptVectorsTask(embed_cfg, episodes).get()
    _check_dims(embed_cfg.backbone, prompts, checkpoint_config)
    state = embed_cfg.embed.state
    logger.info(
        "embedding %d raw episodes on the fly (camera %s%s)",
        len(episodes),
        ", ".join(embed_cfg.embed.views()),
        f", state {state}" if state else "",
    )
    return episode_rows_dataset(embed_cfg, episodes, prompts.vectors), prompts.vectors


def _checkpoint_embed_config(cfg: Config, checkpoint_config: dict) -> Config:
    """``cfg`` with the checkpoint's backbone, and the cameras and state it was trained on."""
    backbone = from_dict(BackboneConfig, checkpoint_config["backbone"])
    cameras, state = raw_sources(cfg, checkpoint_config)
    embed = dataclasses.replace(
        cfg.embed,
        camera=cameras[0],
        cameras=cameras if len(cameras) > 1 else [],
        camera_as_episode=False,
        state=state,
    )
    return dataclasses.replace(cfg, backbone=backbone, embed=embed)


def _check_dims(backbone: BackboneConfig, prompts: PromptVectors, checkpoint_config: dict):
    view_dims = checkpoint_config.get("view_dims") or [checkpoint_config["visual_dim"]]
    expected = (view_dims[0], checkpoint_config["language_dim"])
    found = (prompts.visual_dim, prompts.language_dim)
    if found != tuple(expected):
        raise UserError(
            f"backbone '{backbone.name}' gives dims {found}, the checkpoint expects "
            f"{tuple(expected)}"
        )
