"""``rayrm score``: per-frame rewards in LeRobot's columns, from a generated LeRobot v3
dataset (and the layout function on hand-made curves)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _eval_helpers import make_checkpoint
from _lerobot import LENGTHS, TASKS, TOP, decoded_episode, write_dataset
from conftest import make_config

from rayrm.data import schema
from rayrm.embed import run_embed
from rayrm.evaluate.scorer import RewardScorer
from rayrm.score.frames import Placement, frame_rows, hdf5_placement, with_rabc
from rayrm.score.ledger import PART_RECORD_SCHEMA, PartLedger, ScoreResumeError
from rayrm.score.rabc import rabc_weights
from rayrm.score.run import run_score


def _curves(rows: list[dict]) -> pa.Table:
    names = [
        "episode_id", "kind", "frame_index", "causal", "prefix", "causal_stage_pred",
        "subtask_pred", "success_pred",
    ]  # fmt: skip
    return pa.Table.from_pylist([{n: r[n] for n in names} for r in rows])


def _row(episode_id, n, kind="episode", stages=(), subtask=(), success=()):
    return {
        "episode_id": episode_id,
        "kind": kind,
        "frame_index": list(range(n)),
        "causal": [0.1 * (t + 1) for t in range(n)],
        "prefix": [0.1 * (t + 1) for t in range(n)],
        "causal_stage_pred": list(stages),
        "subtask_pred": list(subtask),
        "success_pred": list(success),
    }


def _place(**episodes):
    return {e: Placement(*where) for e, where in episodes.items()}


def test_frame_rows_lay_out_one_row_per_frame_at_the_given_indices():
    curves = _curves(
        [
            _row("b", 2, stages=[0, 1], subtask=[0.5, 0.25]),
            _row("a", 3, success=[0.0, 0.5, 1.0]),
            _row("a~rewound", 4, kind="rewound"),
        ]
    )
    table = with_rabc(frame_rows(curves, _place(a=(7, 100, 3), b=(3, 10, 2))), 0, 0.01)
    assert table.schema == schema.SCORE_SCHEMA
    assert table.column("index").to_pylist() == [10, 11, 100, 101, 102]  # sorted by index
    assert table.column("episode_index").to_pylist() == [3, 3, 7, 7, 7]
    assert table.column("frame_index").to_pylist() == [0, 1, 0, 1, 2]
    assert table.column("episode_id").to_pylist() == ["b", "b", "a", "a", "a"]
    assert table.column("progress_sparse").to_pylist() == pytest.approx([0.1, 0.2, 0.1, 0.2, 0.3])
    assert table.column("stage").to_pylist() == [0, 1, None, None, None]  # no stages: null
    assert table.column("subtask_progress").to_pylist() == [0.5, 0.25, None, None, None]
    assert table.column("success").to_pylist() == [None, None, 0.0, 0.5, 1.0]  # no head: null
    assert table.column("rabc_weight").null_count == 5  # no rabc_chunk: null


def test_rabc_weights_are_computed_over_the_whole_table():
    curves = _curves([_row("a", 3), _row("b", 2)])
    frames = frame_rows(curves, hdf5_placement(["a", "b"], [3, 2]))
    table = with_rabc(frames, rabc_chunk=1, rabc_kappa=0.05)
    # a: 0.1 0.2 0.3 -> deltas 0.1 0.1 0 (clamped); b: 0.1 0.2 -> 0.1 0: 0.1 > kappa -> 1
    assert table.column("rabc_delta").to_pylist() == pytest.approx([0.1, 0.1, 0.0, 0.1, 0.0])
    weights = table.column("rabc_weight").to_pylist()
    assert weights[0] == weights[1] == weights[3] == 1.0
    assert 0 < weights[2] == weights[4] < 1  # 0 <= delta <= kappa: the soft weight


def test_frame_rows_refuse_short_episodes_and_overlaps():
    with pytest.raises(RuntimeError, match="2 frames scored, 3 expected"):
        frame_rows(_curves([_row("a", 2)]), _place(a=(0, 0, 3)))
    frames = frame_rows(_curves([_row("a", 3), _row("b", 2)]), _place(a=(0, 0, 3), b=(1, 2, 2)))
    with pytest.raises(RuntimeError, match="same index"):
        with_rabc(frames, 0, 0.01)


def test_hdf5_placement_numbers_episodes_in_id_order():
    assert hdf5_placement(["ep_b", "ep_a"], [5, 3]) == _place(ep_a=(0, 0, 3), ep_b=(1, 3, 5))


def test_the_ledger_takes_each_episode_from_one_part_and_checks_its_frames():
    ledger = PartLedger({"a": 3, "b": 2})
    first = pa.table({"part": ["p1", "p1"], "episode_id": ["a", "x"], "num_frames": [3, 9]})
    assert ledger.add(first.cast(PART_RECORD_SCHEMA)) == (3, 1)  # x: not asked for
    again = pa.table({"part": ["p0", "p2"], "episode_id": ["a", "b"], "num_frames": [3, 2]})
    assert ledger.add(again.cast(PART_RECORD_SCHEMA)) == (2, 1)  # a repeat of a: skipped
    assert ledger.parts == {"a": "p1", "b": "p2"} and ledger.missing() == []
    stale = PartLedger({"a": 4})
    with pytest.raises(ScoreResumeError, match="holds 3 frames of episode a, the input has 4"):
        stale.add(first.cast(PART_RECORD_SCHEMA))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory):
    """A generated LeRobot dataset embedded, a random checkpoint over it, and the score of
    its root with RA-BC weights over 2 frames."""
    work = tmp_path_factory.mktemp("score")
    root = write_dataset(work / "ds")
    cfg = make_config(work, embed={"input": root, "camera": TOP, "success_column": "success"})
    run_embed(cfg)
    model = make_checkpoint(cfg, work / "ckpt")
    cfg = dataclasses.replace(
        cfg, score=dataclasses.replace(cfg.score, input=root, checkpoint=model, rabc_chunk=2)
    )
    result = run_score(cfg)
    return cfg, root, model, result


def test_score_writes_lerobot_indices_and_the_online_reward(scored):
    cfg, root, model, result = scored
    assert result.num_episodes == 6 and result.num_frames == sum(LENGTHS)
    frames = pd.read_parquet(result.file)  # as LeRobot's RABCWeights loads it
    data = pd.read_parquet(os.path.join(root, "data/chunk-000/file-000.parquet"))
    # every frame of the dataset once, at LeRobot's own global index
    assert frames["index"].tolist() == data["index"].tolist()
    assert frames["episode_index"].tolist() == data["episode_index"].tolist()
    assert frames["frame_index"].tolist() == data["frame_index"].tolist()
    assert {str(frames[c].dtype) for c in ("index", "episode_index", "frame_index")} == {"int64"}
    scorer = RewardScorer.from_checkpoint(model)
    for i in range(6):
        scorer.reset([TASKS[i % 3]])
        values = [scorer.step(f[None])[0] for f in decoded_episode(root, TOP, i)]
        mine = frames[frames["episode_index"] == i]
        np.testing.assert_allclose(mine["progress_sparse"], values, atol=1e-4)
        np.testing.assert_allclose(mine["prefix"], values, atol=1e-4)
    expected = rabc_weights(
        frames["index"], frames["episode_index"], frames["progress_sparse"], 2, kappa=0.01
    )
    np.testing.assert_allclose(frames["rabc_weight"], expected.weight, atol=1e-6)
    assert frames["stage"].isna().all()  # a continuous model has no stages
    assert frames["subtask_progress"].isna().all()
    assert "progress_dense" not in frames  # rayrm models have one progress head: sparse


def test_score_records_its_provenance(scored):
    cfg, root, model, result = scored
    metadata = pq.read_schema(result.file).metadata
    assert metadata[b"reward_model_path"].decode() == model  # the key LeRobot reads
    record = json.loads(metadata[b"rayrm.score"])
    assert record["checkpoint"] == model and record["dataset"] == root
    assert record["config"]["rabc_chunk"] == 2 and record["rayrm_version"]
    manifest = json.loads(open(os.path.join(cfg.score.output, schema.MANIFEST_NAME)).read())
    assert manifest["file"] == schema.SCORE_FILE and manifest["num_frames"] == sum(LENGTHS)
    assert sorted(os.listdir(cfg.score.output)) == [schema.MANIFEST_NAME, schema.SCORE_FILE]


def test_scoring_the_embeddings_gives_the_same_file(scored, tmp_path):
    cfg, root, _, _ = scored
    again = dataclasses.replace(
        cfg,
        score=dataclasses.replace(
            cfg.score, input=None, dataset=root, output=str(tmp_path / "again")
        ),
    )
    a, b = pd.read_parquet(scored[3].file), pd.read_parquet(run_score(again).file)
    assert a["index"].tolist() == b["index"].tolist()
    np.testing.assert_allclose(a["progress_sparse"], b["progress_sparse"], atol=1e-4)


def test_an_existing_output_needs_overwrite(scored):
    cfg, _, _, _ = scored
    with pytest.raises(FileExistsError, match="score.overwrite"):
        run_score(cfg)


def test_the_progress_line_gives_episodes_frames_rate_and_eta(caplog, monkeypatch):
    from types import SimpleNamespace

    from rayrm import throughput

    clock = iter([100.0, 104.0])  # the start, then the first results: 4 s of start-up
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    episodes = [SimpleNamespace(num_frames=20), SimpleNamespace(num_frames=60)]
    line = throughput.ThroughputLog(episodes, skipped=1, every_s=0.0, verb="scored")
    with caplog.at_level("INFO", logger=throughput.__name__):
        line.update(frames=40, episodes=1)  # all in one batch, as raw input's groupby gives
    # 40 frames in 4 s since the start (not since the first batch: that would be infinite)
    assert "scored 2/3 episodes (1 earlier), 40/80 frames, 10 frames/s, ETA 0m04s" in caplog.text
