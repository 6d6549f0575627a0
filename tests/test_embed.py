"""The Ray Data embedding stage (rayrm.embed): HDF5 episodes in, Parquet episode shards out.

Checks the written rows against the raw HDF5 file and a direct backbone call, the layout in
``rayrm.data.schema``, and that the output folder only ever appears complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from _embed_checks import (
    assert_same_rows,
    leftovers,
    partial_ids,
    read_failures,
    read_json,
    read_rows,
    with_backbone,
    with_embed,
)
from _failing_backbone import NAME as FAILING_BACKBONE
from _failing_backbone import importable_everywhere
from conftest import make_config
from ray.data.block import BlockAccessor

import rayrm.embed.run
from rayrm.backbones import Backbone, build_backbone, register_backbone
from rayrm.backbones import base as backbones_base
from rayrm.config import BackboneConfig, EmbedConfig
from rayrm.data import schema
from rayrm.data.hdf5 import HDF5EpisodeDatasource, InvalidEpisodesError, scan_episodes
from rayrm.data.synthetic import write_synthetic_dataset
from rayrm.embed import FrameEmbedder, pipeline, run_embed
from rayrm.embed import prompts as embed_prompts


def read_manifest(output: str) -> dict:
    return read_json(output, schema.MANIFEST_NAME)


def hdf5_episodes(path: str, camera: str = "side_cam") -> dict[str, dict]:
    with h5py.File(path, "r") as f:
        return {
            name: {
                "frames": group[camera][()],
                "prompt": group.attrs.get("prompt", f.attrs.get("prompt")),
                "success": bool(group.attrs["success"]),
                "stage_boundaries": [int(b) for b in group.attrs["stage_boundaries"]],
                "failure_mode": str(group.attrs["failure_mode"]),
            }
            for name, group in f.items()
        }


# --------------------------------------------------------------------------- one run, read back


def test_one_row_per_episode_with_all_its_frames(tiny_run):
    rows = read_rows(tiny_run.embed.output)
    raw = hdf5_episodes(tiny_run.embed.input)
    assert sorted(rows) == sorted(raw)  # ids are the HDF5 group names, each exactly once
    for episode_id, row in rows.items():
        T = raw[episode_id]["frames"].shape[0]
        assert row["num_frames"] == T
        assert row["source_file"] == os.path.abspath(tiny_run.embed.input)
        assert row["failure_mode"] == raw[episode_id]["failure_mode"]  # for per-mode metrics
        assert len(row["visual_embedding"]) == T * tiny_run.backbone.visual_dim


def test_chunk_files_episodes_table_and_manifest(tiny_run):
    output = tiny_run.embed.output
    manifest = read_manifest(output)
    chunk_files = sorted(os.listdir(os.path.join(output, schema.CHUNKS_DIR)))
    assert [f"{schema.CHUNKS_DIR}/{n}" for n in chunk_files] == manifest["chunks"]
    for name in manifest["chunks"]:
        parquet = pq.ParquetFile(os.path.join(output, name))
        assert parquet.schema_arrow.equals(schema.CHUNK_SCHEMA, check_metadata=False)
        assert parquet.metadata.num_row_groups == parquet.metadata.num_rows  # a group per chunk
    index = pq.read_table(os.path.join(output, manifest["episodes"]))
    assert index.schema.equals(schema.EPISODE_INDEX_SCHEMA, check_metadata=False)
    # Calls of 16 frames and episodes of 13-17: most episodes straddle two calls and are
    # stored in two chunks (two files), each chunk naming its place; they tile the episode.
    rows = index.to_pylist()
    assert sum(len(row["chunk_file"]) >= 2 for row in rows) >= len(rows) // 2
    for row in rows:
        frames = 0
        for name, group, start in zip(
            row["chunk_file"], row["chunk_row_group"], row["chunk_start"]
        ):
            chunk = pq.ParquetFile(os.path.join(output, name)).read_row_group(group).to_pylist()[0]
            assert (
                chunk["episode_id"] == row["episode_id"] and chunk["frame_start"] == start == frames
            )
            frames += chunk["num_frames"]
        assert frames == row["num_frames"]

    raw = hdf5_episodes(tiny_run.embed.input)
    manifest = read_manifest(output)
    assert manifest["num_episodes"] == len(raw) == tiny_run.synth.num_episodes
    assert manifest["num_frames"] == sum(e["frames"].shape[0] for e in raw.values())
    assert manifest["visual_dim"] == tiny_run.backbone.visual_dim
    assert manifest["language_dim"] == tiny_run.backbone.language_dim
    assert manifest["input_files"] == [os.path.abspath(tiny_run.embed.input)]
    assert manifest["backbone"] == dataclasses.asdict(tiny_run.backbone)
    assert manifest["camera"] == "side_cam"
    assert manifest["num_failed_episodes"] == 0 and read_failures(output) == []


def test_embeddings_equal_a_direct_backbone_call(tiny_run):
    backbone = build_backbone(tiny_run.backbone)
    D = backbone.visual_dim
    rows = read_rows(tiny_run.embed.output)
    for episode_id, episode in hdf5_episodes(tiny_run.embed.input).items():
        row = rows[episode_id]
        frames = episode["frames"]
        prompts = [episode["prompt"]] * len(frames)
        expected = backbone.embed_frames(frames, prompts)
        stored = np.asarray(row["visual_embedding"], np.float32).reshape(len(frames), D)
        np.testing.assert_allclose(stored, expected, atol=1e-5, err_msg=episode_id)
        language = backbone.embed_prompts([episode["prompt"]])[0]
        np.testing.assert_allclose(row["language_embedding"], language, atol=1e-6)
        assert row["prompt"] == episode["prompt"]
        assert row["success"] is episode["success"]
        assert row["stage_boundaries"] == episode["stage_boundaries"]
    # Both outcomes are present, so "success copied" is not trivially true.
    assert {row["success"] for row in rows.values()} == {True, False}


@pytest.mark.parametrize("parallelism", [1, 3, 100])
def test_read_tasks_cover_each_frame_exactly_once(tiny_run, parallelism):
    episodes, problems = scan_episodes([tiny_run.embed.input], "side_cam")
    assert not problems
    source = HDF5EpisodeDatasource(episodes, "side_cam", frames_per_block=5)
    tasks = source.get_read_tasks(parallelism)
    assert len(tasks) == min(parallelism, len(episodes))
    raw = hdf5_episodes(tiny_run.embed.input)
    seen = []
    for task in tasks:
        rows_in_task = 0
        blocks = list(task())
        for i, block in enumerate(blocks):
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            ids, index, frames = batch["episode_id"], batch["frame_index"], batch["frame"]
            # Full blocks spanning episodes (only a task's last block is shorter), never a
            # whole long episode in one block.
            assert len(ids) == 5 or (i == len(blocks) - 1 and len(ids) < 5)
            for episode_id, t, frame in zip(ids, index, frames):
                np.testing.assert_array_equal(frame, raw[episode_id]["frames"][t])
            seen.extend(zip(ids.tolist(), index.tolist()))
            rows_in_task += len(ids)
        assert rows_in_task == task.metadata.num_rows
    expected = [(e, t) for e, ep in raw.items() for t in range(len(ep["frames"]))]
    assert sorted(seen) == sorted(expected)  # no frame missing, none repeated


def test_frame_embedder_mixed_sizes_and_wrong_dims(monkeypatch):
    cfg = BackboneConfig(name="tiny", visual_dim=16, language_dim=8, seed=1)
    rng = np.random.default_rng(0)
    small, large = (
        rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) for n, s in ((2, 8), (3, 20))
    )
    mixed = np.empty(5, dtype=object)  # how Ray Data hands over frames of different sizes
    mixed[:] = [small[0], large[0], small[1], large[1], large[2]]
    batch = {"episode_id": np.arange(5), "frame_index": np.arange(5), "prompt": np.full(5, "p")}
    out = FrameEmbedder(cfg)({**batch, "frame": mixed})["visual_embedding"]
    backbone = build_backbone(cfg)
    np.testing.assert_allclose(out[[0, 2]], backbone.embed_frames(small, ["p"] * 2), atol=1e-5)
    np.testing.assert_allclose(out[[1, 3, 4]], backbone.embed_frames(large, ["p"] * 3), atol=1e-5)

    monkeypatch.setattr(backbones_base, "_REGISTRY", dict(backbones_base._REGISTRY))

    @register_backbone("test-wrong-dim")
    class WrongDim(Backbone):
        visual_dim, language_dim = 4, 0

        def embed_frames(self, frames, prompts):
            return np.zeros((len(frames), 5), np.float32)

    embedder = FrameEmbedder(BackboneConfig(name="test-wrong-dim"))
    with pytest.raises(RuntimeError, match=r"returned \(2, 5\), expected \(2, 4\)"):
        embedder({**batch, "frame": small})


def test_frame_embedder_runs_the_backbone_on_batch_size_frames_at_a_time(monkeypatch):
    """A call gets whole read blocks; the backbone still sees ``embed.batch_size`` frames."""
    monkeypatch.setattr(backbones_base, "_REGISTRY", dict(backbones_base._REGISTRY))
    seen: list[int] = []

    @register_backbone("test-record-batches")
    class RecordBatches(Backbone):
        visual_dim, language_dim = 1, 0

        def embed_frames(self, frames, prompts):
            seen.append(len(frames))
            assert len(prompts) == len(frames)
            return frames[:, 0, 0, :1].astype(np.float32)  # the frame's own value

    frames = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1).repeat(3, axis=3)
    batch = {"episode_id": np.arange(7), "frame_index": np.arange(7), "prompt": np.full(7, "p")}
    out = FrameEmbedder(BackboneConfig(name="test-record-batches"), batch_size=3)(
        {**batch, "frame": frames}
    )
    assert seen == [3, 3, 1]
    np.testing.assert_array_equal(out["visual_embedding"][:, 0], np.arange(7))


@pytest.mark.parametrize(
    "batch_size, frames_per_block, per_call",
    [(512, 4096, 4096), (512, 1000, 512), (256, 64, 256), (5, 12, 10)],
)
def test_a_call_takes_whole_blocks_of_whole_batches(batch_size, frames_per_block, per_call):
    ecfg = EmbedConfig(batch_size=batch_size, frames_per_block=frames_per_block)
    assert pipeline.frames_per_call(ecfg) == per_call


@pytest.mark.parametrize("thread_safe", [False, True])
def test_frame_embedder_overlaps_calls_only_for_thread_safe_backbones(monkeypatch, thread_safe):
    """Ray runs calls_per_actor calls of one actor in threads; a backbone that is not
    thread-safe (a tokenizer, say) must still see one call at a time."""
    monkeypatch.setattr(backbones_base, "_REGISTRY", dict(backbones_base._REGISTRY))
    both_inside = threading.Barrier(2, timeout=2.0)
    inside, most_inside, lock = [0], [0], threading.Lock()

    @register_backbone("test-count-calls")
    class CountCalls(Backbone):
        visual_dim, language_dim = 2, 0

        def embed_frames(self, frames, prompts):
            with lock:
                inside[0] += 1
                most_inside[0] = max(most_inside[0], inside[0])
            with contextlib.suppress(threading.BrokenBarrierError):
                both_inside.wait()  # passes only if the other call is inside too
            with lock:
                inside[0] -= 1
            return np.zeros((len(frames), 2), np.float32)

    CountCalls.thread_safe = thread_safe
    embedder = FrameEmbedder(BackboneConfig(name="test-count-calls"))
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    batch = {"episode_id": np.arange(2), "frame_index": np.arange(2), "prompt": np.full(2, "p")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda _: embedder({**batch, "frame": frames}), range(2)))
    assert most_inside[0] == (2 if thread_safe else 1)


def call_within(seconds: float, fn, *args):
    """``fn(*args)`` in a daemon thread: a call that hangs fails the test, not the run."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{fn.__qualname__} did not return within {seconds} s"
    return result[0]


def test_gpu_run_embeds_dinov2_style_prompts_on_a_cpu_without_waiting(tiny_run):
    """With GPU actors, a backbone whose prompt vectors are the same on the CPU
    (``prompts_on_cpu``) gets them from a CPU task started beside the actors: this Ray has no
    GPU, so a task that asked for one (the path VLMs take) would never run."""
    assert build_backbone(tiny_run.backbone).prompts_on_cpu
    cfg = with_embed(tiny_run, num_gpus_per_actor=1.0)
    episodes, _ = scan_episodes([tiny_run.embed.input], cfg.embed.camera)
    task = call_within(30, embed_prompts.PromptVectorsTask, cfg, episodes)
    vectors, visual_dim, language_dim = call_within(60, task.get)
    backbone = build_backbone(tiny_run.backbone)
    assert (visual_dim, language_dim) == (backbone.visual_dim, backbone.language_dim)
    prompts = sorted({e.prompt for e in episodes})
    assert sorted(vectors) == prompts
    expected = backbone.embed_prompts(prompts)
    np.testing.assert_allclose(np.stack([vectors[p] for p in prompts]), expected)


# --------------------------------------------------------------------------- more runs


def test_two_input_files_and_prompt_override(tiny_run, tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    with h5py.File(tiny_run.embed.input, "r") as src:
        names = sorted(src)
        halves = {"a.h5": names[::2], "b.hdf5": names[1::2]}
        for file_name, part in halves.items():
            with h5py.File(folder / file_name, "w") as dst:
                for name in part:
                    src.copy(src[name], dst, name=name)
    prompt = "Stack the red block on the blue one."
    cfg = with_embed(
        tiny_run, input=str(folder), output=str(tmp_path / "emb"), prompt=prompt, num_actors=1
    )
    result = run_embed(cfg)

    rows = read_rows(cfg.embed.output)
    assert result.num_episodes == len(names) and sorted(rows) == names
    for file_name, part in halves.items():
        for name in part:
            assert rows[name]["source_file"] == str(folder / file_name)
    language = build_backbone(cfg.backbone).embed_prompts([prompt])[0]
    for row in rows.values():
        assert row["prompt"] == prompt
        np.testing.assert_allclose(row["language_embedding"], language, atol=1e-6)
    # Frames are the same as in the one-file run, so everything but these columns is too.
    skip = {"source_file", "prompt", "language_embedding"}
    assert_same_rows(rows, read_rows(tiny_run.embed.output), skip=skip)
    assert read_manifest(cfg.embed.output)["input_files"] == sorted(str(folder / n) for n in halves)
    assert leftovers(cfg.embed.output) == []


@pytest.mark.parametrize(
    "calls_per_actor, frames_per_block",
    [(1, 3), (2, 3), (1, 12)],
    ids=["1call", "2calls", "blocks"],
)
def test_two_actors_and_odd_batches_give_the_same_output(
    tiny_run, tmp_path, calls_per_actor, frames_per_block
):
    # Blocks of 3 frames and batches of 5 spread every episode over several batches (and
    # actors, and with two calls per actor, threads), so the episode rows must be
    # reassembled from pieces in any order. Blocks of 12: each call takes 10 frames and
    # the actor runs the backbone on 5 at a time.
    cfg = with_embed(
        tiny_run,
        output=str(tmp_path / "emb"),
        num_actors=2,
        batch_size=5,
        frames_per_block=frames_per_block,
        calls_per_actor=calls_per_actor,
    )
    run_embed(cfg)
    assert_same_rows(read_rows(cfg.embed.output), read_rows(tiny_run.embed.output))
    assert leftovers(cfg.embed.output) == []


def test_episodes_of_different_image_sizes(ray_session, tmp_path):
    # Batches then mix frames of two sizes; Ray Data hands them over as an object array.
    rng = np.random.default_rng(0)
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = "pick"
        for i, size in enumerate([16, 24, 16, 40]):
            f.create_group(f"ep{i}").create_dataset(
                "side_cam", data=rng.integers(0, 256, (6 + i, size, size, 3), dtype=np.uint8)
            )
    cfg = make_config(tmp_path, embed=dict(input=str(path), batch_size=64, frames_per_block=4))
    run_embed(cfg)
    rows = read_rows(cfg.embed.output)
    backbone = build_backbone(cfg.backbone)
    with h5py.File(path, "r") as f:
        for name in f:
            frames = f[name]["side_cam"][()]
            expected = backbone.embed_frames(frames, ["pick"] * len(frames))
            stored = np.reshape(rows[name]["visual_embedding"], expected.shape)
            np.testing.assert_allclose(stored, expected, atol=1e-5, err_msg=name)
            assert rows[name]["success"] is None and rows[name]["stage_boundaries"] == []


def test_small_frames_and_large_embeddings_do_not_fragment(ray_session, tmp_path):
    """16x16 frames embedded to D=4096: the output of a call is 64 times its input. The
    actors write each call's embeddings as one chunk file and hand the driver only records:
    at D=16 and D=4096 alike, no file holds less than a read block on average and the driver
    receives a few hundred bytes per file (the stall this guards against: Ray Data re-cut the
    embeddings into blocks of its target size, sized for the small input, so runs made a
    file per frame or two and crawled at 35 frames/s). Which blocks share a call depends on
    timing, so the file counts of two runs may differ."""
    results = {}
    for dim in (16, 4096):
        cfg = make_config(
            tmp_path / f"d{dim}",
            synth=dict(image_size=16),
            backbone=dict(visual_dim=dim),
            embed=dict(batch_size=16, frames_per_block=8),
        )
        write_synthetic_dataset(cfg.synth)
        result = run_embed(cfg)
        manifest = read_manifest(cfg.embed.output)
        files = len(manifest["chunks"])
        assert files <= math.ceil(result.num_frames / 8), manifest["chunks"]
        assert result.driver_bytes <= 300 * files  # records, not embeddings
        results[dim] = result
    assert results[16].num_frames == results[4096].num_frames
    assert results[4096].driver_bytes < 2 * results[16].driver_bytes


# --------------------------------------------------------------------------- output folder


def test_existing_output_needs_overwrite(tiny_run, tmp_path):
    output = tmp_path / "emb"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        run_embed(with_embed(tiny_run, output=str(output)))
    assert os.listdir(output) == ["keep.txt"] and (output / "keep.txt").read_text() == "old"


def test_overwrite_replaces_the_old_output(tiny_run, tmp_path):
    # A published output is replaced by a second run (other backbone seed): the new
    # manifest names only the new files, and the old ones are gone after the commit. Files
    # that are not rayrm's stay.
    output = tmp_path / "emb"
    first = run_embed(with_backbone(with_embed(tiny_run, output=str(output)), seed=99))
    old = read_manifest(str(output))
    (output / "notes.txt").write_text("mine")
    second = run_embed(with_embed(tiny_run, output=str(output), overwrite=True))
    new = read_manifest(str(output))
    assert first.num_episodes == second.num_episodes and new["run_id"] != old["run_id"]
    assert not set(new["chunks"]) & set(old["chunks"])
    named = {new["episodes"], new["failures"], schema.MANIFEST_NAME, schema.CHUNKS_DIR}
    assert sorted(os.listdir(output)) == sorted(named | {"notes.txt"})
    assert_same_rows(read_rows(str(output)), read_rows(tiny_run.embed.output))
    assert leftovers(str(output)) == []


def test_backbone_failure_in_the_actors_leaves_no_output(tiny_run, tmp_path, monkeypatch):
    importable_everywhere(monkeypatch)
    cfg = with_embed(tiny_run, output=str(tmp_path / "emb"))
    backbone = dataclasses.replace(cfg.backbone, name=FAILING_BACKBONE, options={"fail": "raise"})
    with pytest.raises(Exception, match="failed on purpose"):
        run_embed(dataclasses.replace(cfg, backbone=backbone))
    assert os.listdir(tmp_path) == []  # no output, no run state


def test_non_finite_embeddings_fail_that_episode_only(tiny_run, tmp_path, monkeypatch):
    # One poisoned episode embeds to NaN: it becomes a row of the failures table while the
    # other episodes are embedded and committed; nothing is published (max_failed 0).
    importable_everywhere(monkeypatch)
    path = tmp_path / "raw.h5"
    with h5py.File(tiny_run.embed.input, "r") as src, h5py.File(path, "w") as dst:
        for name in src:
            src.copy(src[name], dst, name=name)
        dst["episode_0005"].attrs["prompt"] = "poison the cube"
    out = tmp_path / "out"
    cfg = with_embed(tiny_run, input=str(path), output=str(out / "emb"))
    backbone = dataclasses.replace(cfg.backbone, name=FAILING_BACKBONE, options={"fail": "nan"})
    cfg = dataclasses.replace(cfg, backbone=backbone)
    with pytest.raises(InvalidEpisodesError, match="episode_0005") as err:
        run_embed(cfg)
    [problem] = err.value.problems
    assert (problem.file, problem.episode, problem.key) == (
        str(path),
        "episode_0005",
        "visual_embedding",
    )
    assert "non-finite" in problem.reason
    # Not published (no manifest); the good episodes are committed for the rerun.
    assert not os.path.exists(out / "emb" / schema.MANIFEST_NAME)
    expected = sorted(set(read_rows(tiny_run.embed.output)) - {"episode_0005"})
    assert partial_ids(cfg.embed.output) == expected  # no chunk of the poisoned episode
    [row] = read_failures(str(out / "emb"))
    assert row["episode"] == "episode_0005" and row["key"] == "visual_embedding"

    # Allowing one failure: the rerun resumes (only the failed episode is embedded again)
    # and publishes the others with the failures table.
    result = run_embed(with_embed(cfg, max_failed_episodes=1))
    assert result.num_failed == 1 and result.num_episodes == len(expected)
    assert result.embedded_frames == read_rows(tiny_run.embed.output)["episode_0005"]["num_frames"]
    assert os.listdir(out) == ["emb"] and leftovers(str(out / "emb")) == []
    assert read_failures(str(out / "emb")) == [row]
    assert read_manifest(str(out / "emb"))["num_failed_episodes"] == 1
    skip = {"source_file", "prompt", "language_embedding"}  # the file and one prompt differ
    rows = read_rows(str(out / "emb"))
    assert_same_rows(rows, {k: read_rows(tiny_run.embed.output)[k] for k in expected}, skip=skip)


def test_failure_before_the_commit_keeps_the_old_output(tiny_run, tmp_path, monkeypatch):
    # A second run over a published output fails after writing every chunk, right before
    # its manifest: readers still see the old output whole; the rerun resumes with nothing
    # left to embed and then replaces it.
    output = str(tmp_path / "emb")
    run_embed(with_backbone(with_embed(tiny_run, output=output), seed=99))
    old_rows = read_rows(output)
    real_commit = rayrm.embed.run.commit

    def broken_commit(folder, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(rayrm.embed.run, "commit", broken_commit)
    cfg = with_embed(tiny_run, output=output, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        run_embed(cfg)
    assert_same_rows(read_rows(output), old_rows)  # the old manifest and its files
    assert partial_ids(output) == sorted(old_rows)  # both runs' chunks are there now

    monkeypatch.setattr(rayrm.embed.run, "commit", real_commit)
    result = run_embed(cfg)
    assert result.embedded_frames == 0 and result.num_episodes == tiny_run.synth.num_episodes
    assert_same_rows(read_rows(output), read_rows(tiny_run.embed.output))
    assert leftovers(output) == []
