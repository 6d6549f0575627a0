"""Checkpoints for evaluation tests, made without training (random weights, real format)."""

from __future__ import annotations

import dataclasses
import os

import torch

from rayrm.config import ModelConfig, to_dict
from rayrm.data.schema import FrameLayout
from rayrm.data.shards import read_episode_index, read_manifest
from rayrm.train.checkpoint import save_checkpoint
from rayrm.train.model import RewardTransformer

STAGE_NAMES = ["reach", "grasp", "move", "place"]


def make_checkpoint(
    cfg, path, num_stages: int = 0, blind: bool = False, seed: int = 0, val_ids=None
) -> str:
    """A checkpoint of a randomly initialised model over ``cfg``'s embeddings.

    Its "held-out" episodes are ``val_ids`` (default: every episode), so ``split: val`` scores
    them. Random weights give curves that move, which is all the machinery tests need."""
    manifest = read_manifest(cfg.embed.output)
    layout = FrameLayout.from_manifest(manifest)  # one camera, or several and the state
    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(cfg.model, num_stages=num_stages, dropout=0.0)
    model = RewardTransformer(
        model_cfg, layout.dim, manifest["language_dim"], list(layout.view_dims), layout.state_dim
    )
    if num_stages:
        model.set_stage_priors(torch.tensor([0.2, 0.3, 0.3, 0.2][:num_stages]))
    if val_ids is None:
        val_ids = read_episode_index(cfg.embed.output).column("episode_id").to_pylist()
    meta = {
        "train": to_dict(dataclasses.replace(cfg.train, blind=blind)),
        "embeddings": os.path.abspath(cfg.embed.output),
        "backbone": manifest["backbone"],
        "frame_layout": layout.to_dict(),
        "stage_names": STAGE_NAMES[:num_stages] if num_stages else None,
        "split": {"val_ratio": 0.5, "seed": 0, "val_episodes": sorted(val_ids)},
    }
    save_checkpoint(str(path), model.eval(), meta)
    return str(path)


def small_model_config() -> ModelConfig:
    return ModelConfig(
        d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=8
    )
