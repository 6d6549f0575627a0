"""Ray Train: DDP on two workers, checkpoints, and evaluation of the result."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rayrm.data.shards import ShardError
from rayrm.evaluate.run import run_evaluate
from rayrm.train.checkpoint import load_model
from rayrm.train.trainer import run_train


def with_train(cfg, tmp_path, **changes):
    train = dataclasses.replace(cfg.train, output=str(tmp_path / "train"), **changes)
    evaluate = dataclasses.replace(cfg.evaluate, output=str(tmp_path / "eval"))
    return dataclasses.replace(cfg, train=train, evaluate=evaluate)


def checkpoint_metrics(run_dir: str) -> list[dict]:
    configs = sorted(glob.glob(os.path.join(run_dir, "checkpoint_step*", "config.json")))
    return [json.load(open(path))["metrics"] for path in configs]


def test_two_worker_ddp_validation_loss_falls(tiny_run, tmp_path):
    cfg = with_train(
        tiny_run,
        tmp_path,
        num_workers=2,
        cpus_per_worker=0.5,
        steps=60,
        val_every=20,
        num_to_keep=0,
    )
    result = run_train(cfg)
    history = checkpoint_metrics(result.run_dir)
    assert [m["step"] for m in history] == [20, 40, 60]
    at_start = json.load(open(os.path.join(result.latest_checkpoint, "config.json")))
    at_start = at_start["val_at_start"]["val_loss"]
    assert history[0]["val_loss"] < 0.7 * at_start, (at_start, history)
    assert history[-1]["val_loss"] < history[0]["val_loss"], history
    assert all(np.isfinite(m["train_loss"]) for m in history)
    # Both ranks trained the same weights (DDP keeps replicas equal); the checkpoint loads
    # from safetensors + JSON alone.
    model, config = load_model(result.best_checkpoint)
    assert config["split"]["val_episodes"]
    assert set(load_file(os.path.join(result.best_checkpoint, "model.safetensors"))) >= {
        "visual_mean",
        "visual_std",
    }
    assert float(model.visual_std.min()) > 0


def test_evaluate_writes_metrics_and_plot(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, steps=10, val_every=10)
    trained = run_train(cfg)
    evaluated = run_evaluate(cfg, checkpoint=trained.best_checkpoint)
    metrics = json.load(open(evaluated.metrics_path))
    for kind in ("prefix", "chained"):
        assert set(metrics["curves"][kind]) >= {"voc_expert", "auroc_success_vs_failure"}
    curves = json.load(open(os.path.join(cfg.evaluate.output, "curves.json")))
    assert sorted(curves["episode_id"]) == sorted(
        json.load(open(os.path.join(trained.best_checkpoint, "config.json")))["split"][
            "val_episodes"
        ]
    )
    assert all(len(c) == n for c, n in zip(curves["prefix"], curves["num_frames"]))
    assert os.path.getsize(evaluated.plot_path) > 10_000


def test_blind_control_sees_only_zeros(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, steps=5, val_every=5, blind=True)
    model, _ = load_model(run_train(cfg).best_checkpoint)
    # Statistics of all-zero inputs: mean 0 and the unit scale of constant features.
    assert torch.all(model.visual_mean == 0) and torch.all(model.visual_std == 1)


def test_too_many_workers_fails_before_training(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, num_workers=64, cpus_per_worker=0.5)
    with pytest.raises(ValueError, match="num_workers=64"):
        run_train(cfg)


def test_missing_embeddings_is_a_clear_error(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, embeddings=str(tmp_path / "nowhere"))
    with pytest.raises(ShardError, match="manifest.json"):
        run_train(cfg)
