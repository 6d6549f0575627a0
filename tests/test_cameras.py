"""Every camera and the robot's own state (``embed.cameras``, ``embed.state``): embedding
stores each camera and the state per frame, readers hand them out side by side, training
records the layout, and evaluation and scoring of raw episodes embed every camera again.

Real components on a local Ray: the tiny backbone, the synthetic HDF5 episodes of the session
(``tiny_run``, whose single-camera embeddings are the reference) and a tiny LeRobot dataset."""

from __future__ import annotations

import dataclasses
import os
import shutil

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _embed_checks import read_failures, read_rows
from _eval_helpers import make_checkpoint
from _lerobot import LENGTHS, TOP, WRIST, decoded_episode, write_dataset
from conftest import make_config

from rayrm.backbones import build_backbone
from rayrm.config import BackboneConfig, ConfigError, ServeConfig, load_config, to_dict
from rayrm.data import schema
from rayrm.data.lerobot import LeRobotDatasetError
from rayrm.data.shards import read_manifest
from rayrm.data.sources import scan_raw_input
from rayrm.embed import run_embed
from rayrm.evaluate.run import run_evaluate
from rayrm.evaluate.scorer import RewardScorer
from rayrm.evaluate.scoring import score_episodes
from rayrm.serve.errors import BadRequestError
from rayrm.serve.streams import StreamTable
from rayrm.testing import SMALL_MODEL
from rayrm.train.checkpoint import read_checkpoint_config, save_checkpoint
from rayrm.train.model import RewardTransformer
from rayrm.train.trainer import run_train

CAMERAS = ["side_cam", "wrist_cam"]
STATE = "tcp_pose"


def _frames(path: str, episode: str, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[episode][key][()]


@pytest.fixture(scope="module")
def cams_run(tiny_run, tmp_path_factory):
    """The session's HDF5 episodes embedded with both cameras and the pose."""
    work = tmp_path_factory.mktemp("cams")
    embed = {"input": tiny_run.embed.input, "cameras": CAMERAS, "state": STATE}
    cfg = make_config(work, embed=embed)
    return cfg, run_embed(cfg)


def test_the_shards_hold_each_camera_and_the_state(cams_run, tiny_run):
    cfg, result = cams_run
    dim = cfg.backbone.visual_dim
    pose_dim = _frames(cfg.embed.input, "episode_0000", STATE).shape[1]
    manifest = read_manifest(cfg.embed.output)
    assert manifest["frame_layout"] == {
        "cameras": CAMERAS,
        "view_dims": [dim, dim],
        "state_key": STATE,
        "state_dim": pose_dim,
    }
    chunk = pq.read_schema(os.path.join(cfg.embed.output, manifest["chunks"][0]))
    assert chunk.names == [*schema.CHUNK_SCHEMA.names, "visual_embedding/wrist_cam", "state"]
    rows, single = read_rows(cfg.embed.output), read_rows(tiny_run.embed.output)
    assert sorted(rows) == sorted(single) and result.num_failed == 0
    backbone = build_backbone(cfg.backbone)
    for episode, row in rows.items():
        n = row["num_frames"]
        vectors = np.asarray(row["visual_embedding"], np.float32).reshape(n, 2 * dim + pose_dim)
        first = np.asarray(single[episode]["visual_embedding"], np.float32).reshape(n, dim)
        np.testing.assert_allclose(vectors[:, :dim], first, rtol=1e-5, atol=1e-6)
        wrist = _frames(cfg.embed.input, episode, "wrist_cam")
        expected = backbone.embed_frames(wrist, [row["prompt"]] * n)
        np.testing.assert_allclose(vectors[:, dim : 2 * dim], expected, rtol=1e-4, atol=1e-5)
        pose = _frames(cfg.embed.input, episode, STATE).astype(np.float32)
        np.testing.assert_array_equal(vectors[:, 2 * dim :], pose)


def test_a_missing_camera_or_state_fails_that_episode_naming_file_and_key(tiny_run, tmp_path):
    path = str(tmp_path / "episodes.h5")
    shutil.copy(tiny_run.embed.input, path)
    with h5py.File(path, "a") as f:
        del f["episode_0003"]["wrist_cam"]
        del f["episode_0004"][STATE]
    embed = {"input": path, "cameras": CAMERAS, "state": STATE, "max_failed_episodes": -1}
    cfg = make_config(tmp_path, embed=embed)
    result = run_embed(cfg)
    assert result.num_failed == 2
    failures = {
        (f["file"], f["episode"], f["key"]): f["reason"] for f in read_failures(cfg.embed.output)
    }
    assert sorted(failures) == [
        (os.path.abspath(path), "episode_0003", "wrist_cam"),
        (os.path.abspath(path), "episode_0004", STATE),
    ]
    assert (
        "missing camera dataset" in failures[(os.path.abspath(path), "episode_0003", "wrist_cam")]
    )
    assert "missing state dataset" in failures[(os.path.abspath(path), "episode_0004", STATE)]
    assert {"episode_0003", "episode_0004"}.isdisjoint(read_rows(cfg.embed.output))


def test_cameras_of_other_lengths_and_states_of_another_size_are_named(tmp_path):
    """The scan's own checks (no Ray): every camera has the episode's frame count, and every
    episode's state the same number of values per frame."""
    path = str(tmp_path / "episodes.h5")
    frames = np.zeros((6, 8, 8, 3), np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = "pick"
        for name, wrist_frames, pose_dim in [("a", 6, 7), ("b", 5, 7), ("c", 6, 7), ("d", 6, 3)]:
            group = f.create_group(name)
            group["side_cam"] = frames
            group["wrist_cam"] = frames[:wrist_frames]
            group[STATE] = np.zeros((6, pose_dim), np.float64)
    episodes, problems = scan_raw_input(path, CAMERAS, None, state=STATE)
    assert [e.episode_id for e in episodes] == ["a", "c"]
    assert all(e.state_dim == 7 for e in episodes)
    assert [(p.episode, p.key) for p in problems] == [("b", "wrist_cam"), ("d", STATE)]
    assert "5 frames but side_cam has 6" in problems[0].reason
    assert "3 values per frame, the other episodes have 7" in problems[1].reason


def test_lerobot_cameras_are_views_of_one_episode(ray_session, tmp_path):
    root = write_dataset(tmp_path / "ds")
    cfg = make_config(tmp_path, embed={"input": root, "camera": TOP, "cameras": [TOP, WRIST]})
    run_embed(cfg)
    rows = read_rows(cfg.embed.output)
    assert sorted(rows) == [f"episode_{i:06d}" for i in range(6)]
    assert read_manifest(cfg.embed.output)["frame_layout"]["cameras"] == [TOP, WRIST]
    backbone, dim = build_backbone(cfg.backbone), cfg.backbone.visual_dim
    for i, n in enumerate(LENGTHS):
        row = rows[f"episode_{i:06d}"]
        vectors = np.asarray(row["visual_embedding"], np.float32).reshape(n, 2 * dim)
        for k, camera in enumerate((TOP, WRIST)):
            expected = backbone.embed_frames(decoded_episode(root, camera, i), [row["prompt"]] * n)
            got = vectors[:, k * dim : (k + 1) * dim]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=camera)


def test_lerobot_raw_scoring_decodes_every_camera_of_the_checkpoint(ray_session, tmp_path):
    """A two-camera checkpoint scores a LeRobot root as it scores its embeddings: both
    cameras decoded and embedded again, in the checkpoint's order."""
    root = write_dataset(tmp_path / "ds")
    cfg = make_config(tmp_path, embed={"input": root, "camera": TOP, "cameras": [TOP, WRIST]})
    run_embed(cfg)
    model = make_checkpoint(cfg, tmp_path / "ckpt")
    assert read_checkpoint_config(model)["view_dims"] == [cfg.backbone.visual_dim] * 2
    ids = ["episode_000001", "episode_000004"]
    (from_shards,) = score_episodes(cfg, [model], ids)
    raw = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, input=root))
    (from_video,) = score_episodes(raw, [model], ids)
    assert from_video["episode_id"] == from_shards["episode_id"]
    for a, b in zip(from_video["prefix"], from_shards["prefix"]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_lerobot_state_is_refused_before_any_work(ray_session, tmp_path):
    root = write_dataset(tmp_path / "ds")
    cfg = make_config(tmp_path, embed={"input": root, "camera": TOP, "state": "observation.state"})
    with pytest.raises(LeRobotDatasetError, match="read from HDF5 episodes only"):
        run_embed(cfg)
    assert not os.path.exists(cfg.embed.output)


def test_camera_as_episode_needs_cameras():
    with pytest.raises(ConfigError, match="camera_as_episode needs"):
        load_config(None, ["--embed.camera_as_episode", "true"])


def test_embed_train_evaluate_with_two_cameras_and_the_pose(cams_run, tmp_path):
    cfg, _ = cams_run
    train = dataclasses.replace(cfg.train, output=str(tmp_path / "train"), steps=10, val_every=5)
    evaluate = dataclasses.replace(
        cfg.evaluate, output=str(tmp_path / "eval"), videos=0, episode_figures=0, report=False
    )
    cfg = dataclasses.replace(cfg, train=train, evaluate=evaluate)
    trained = run_train(cfg)
    config = read_checkpoint_config(trained.best_checkpoint)
    dim = cfg.backbone.visual_dim
    layout = read_manifest(cfg.embed.output)["frame_layout"]
    assert config["frame_layout"] == layout
    assert config["view_dims"] == [dim, dim] and config["state_dim"] == layout["state_dim"]
    assert config["visual_dim"] == 2 * dim + layout["state_dim"]

    evaluated = run_evaluate(cfg, checkpoint=trained.best_checkpoint)
    ids = sorted(set(evaluated.rows["source_episode"]))  # the held-out episodes
    assert ids and os.path.exists(evaluated.metrics_path)
    # raw HDF5 through the checkpoint's backbone: every camera and the pose embedded again
    raw = dataclasses.replace(
        cfg, evaluate=dataclasses.replace(cfg.evaluate, input=cfg.embed.input)
    )
    (rows,) = score_episodes(raw, [trained.best_checkpoint], ids)
    assert rows["episode_id"] == evaluated.rows["episode_id"]  # episodes and rewound copies
    for a, b in zip(rows["prefix"], evaluated.rows["prefix"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # frames of one camera are not enough for this model: a clear error, not a wrong reward
    scorer = RewardScorer.from_checkpoint(trained.best_checkpoint, device="cpu")
    scorer.reset([cfg.synth.prompt])
    frame = _frames(cfg.embed.input, ids[0], "side_cam")[:1]
    with pytest.raises(ValueError, match="fuses side_cam, wrist_cam and the state 'tcp_pose'"):
        scorer.step(frame)


def test_serve_refuses_raw_frames_of_a_cameras_checkpoint_and_takes_frame_vectors(tmp_path):
    """Serving fuses no cameras itself: a raw frame is a 400 naming what the model needs, a
    frame vector (every camera's embedding, then the state) is scored as offline."""
    backbone = BackboneConfig(name="tiny", visual_dim=8, language_dim=4)
    layout = {"cameras": CAMERAS, "view_dims": [8, 8], "state_key": STATE, "state_dim": 7}
    torch.manual_seed(0)
    model = RewardTransformer(SMALL_MODEL, 23, 4, [8, 8], 7).eval()
    meta = {"backbone": to_dict(backbone), "frame_layout": layout}
    path = str(tmp_path)
    save_checkpoint(path, model, meta)
    table = StreamTable.from_checkpoint(path, "rep1", ServeConfig(), "cpu")
    assert table.info()["frame_layout"] == layout
    stream = table.open("put the cube in the pot")
    frame = np.zeros((16, 16, 3), np.uint8)
    (refused,) = table.step([(stream, frame)])
    assert isinstance(refused, BadRequestError)
    assert "fuses side_cam, wrist_cam and the state 'tcp_pose'" in str(refused)
    vectors = np.random.default_rng(0).standard_normal((3, 23)).astype(np.float32)
    got = [table.step([(stream, v)])[0].reward for v in vectors]
    scorer = RewardScorer.from_checkpoint(path, device="cpu")
    scorer.reset(["put the cube in the pot"])
    expected = [scorer.step(v[None])[0] for v in vectors]
    np.testing.assert_allclose(got, expected, atol=1e-5)
