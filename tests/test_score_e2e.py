"""embed -> train -> score on a generated LeRobot v3 dataset, checked against evaluation and
the online scorer.

A real (short) ``rayrm train`` run over the dataset's embeddings; ``rayrm score`` then finds
its best checkpoint by itself and scores the dataset's root (frames decoded and embedded on
the fly). Its ``prefix`` column must be ``rayrm evaluate``'s prefix curve of the same episode,
and its causal column (``progress_sparse``) what ``RewardScorer`` gives when fed the frames
one at a time (decoded here with PyAV, independently of rayrm's reader).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _lerobot import LENGTHS, TASKS, TOP, decoded_episode, write_dataset
from conftest import make_config

from rayrm.data import schema
from rayrm.embed import run_embed
from rayrm.evaluate.run import run_evaluate
from rayrm.evaluate.scorer import RewardScorer
from rayrm.score.run import run_score
from rayrm.train.trainer import run_train


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("score_e2e")
    root = write_dataset(work / "ds")
    cfg = make_config(work, embed={"input": root, "camera": TOP, "success_column": "success"})
    run_embed(cfg)
    trained = run_train(cfg)
    cfg = dataclasses.replace(
        cfg,
        score=dataclasses.replace(cfg.score, input=root, camera=TOP, rabc_chunk=2),
        evaluate=dataclasses.replace(
            cfg.evaluate,
            input=root,
            camera=TOP,
            split="all",
            rewind=False,
            report=False,
            videos=0,
            episode_figures=0,
        ),
    )
    scored = run_score(cfg)  # no checkpoint given: the training run's best
    evaluation = run_evaluate(cfg, trained.best_checkpoint)
    return root, trained, scored, evaluation, pd.read_parquet(scored.file)


def test_embed_train_score_labels_every_frame_once(pipeline):
    root, trained, scored, _, frames = pipeline
    data = pd.read_parquet(os.path.join(root, "data/chunk-000/file-000.parquet"))
    assert frames["index"].tolist() == data["index"].tolist()
    assert frames["episode_index"].tolist() == data["episode_index"].tolist()
    assert frames["frame_index"].tolist() == data["frame_index"].tolist()
    assert scored.num_frames == sum(LENGTHS) and scored.scored_frames == sum(LENGTHS)
    assert np.isfinite(frames["progress_sparse"]).all() and frames["rabc_weight"].notna().all()
    metadata = pq.read_schema(scored.file).metadata
    assert metadata[schema.LEROBOT_REWARD_MODEL_KEY.encode()].decode() == trained.best_checkpoint


def test_the_prefix_column_is_evaluations_prefix_curve(pipeline):
    _, _, _, evaluation, frames = pipeline
    rows = evaluation.rows
    episodes = [i for i, kind in enumerate(rows["kind"]) if kind == "episode"]
    assert len(episodes) == len(LENGTHS)
    for i in episodes:
        mine = frames[frames["episode_id"] == rows["episode_id"][i]]
        assert mine["frame_index"].tolist() == list(range(rows["num_frames"][i]))
        np.testing.assert_allclose(mine["prefix"], rows["prefix"][i], atol=1e-5)


def test_the_causal_column_is_reward_scorer_fed_frame_by_frame(pipeline):
    root, trained, _, _, frames = pipeline
    scorer = RewardScorer.from_checkpoint(trained.best_checkpoint, device="cpu")
    for i in range(len(LENGTHS)):
        scorer.reset([TASKS[i % 3]])
        online = [scorer.step(frame[None])[0] for frame in decoded_episode(root, TOP, i)]
        mine = frames[frames["episode_index"] == i]
        np.testing.assert_allclose(mine["progress_sparse"], online, atol=1e-4)
