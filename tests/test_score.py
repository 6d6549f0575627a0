"""``rayrm score``: per-frame rewards in LeRobot's columns, from a generated LeRobot v3
dataset (and the layout function on hand-made curves)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _eval_helpers import make_checkpoint
from _lerobot import LENGTHS, TASKS, TOP, decoded_episode, write_dataset
from conftest import make_config

from rayrm.data import schema
from rayrm.embed import run_embed
from rayrm.evaluate.scorer import RewardScorer
from rayrm.score.rabc import rabc_weights
from rayrm.score.run import frame_table, hdf5_placement, run_score


def _curves(rows: list[dict]) -> dict[str, list]:
    names = ["episode_id", "kind", "frame_index", "causal", "prefix", "causal_stage_pred"]
    return {n: [r[n] for r in rows] for n in names}


def _row(episode_id, n, kind="episode", stages=()):
    return {
        "episode_id": episode_id,
        "kind": kind,
        "frame_index": list(range(n)),
        "causal": [0.1 * (t + 1) for t in range(n)],
        "prefix": [0.1 * (t + 1) for t in range(n)],
        "causal_stage_pred": list(stages),
    }


def test_frame_table_lays_out_one_row_per_frame_at_the_given_indices():
    curves = _curves(
        [_row("b", 2, stages=[0, 1]), _row("a", 3), _row("a~rewound", 4, kind="rewound")]
    )
    table = frame_table(curves, {"a": (7, 100), "b": (3, 10)})
    assert table.schema == schema.SCORE_SCHEMA
    assert table.column("index").to_pylist() == [10, 11, 100, 101, 102]  # sorted by index
    assert table.column("episode_index").to_pylist() == [3, 3, 7, 7, 7]
    assert table.column("frame_index").to_pylist() == [0, 1, 0, 1, 2]
    assert table.column("episode_id").to_pylist() == ["b", "b", "a", "a", "a"]
    assert table.column("progress_sparse").to_pylist() == pytest.approx([0.1, 0.2, 0.1, 0.2, 0.3])
    assert table.column("stage").to_pylist() == [0, 1, None, None, None]  # no stages: null
    assert table.column("rabc_weight").null_count == 5  # no rabc_chunk: null


def test_frame_table_adds_rabc_weights_over_the_whole_table():
    curves = _curves([_row("a", 3), _row("b", 2)])
    table = frame_table(curves, hdf5_placement(["a", "b"], [3, 2]), rabc_chunk=1, rabc_kappa=0.05)
    # a: 0.1 0.2 0.3 -> deltas 0.1 0.1 0 (clamped); b: 0.1 0.2 -> 0.1 0: 0.1 > kappa -> 1
    assert table.column("rabc_delta").to_pylist() == pytest.approx([0.1, 0.1, 0.0, 0.1, 0.0])
    weights = table.column("rabc_weight").to_pylist()
    assert weights[0] == weights[1] == weights[3] == 1.0
    assert 0 < weights[2] == weights[4] < 1  # 0 <= delta <= kappa: the soft weight


def test_frame_table_refuses_repeats_and_gaps():
    with pytest.raises(RuntimeError, match="scored twice"):
        frame_table(_curves([_row("a", 3), _row("a", 3)]), {"a": (0, 0)})
    with pytest.raises(RuntimeError, match="not scored"):
        frame_table(_curves([_row("a", 3)]), {"a": (0, 0), "b": (1, 3)})
    with pytest.raises(RuntimeError, match="same index"):
        frame_table(_curves([_row("a", 3), _row("b", 2)]), {"a": (0, 0), "b": (1, 2)})


def test_hdf5_placement_numbers_episodes_in_id_order():
    assert hdf5_placement(["ep_b", "ep_a"], [5, 3]) == {"ep_a": (0, 0), "ep_b": (1, 3)}


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
    frames = pd.read_parquet(cfg.score.output)  # as LeRobot's RABCWeights loads it
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


def test_score_records_its_provenance(scored):
    cfg, root, model, _ = scored
    metadata = pq.read_schema(cfg.score.output).metadata
    assert metadata[b"reward_model_path"].decode() == model  # the key LeRobot reads
    record = json.loads(metadata[b"rayrm.score"])
    assert record["checkpoint"] == model and record["dataset"] == root
    assert record["config"]["rabc_chunk"] == 2 and record["rayrm_version"]


def test_scoring_the_embeddings_gives_the_same_file(scored, tmp_path):
    cfg, root, _, _ = scored
    again = dataclasses.replace(
        cfg,
        score=dataclasses.replace(
            cfg.score, input=None, dataset=root, output=str(tmp_path / "again.parquet")
        ),
    )
    run_score(again)
    a, b = pd.read_parquet(cfg.score.output), pd.read_parquet(again.score.output)
    assert a["index"].tolist() == b["index"].tolist()
    np.testing.assert_allclose(a["progress_sparse"], b["progress_sparse"], atol=1e-4)


def test_an_existing_output_needs_overwrite(scored):
    cfg, _, _, _ = scored
    with pytest.raises(FileExistsError, match="score.overwrite"):
        run_score(cfg)
