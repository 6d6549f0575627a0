"""``rayrm embed`` from a LeRobot v3 dataset root, end to end on a local Ray (tiny backbone,
16x16 frames): the embedded frames are the tiny backbone's embeddings of the frames PyAV
decodes from the episodes' places in the mp4 files; bad input is named and, for one file,
goes to the failures table while the other episodes are published."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import numpy as np
import pytest
from _embed_checks import leftovers, read_failures, read_rows
from _eval_helpers import make_checkpoint
from _lerobot import (
    FPS,
    LENGTHS,
    TASKS,
    TOP,
    WRIST,
    decode_file,
    decoded_episode,
    video_path,
    write_dataset,
)
from conftest import make_config

from rayrm.backbones import build_backbone
from rayrm.cli import main
from rayrm.data import schema
from rayrm.data.mp4 import decode_range
from rayrm.data.shards import read_manifest
from rayrm.embed import InvalidEpisodesError, run_embed
from rayrm.evaluate.scorer import RewardScorer
from rayrm.evaluate.scoring import score_episodes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("lerobot_embed") / "ds")


def _config(workdir, root: str, **embed):
    return make_config(workdir, embed={"input": root, "camera": TOP, **embed})


@pytest.fixture(scope="module")
def embedded(ray_session, dataset, tmp_path_factory):
    """The dataset's top camera embedded once: (config, result)."""
    cfg = _config(tmp_path_factory.mktemp("embedded"), dataset, success_column="success")
    return cfg, run_embed(cfg)


def test_embed_reads_each_episode_from_its_place_in_the_video(embedded, dataset):
    cfg, result = embedded
    assert result.num_episodes == 6 and result.num_frames == sum(LENGTHS)
    rows = read_rows(cfg.embed.output)
    assert sorted(rows) == [f"episode_{i:06d}" for i in range(6)]
    backbone = build_backbone(cfg.backbone)
    dim = cfg.backbone.visual_dim
    for i, n in enumerate(LENGTHS):
        row = rows[f"episode_{i:06d}"]
        assert row["num_frames"] == n
        assert row["prompt"] == TASKS[i % 3]
        assert row["success"] is (i % 2 == 0)
        assert row["source_file"] == video_path(dataset, TOP, i // 2)
        frames = decoded_episode(dataset, TOP, i)  # PyAV directly, cut by position
        expected = backbone.embed_frames(frames, [TASKS[i % 3]] * n)
        got = np.asarray(row["visual_embedding"], dtype=np.float32).reshape(n, dim)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    manifest = read_manifest(cfg.embed.output)
    assert manifest["camera"] == TOP and manifest["num_failed_episodes"] == 0
    assert leftovers(cfg.embed.output) == []


def test_an_undecodable_mp4_fails_its_episodes_and_the_others_are_published(
    ray_session, dataset, tmp_path
):
    root = str(tmp_path / "ds")
    shutil.copytree(dataset, root)
    with open(video_path(root, WRIST, 1), "wb") as f:  # episodes 2 and 3 of the wrist camera
        f.write(b"\x00garbage" * 100)
    cfg = _config(
        tmp_path, root, cameras=[TOP, WRIST], camera_as_episode=True, max_failed_episodes=-1
    )
    result = run_embed(cfg)
    bad = [f"episode_{i:06d}:{WRIST}" for i in (2, 3)]
    expected = sorted(f"episode_{i:06d}:{cam}" for i in range(6) for cam in (TOP, WRIST))
    assert sorted(read_rows(cfg.embed.output)) == [e for e in expected if e not in bad]
    assert result.num_failed == 2
    failures = read_failures(cfg.embed.output)
    assert sorted(f["episode"] for f in failures) == bad
    assert {f["key"] for f in failures} == {WRIST}
    assert {f["file"] for f in failures} == {video_path(root, WRIST, 1)}
    assert all("cannot decode the video file" in f["reason"] for f in failures)


def test_a_failed_episode_over_the_limit_publishes_nothing(ray_session, dataset, tmp_path):
    root = str(tmp_path / "ds")
    shutil.copytree(dataset, root)
    with open(video_path(root, TOP, 2), "wb") as f:
        f.write(b"\x00garbage" * 100)
    cfg = _config(tmp_path, root)
    with pytest.raises(InvalidEpisodesError, match="episode_000004"):
        run_embed(cfg)
    assert not os.path.exists(os.path.join(cfg.embed.output, schema.MANIFEST_NAME))


def test_an_unknown_camera_exits_2_naming_the_keys_and_writes_nothing(
    ray_session, dataset, tmp_path, caplog
):
    argv = ["embed", "--workdir", str(tmp_path), "--embed.input", dataset]
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert main([*argv, "--embed.camera", "side_cam"]) == 2
    assert f"unknown camera key(s) side_cam; the dataset's video keys are: {TOP}, {WRIST}" in (
        caplog.text
    )
    assert os.listdir(tmp_path) == []


def test_a_dataset_on_s3_embeds_as_the_local_one(ray_session, s3_server, dataset, tmp_path):
    """Writer, scan, probe and decode all go through rayrm.data.storage: the same dataset
    written to the moto S3 server embeds to the same rows as the local copy."""
    bucket = s3_server.create_bucket("lerobot-in")
    root = write_dataset(f"{bucket}/ds")
    keys = s3_server.list_keys("lerobot-in", "ds/")
    assert (
        "ds/meta/info.json" in keys
        and "ds/videos/observation.images.top/chunk-000/file-002.mp4" in keys
    )
    s3 = s3_server.client()
    for key in [k for k in keys if k.endswith(".mp4")]:
        local_path = f"{dataset}/{key.removeprefix('ds/')}"
        with open(local_path, "rb") as f:  # the writer put the local file's bytes on S3
            assert s3.get_object(Bucket="lerobot-in", Key=key)["Body"].read() == f.read(), key
        expected = decode_file(local_path)  # and rayrm's reader decodes them exactly
        found = np.stack(list(decode_range(f"{bucket}/{key}", 0.0, len(expected), FPS)))
        np.testing.assert_array_equal(found, expected, err_msg=key)
    remote = _config(tmp_path / "remote", root, output=f"{bucket}/emb")
    local = _config(tmp_path / "local", dataset)
    run_embed(remote)
    run_embed(local)
    remote_rows, local_rows = read_rows(remote.embed.output), read_rows(local.embed.output)
    assert sorted(remote_rows) == sorted(local_rows)
    for episode, row in remote_rows.items():
        assert row["source_file"].startswith(f"{bucket}/ds/videos/")
        # Not exact: under heavy load one episode's Ray-embedded rows have differed by ~3e-4
        # (cause not found yet); the bytes and rayrm's decode are compared exactly above.
        np.testing.assert_allclose(
            row["visual_embedding"], local_rows[episode]["visual_embedding"], atol=1e-3
        )


def test_evaluate_reads_a_lerobot_root_as_raw_input(embedded, dataset, tmp_path):
    """evaluate.input = the LeRobot root gives the curves of its embeddings; the causal curve
    is RewardScorer fed PyAV's own decode frame by frame."""
    cfg, _ = embedded
    model = make_checkpoint(cfg, tmp_path / "ckpt")
    ids = [f"episode_{i:06d}" for i in (1, 4)]
    (from_shards,) = score_episodes(cfg, [model], ids)
    raw = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, input=dataset))
    (from_video,) = score_episodes(raw, [model], ids)
    assert from_video["episode_id"] == from_shards["episode_id"]
    for a, b in zip(from_video["prefix"], from_shards["prefix"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    scorer = RewardScorer.from_checkpoint(model)
    for i in (1, 4):
        row = from_video["episode_id"].index(f"episode_{i:06d}")
        scorer.reset([TASKS[i % 3]])
        frames = decoded_episode(dataset, TOP, i)
        values = [scorer.step(frame[None])[0] for frame in frames]
        np.testing.assert_allclose(values, from_video["causal"][row], atol=1e-4)


def test_annotation_videos_from_a_lerobot_root(ray_session, dataset, tmp_path):
    from rayrm.annotate.videos import run_annotate_video
    from rayrm.config import AnnotateConfig
    from rayrm.video import count_mp4_frames

    names = ["episode_000001", "episode_000003"]
    cfg = AnnotateConfig(
        input=dataset, camera=TOP, video_output=str(tmp_path / "videos"), episodes=names
    )
    result = run_annotate_video(cfg)
    assert result.num_episodes == 2 and result.num_frames == LENGTHS[1] + LENGTHS[3]
    for name, length in zip(names, (LENGTHS[1], LENGTHS[3])):
        assert count_mp4_frames(str(tmp_path / "videos" / f"{name}.mp4")) == length
