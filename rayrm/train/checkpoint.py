"""Checkpoints that load without unpickling code.

A checkpoint folder holds:

==================  ===============================================================
file                content
==================  ===============================================================
model.safetensors   model weights and input-normalisation buffers
config.json         model config, embedding dims (``view_dims``, ``state_dim``: the frame
                    vector's cameras and state), the training config, step, metrics
train_state.pt      optimizer and scheduler state (tensors and numbers only; loaded
                    with ``torch.load(weights_only=True)``)
==================  ===============================================================
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load as load_weights
from safetensors.torch import save_file

from rayrm.config import ModelConfig, from_dict
from rayrm.data import storage
from rayrm.train.model import RewardTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
RESULT_FILE = "rayrm_result.json"  # written next to a run's checkpoints when it finishes


def save_checkpoint(
    path: str,
    model: RewardTransformer,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> None:
    """``meta`` must be JSON-serialisable: it holds the train config, step and metrics."""
    reserved = sorted({"model", "visual_dim", "language_dim", "view_dims", "state_dim"} & set(meta))
    if reserved:  # they would silently replace what load_model rebuilds the model from
        raise ValueError(f"checkpoint meta must not set {reserved}: they describe the model")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS))
    config = {
        "model": vars(model.cfg).copy(),
        "visual_dim": model.visual_dim,
        "language_dim": model.language_dim,
        "view_dims": list(model.view_dims),  # the frame vector's cameras, then the state
        "state_dim": model.state_dim,
        **meta,
    }
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    if optimizer is not None:
        train_state = {"optimizer": optimizer.state_dict(), "step": meta.get("step", 0)}
        if scheduler is not None:
            train_state["scheduler"] = scheduler.state_dict()
        torch.save(train_state, os.path.join(path, TRAIN_STATE))


def find_checkpoint(train_output: str, run_name: str) -> str:
    """The best checkpoint of a finished run, for evaluate and serve when no path is given."""
    run_dir = storage.join(storage.absolute(train_output), run_name)
    path = storage.join(run_dir, RESULT_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"no finished training run at {run_dir}")
    return storage.read_json(path)["best_checkpoint"]


def read_checkpoint_config(path: str) -> dict[str, Any]:
    """A checkpoint's ``config.json`` (local path or URL)."""
    config_path = storage.join(path, CONFIG)
    if not storage.exists(config_path):
        raise FileNotFoundError(f"{path}: not a rayrm checkpoint (no {CONFIG})")
    return storage.read_json(config_path)


def load_model(path: str, device: torch.device | str = "cpu") -> tuple[RewardTransformer, dict]:
    """Rebuild the model from ``config.json`` and load its safetensors weights (strict)."""
    config = read_checkpoint_config(path)
    # Checkpoints written before the success head existed have no such setting and no head.
    model_settings = {"success_head": False, **config["model"]}
    model = RewardTransformer(
        from_dict(ModelConfig, model_settings),
        config["visual_dim"],
        config["language_dim"],
        view_dims=config.get("view_dims"),  # absent in single-camera checkpoints made before
        state_dim=config.get("state_dim", 0),
    )
    model.load_state_dict(load_weights(storage.read_bytes(storage.join(path, WEIGHTS))))
    return model.to(device).eval(), config


def load_train_state(path: str) -> dict[str, Any] | None:
    state_path = os.path.join(path, TRAIN_STATE)
    if not os.path.exists(state_path):
        return None
    return torch.load(state_path, map_location="cpu", weights_only=True)
