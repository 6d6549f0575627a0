"""Stage labels (rayrm.stages, rayrm annotate) and annotation videos (rayrm annotate-video)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from rayrm.annotate.labels import (
    StageAnnotationError,
    parse_stage_json,
    run_annotate,
    stage_json_from_hdf5,
)
from rayrm.annotate.videos import run_annotate_video
from rayrm.cli import main
from rayrm.config import AnnotateConfig
from rayrm.data import schema
from rayrm.data.shards import episodes_from_table, read_episodes, read_manifest
from rayrm.stages import cumulative_prior, stage_labels, stage_priors, stage_progress
from rayrm.video import count_mp4_frames

# --- the math, by hand -------------------------------------------------------------------


def test_stage_labels_by_hand():
    # T = 10, boundaries [3, 7]: stages span [0, 3), [3, 7), [7, 10)
    stage, subtask = stage_labels([3, 7], 10)
    assert stage.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    expected = [1 / 3, 2 / 3, 1, 1 / 4, 2 / 4, 3 / 4, 1, 1 / 3, 2 / 3, 1]
    np.testing.assert_allclose(subtask, expected, rtol=1e-6)
    assert stage.dtype == np.int32 and subtask.dtype == np.float32
    # one-frame stages and a single stage
    assert stage_labels([1, 2], 3)[0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(stage_labels([1, 2], 3)[1], [1, 1, 1])
    np.testing.assert_allclose(stage_labels([], 4)[1], [0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="empty stage"):
        stage_labels([3, 3], 10)


def test_stage_priors_by_hand():
    a = [0, 0, 1, 1, 1, 1]  # shares 2/6, 4/6
    b = [0, 1, 1, 1]  # shares 1/4, 3/4
    # SARM paper: mean of the per-episode shares; frame: share of all frames
    np.testing.assert_allclose(stage_priors([a, b], 2), [7 / 24, 17 / 24])
    np.testing.assert_allclose(stage_priors([a, b], 2, "frame"), [3 / 10, 7 / 10])
    np.testing.assert_allclose(stage_priors([a, [], b], 3), [7 / 24, 17 / 24, 0])  # [] skipped
    np.testing.assert_allclose(cumulative_prior([0.2, 0.3, 0.5]), [0, 0.2, 0.5])
    np.testing.assert_allclose(
        stage_progress([0, 1, 2], [0.5, 1.0, 0.2], [0.2, 0.3, 0.5]), [0.1, 0.5, 0.6]
    )
    with pytest.raises(ValueError, match="mode"):
        stage_priors([a], 2, "frames_weighted")
    with pytest.raises(ValueError, match="no annotated episode"):
        stage_priors([[], []], 2)


# --- parsing and validation --------------------------------------------------------------


def test_both_json_forms_and_how_k_is_found():
    cfg = AnnotateConfig()
    seed = parse_stage_json({"a": [3, 7], "b": [2, 5], "c": [4]}, cfg)
    assert seed.num_stages == 3 and seed.stage_names == ["stage_1", "stage_2", "stage_3"]
    named = {"stages": ["reach", "grasp", "move"], "episodes": {"a": [3, 7], "b": [2.0, 5]}}
    parsed = parse_stage_json(named, cfg)
    assert parsed.num_stages == 3 and parsed.stage_names == ["reach", "grasp", "move"]
    assert parsed.boundaries == {"a": [3, 7], "b": [2, 5]}
    names = dataclasses.replace(cfg, stage_names=["x", "y", "z", "w"])
    assert parse_stage_json({"a": [1, 2, 3]}, names).stage_names == ["x", "y", "z", "w"]
    assert parse_stage_json({"a": [3]}, dataclasses.replace(cfg, num_stages=3)).num_stages == 3


def test_every_problem_is_reported_naming_its_episode():
    from rayrm.annotate.labels import check_annotations

    stages = parse_stage_json(
        {
            "good": [3, 7],
            "count": [3],  # wrong boundary count
            "zero": [0, 7],  # out of range (stage 1 would be empty)
            "late": [3, 10],  # out of range: T = 10
            "order": [7, 3],  # not increasing
            "same": [4, 4],  # not strictly increasing
            "ghost": [3, 7],  # not in the embeddings
        },
        AnnotateConfig(num_stages=3),
    )
    frames = {e: 10 for e in ["good", "count", "zero", "late", "order", "same", "missing"]}
    with pytest.raises(StageAnnotationError) as err:
        check_annotations(stages, frames, allow_unannotated=False)
    problems = err.value.problems
    assert len(problems) == 7, problems
    expected = [
        ("count", "1 boundaries, expected 2"),
        ("zero", "outside 1..T-1"),
        ("late", "outside 1..T-1"),
        ("order", "not strictly increasing"),
        ("same", "not strictly increasing"),
        ("ghost", "not in the embeddings"),
        ("missing", "not annotated"),
    ]
    for episode, reason in expected:
        assert any(p.startswith(f"episode {episode}:") and reason in p for p in problems), (
            episode,
            problems,
        )
    assert str(err.value).count("\n") == 7  # a header line, then one line per problem
    # unannotated episodes are allowed on request
    ok = parse_stage_json({"good": [3, 7]}, AnnotateConfig())
    assert check_annotations(ok, {"good": 10, "missing": 10}, allow_unannotated=True) == ["missing"]


def test_malformed_json_is_rejected():
    cfg = AnnotateConfig()
    with pytest.raises(StageAnnotationError, match="top level"):
        parse_stage_json([[1, 2]], cfg)
    with pytest.raises(StageAnnotationError) as err:
        parse_stage_json({"a": "3,7", "b": [3.5, 7], "c": [True, 4], "d": [3, 7]}, cfg)
    assert [p.split(":")[0] for p in err.value.problems] == ["episode a", "episode b", "episode c"]
    with pytest.raises(StageAnnotationError, match="not unique"):
        parse_stage_json({"stages": ["a", "a"], "episodes": {"x": [3]}}, cfg)
    with pytest.raises(StageAnnotationError, match="num_stages=3"):
        named = {"stages": ["a", "b"], "episodes": {"x": [3, 5]}}
        parse_stage_json(named, dataclasses.replace(cfg, num_stages=3))


# --- on real shards ----------------------------------------------------------------------


@pytest.fixture
def shards(tiny_run, tmp_path):
    """A private copy of the session's embeddings, and the synthetic ground truth."""
    path = str(tmp_path / "embeddings")
    shutil.copytree(tiny_run.embed.output, path)
    truth = stage_json_from_hdf5([tiny_run.synth.output])
    return path, truth


def _folder_state(path):
    return {
        os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(path)
        for f in files
    }


def test_synth_ground_truth_covers_the_successful_episodes(tiny_run, shards):
    import h5py

    _, truth = shards
    with h5py.File(tiny_run.synth.output, "r") as f:
        successes = {n for n in f if f[n].attrs["success"]}
        assert set(truth) == successes and len(successes) < len(f)
        for name, bounds in truth.items():
            assert bounds == f[name].attrs["stage_boundaries"].tolist() and len(bounds) == 3


def test_annotate_writes_the_labels_atomically(shards, tmp_path):
    path, truth = shards
    stage_file = tmp_path / "stages.json"
    stage_file.write_text(
        json.dumps({"stages": ["reach", "grasp", "move", "place"], "episodes": truth})
    )
    cfg = AnnotateConfig(stages=str(stage_file), embeddings=path, allow_unannotated=True)
    result = run_annotate(cfg)
    assert result.num_stages == 4 and result.annotated == len(truth)
    manifest = read_manifest(path)
    assert manifest["num_stages"] == 4
    assert manifest["stage_names"] == ["reach", "grasp", "move", "place"]
    assert manifest["stage_annotation"]["unannotated_episodes"] == result.unannotated
    chunks_before = manifest["chunks"]
    table = read_episodes(path)
    for row in table.select(["episode_id", "num_frames", "stage", "subtask_progress"]).to_pylist():
        if row["episode_id"] in truth:
            stage, subtask = stage_labels(truth[row["episode_id"]], row["num_frames"])
            assert row["stage"] == stage.tolist()
            np.testing.assert_allclose(row["subtask_progress"], subtask)
        else:
            assert row["stage"] == [] and row["subtask_progress"] == []
    batch = episodes_from_table(table)  # the training reader sees flat labels, -1 unlabelled
    assert batch.stage is not None and (batch.stage >= 0).sum() == sum(
        n for e, n in zip(batch.episode_ids, batch.lengths) if e in truth
    )
    # The labels live in a new episodes table; the chunk files are the same, and the old
    # episodes table is gone after the commit.
    tables = [n for n in os.listdir(path) if n.startswith(schema.EPISODES_PREFIX)]
    assert tables == [manifest["episodes"]] and manifest["chunks"] == chunks_before
    # Re-annotating replaces the labels (no duplicate columns).
    one = next(iter(truth))
    stage_file.write_text(json.dumps({one: truth[one]}))
    run_annotate(cfg)
    table = read_episodes(path)
    assert table.column_names.count("stage") == 1
    assert sum(len(s) > 0 for s in table.column("stage").to_pylist()) == 1


def test_bad_annotations_leave_the_shards_untouched(shards, tmp_path, caplog):
    path, truth = shards
    before = _folder_state(path)
    stage_file = tmp_path / "stages.json"
    bad = dict(truth)
    first = sorted(bad)[0]
    bad[first] = [5, 2, 9]
    stage_file.write_text(json.dumps(bad))
    cfg = AnnotateConfig(stages=str(stage_file), embeddings=path)
    with pytest.raises(StageAnnotationError) as err:
        run_annotate(cfg)
    assert any(p.startswith(f"episode {first}:") for p in err.value.problems)
    assert sum("not annotated" in p for p in err.value.problems) == 12 - len(truth)
    assert _folder_state(path) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    # The CLI says the same and exits 2.
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        code = main(
            ["annotate", "--annotate.stages", str(stage_file), "--annotate.embeddings", path]
        )
    assert code == 2 and f"episode {first}" in caplog.text
    assert _folder_state(path) == before


def test_annotate_video_numbers_every_frame(tiny_run, tmp_path):
    import h5py

    with h5py.File(tiny_run.synth.output, "r") as f:
        names = sorted(f)[:2]
        lengths = [len(f[n]["side_cam"]) for n in names]
    cfg = AnnotateConfig(
        input=tiny_run.synth.output,
        video_output=str(tmp_path / "videos"),
        episodes=names,
        min_size=64,
        contact_every=2,
        contact_columns=4,
    )
    result = run_annotate_video(cfg)
    assert result.num_episodes == 2 and result.num_frames == sum(lengths)
    for name, length in zip(names, lengths):
        assert count_mp4_frames(str(tmp_path / "videos" / f"{name}.mp4")) == length
        sheet = Image.open(tmp_path / "videos" / f"{name}_contact.png")
        tiles = len(range(0, length, 2)) + (0 if (length - 1) % 2 == 0 else 1)
        rows = -(-tiles // 4)
        assert sheet.size == (4 * (32 + 2) + 2, rows * (32 + 2) + 2)  # 32 px tiles, 2 px gaps
    template = json.load(open(tmp_path / "videos" / "stages_template.json"))
    assert template["episodes"] == {n: [] for n in names}
    with pytest.raises(ValueError, match="nosuch"):
        run_annotate_video(dataclasses.replace(cfg, episodes=["nosuch"]))
