"""SARM: stage + subtask heads trained on annotated synthetic episodes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayrm.data import schema
from rayrm.data.shards import ShardError, episodes_from_table, read_episodes
from rayrm.stages import stage_priors
from rayrm.train.checkpoint import load_model
from rayrm.train.trainer import run_train
from tests.conftest import make_config

NUM_STAGES = 4


def labels_by_hand(boundaries: list[int], num_frames: int) -> tuple[list[int], list[float]]:
    """docs/recipe.md#stages written out plainly, independent of rayrm's annotate code."""
    starts = [0, *boundaries, num_frames]
    stage, subtask = [], []
    for k in range(len(starts) - 1):
        for t in range(starts[k], starts[k + 1]):
            stage.append(k)
            subtask.append((t - starts[k] + 1) / (starts[k + 1] - starts[k]))
    return stage, subtask


def annotate_copy(cfg, dest) -> str:
    """A copy of the run's shards with stage columns from the ground-truth boundaries of
    successful episodes (failures stay unannotated: empty lists)."""
    shutil.copytree(cfg.embed.output, dest)
    manifest_path = os.path.join(dest, schema.MANIFEST_NAME)
    for path in [os.path.join(dest, json.load(open(manifest_path))["episodes"])]:
        table = pq.read_table(path)
        stages, subtasks = [], []
        for bounds, n, ok in zip(
            table.column("stage_boundaries").to_pylist(),
            table.column("num_frames").to_pylist(),
            table.column("success").to_pylist(),
        ):
            stage, subtask = labels_by_hand(bounds, n) if ok else ([], [])
            stages.append(stage)
            subtasks.append(subtask)
        table = table.append_column(schema.STAGE_FIELDS[0], pa.array(stages, pa.list_(pa.int32())))
        table = table.append_column(
            schema.STAGE_FIELDS[1], pa.array(subtasks, pa.list_(pa.float32()))
        )
        pq.write_table(table, path)
    manifest_path = os.path.join(dest, schema.MANIFEST_NAME)
    manifest = json.load(open(manifest_path))
    manifest.update(num_stages=NUM_STAGES, stage_names=["reach", "grasp", "move", "place"])
    json.dump(manifest, open(manifest_path, "w"))
    return str(dest)


def test_labels_by_hand_match_the_spec_example():
    # T=6, boundaries [2, 5]: stages [0,0,1,1,1,2]; subtask 1/2,2/2, 1/3,2/3,3/3, 1/1
    stage, subtask = labels_by_hand([2, 5], 6)
    assert stage == [0, 0, 1, 1, 1, 2]
    np.testing.assert_allclose(subtask, [0.5, 1, 1 / 3, 2 / 3, 1, 1])


def test_stage_priors_episode_average_and_frame_share():
    stages = [[0, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]]  # shares (.5,.5) and (.125,.875)
    np.testing.assert_allclose(stage_priors(stages, 2, "episode"), [0.3125, 0.6875])
    np.testing.assert_allclose(stage_priors(stages, 2, "frame"), [3 / 12, 9 / 12])


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, ray_session):
    """More episodes than ``tiny_run``: held-out stage accuracy needs some variety."""
    from rayrm.data.synthetic import write_synthetic_dataset
    from rayrm.embed import run_embed

    cfg = make_config(
        tmp_path_factory.mktemp("staged"),
        synth=dict(num_episodes=40, failure_fraction=0.1, min_stage_frames=4, max_stage_frames=7),
        backbone=dict(visual_dim=64),
    )
    write_synthetic_dataset(cfg.synth)
    run_embed(cfg)
    return cfg


def test_sarm_reaches_stage_accuracy_on_held_out_episodes(staged_run, tmp_path):
    embeddings = annotate_copy(staged_run, tmp_path / "emb")
    cfg = dataclasses.replace(
        staged_run,
        model=dataclasses.replace(staged_run.model, num_stages=NUM_STAGES, d_model=64, ffn_dim=128),
        train=dataclasses.replace(
            staged_run.train,
            embeddings=embeddings,
            output=str(tmp_path / "train"),
            steps=600,
            val_every=300,
            lr=2e-3,
            batch_size=32,
        ),
    )
    result = run_train(cfg)
    model, config = load_model(result.best_checkpoint)
    assert config["stage_names"] == ["reach", "grasp", "move", "place"]
    assert float(model.stage_prior.sum()) == pytest.approx(1.0)
    val_ids = set(config["split"]["val_episodes"])
    table = read_episodes(embeddings, sorted(val_ids))
    table = table.filter(table["success"])
    episodes = episodes_from_table(table)
    correct = total = 0
    for i in range(len(episodes)):
        visual = torch.from_numpy(np.array(episodes.episode(i)))
        out = model.prefix_outputs(visual, torch.from_numpy(np.array(episodes.language[i])))
        truth = episodes.stage[episodes.offsets[i] : episodes.offsets[i + 1]]
        correct += int((out["stage"].numpy() == truth).sum())
        total += len(truth)
        progress = out["progress"].numpy()
        assert progress.min() >= 0 and progress.max() <= 1
    assert total > 0 and correct / total >= 0.9, correct / total


def test_sarm_needs_annotated_shards(tiny_run, tmp_path):
    cfg = dataclasses.replace(
        tiny_run,
        model=dataclasses.replace(tiny_run.model, num_stages=NUM_STAGES),
        train=dataclasses.replace(tiny_run.train, output=str(tmp_path / "train")),
    )
    with pytest.raises(ShardError, match="stage"):
        run_train(cfg)
