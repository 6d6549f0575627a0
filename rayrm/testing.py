"""Helpers for tests and benchmarks: checkpoints of randomly initialised models.

Random weights give rewards that move with the frames, which is all the serving and scoring
machinery needs; nothing here is for producing a useful model.
"""

from __future__ import annotations

import dataclasses

import torch

from rayrm.config import BackboneConfig, ModelConfig, TrainConfig, to_dict
from rayrm.train.checkpoint import save_checkpoint
from rayrm.train.model import RewardTransformer

SMALL_MODEL = ModelConfig(
    d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=8, dropout=0.0
)


def random_checkpoint(
    path: str,
    backbone: BackboneConfig | None = None,
    model: ModelConfig = SMALL_MODEL,
    num_stages: int = 0,
    seed: int = 0,
) -> str:
    """A checkpoint folder at ``path`` over ``backbone`` (default: the tiny backbone, 32-dim
    frames and 16-dim prompts) that ``load_model`` and ``RewardScorer`` read like a trained one.
    """
    backbone = backbone or BackboneConfig(name="tiny", visual_dim=32, language_dim=16)
    if backbone.name != "tiny":
        raise ValueError("random_checkpoint builds dims for the tiny backbone only")
    torch.manual_seed(seed)
    cfg = dataclasses.replace(model, num_stages=num_stages)
    net = RewardTransformer(cfg, backbone.visual_dim, backbone.language_dim)
    if num_stages:
        net.set_stage_priors(torch.full((num_stages,), 1.0 / num_stages))
    meta = {
        "train": to_dict(TrainConfig()),
        "backbone": to_dict(backbone),
        "stage_names": [f"stage {k}" for k in range(num_stages)] if num_stages else None,
    }
    save_checkpoint(path, net.eval(), meta)
    return path
