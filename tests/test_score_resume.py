"""``rayrm score`` resumes and commits exactly once, locally and on S3; SARM's columns.

(a) The scoring driver is killed (SIGKILL) once some part files are committed; the rerun
    scores only the episodes no part holds. (b) On the S3 server, a run whose scoring actor
    fails after two parts stops without publishing; the rerun finishes the job. Either way
    every (episode, frame) is in ``rewards.parquet`` exactly once, with the values of an
    uninterrupted run (``clean``), and nothing of the run's state is left.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal

import numpy as np
import pandas as pd
import pytest
from _drivers import start_driver, wait_for_files, wait_until_no_new_files
from _eval_helpers import make_checkpoint
from _failing_backbone import REPO_ROOT

from rayrm.data import schema, storage
from rayrm.data.shards import read_episode_index
from rayrm.score.ledger import ScoreResumeError, ScoreRun
from rayrm.score.run import run_score
from rayrm.train.checkpoint import load_model

VALUE_COLUMNS = ["progress_sparse", "prefix", "stage", "subtask_progress", "rabc_weight"]
NUM_STAGES = 4


def with_score(cfg, **changes):
    return dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, **changes))


@pytest.fixture(scope="module")
def clean(tiny_run, tmp_path_factory):
    """An uninterrupted run over the embeddings with a SARM checkpoint."""
    work = tmp_path_factory.mktemp("score_clean")
    model = make_checkpoint(tiny_run, work / "ckpt", num_stages=NUM_STAGES)
    cfg = with_score(
        tiny_run,
        input=None,
        embeddings=tiny_run.embed.output,
        checkpoint=model,
        output=str(work / "scores"),
        rabc_chunk=2,
        episodes_per_part=2,
    )
    result = run_score(cfg)
    return cfg, result, pd.read_parquet(result.file)


def expected_frames(cfg) -> dict[str, int]:
    index = read_episode_index(cfg.score.embeddings)
    return dict(zip(index.column("episode_id").to_pylist(), index.column("num_frames").to_pylist()))


def assert_exactly_once(frames: pd.DataFrame, lengths: dict[str, int]) -> None:
    pairs = list(zip(frames["episode_id"], frames["frame_index"]))
    assert len(pairs) == len(set(pairs))  # no frame twice
    assert set(pairs) == {(e, t) for e, n in lengths.items() for t in range(n)}  # none missing
    assert frames["index"].is_unique and frames["index"].is_monotonic_increasing


def assert_same_values(frames: pd.DataFrame, clean_frames: pd.DataFrame) -> None:
    assert frames["index"].tolist() == clean_frames["index"].tolist()
    # Float noise only: the causal scorer steps a call's episodes together, so other
    # batchings give other rounding (~1e-6; RA-BC weights scale it by 1 / (4 sigma)).
    for column in VALUE_COLUMNS:
        np.testing.assert_allclose(frames[column], clean_frames[column], atol=1e-4)


def test_a_sarm_checkpoint_gives_stage_and_subtask_progress(clean):
    cfg, result, frames = clean
    assert result.num_frames == len(frames) == sum(expected_frames(cfg).values())
    assert_exactly_once(frames, expected_frames(cfg))
    assert frames["stage"].between(0, NUM_STAGES - 1).all()
    assert frames["subtask_progress"].notna().all()
    # SARM's total progress is cumulative_prior[stage] + prior[stage] * subtask progress
    model, _ = load_model(cfg.score.checkpoint, "cpu")
    prior = model.stage_prior.numpy()
    cumulative = np.concatenate([[0.0], np.cumsum(prior)[:-1]])
    stage = frames["stage"].to_numpy(int)
    total = cumulative[stage] + prior[stage] * frames["subtask_progress"].to_numpy()
    np.testing.assert_allclose(frames["prefix"], total, atol=1e-5)
    np.testing.assert_allclose(frames["progress_sparse"], frames["prefix"], atol=1e-5)


# --------------------------------------------------------------------------- killed driver


def parts_folder(output: str) -> str:
    return os.path.join(output, schema.RUN_DIR, schema.SCORE_PARTS_DIR)


def parts(output: str) -> list[str]:
    folder = parts_folder(output)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def committed_episodes(output: str) -> set[str]:
    """Episodes an unfinished run's parts hold (local or URL)."""
    run_file = storage.join(output, schema.RUN_DIR, schema.SCORE_RUN_FILE)
    run = ScoreRun(output, run_id=storage.read_json(run_file)["run_id"])
    return set(run.committed().column("episode_id").to_pylist())


def test_killed_driver_resumes_exactly_once(clean, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    cfg, _, clean_frames = clean
    output = str(tmp_path / "scores")
    cfg = with_score(cfg, output=output, episodes_per_part=1)  # a part per episode
    driver = start_driver("tests._score_driver", cfg, tmp_path, "--slow")
    try:
        wait_for_files(parts_folder(output), 3, driver, timeout=240)
    finally:
        driver.send_signal(signal.SIGKILL)  # the cluster lives on and reaps the job's actors
        driver.wait()
    wait_until_no_new_files(parts_folder(output), quiet_s=3.0, timeout=120)
    assert not os.path.exists(os.path.join(output, schema.MANIFEST_NAME))  # nothing published
    lengths = expected_frames(cfg)
    before = committed_episodes(output)
    assert 3 <= len(before) < len(lengths), (before, open(tmp_path / "driver.log").read())

    result = run_score(cfg)  # the rerun, in this process's Ray
    assert result.scored_frames == sum(n for e, n in lengths.items() if e not in before)
    frames = pd.read_parquet(result.file)
    assert_exactly_once(frames, lengths)
    assert_same_values(frames, clean_frames)
    assert sorted(os.listdir(output)) == [schema.MANIFEST_NAME, schema.SCORE_FILE]


# --------------------------------------------------------------------------- S3


def test_a_failed_run_on_s3_resumes_exactly_once(clean, s3_server, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    # by the name Ray's workers import it under (the repository root is on their sys.path)
    from tests._score_writers import FailingPartWriter

    cfg, _, clean_frames = clean
    bucket = "score-resume"
    output = f"{s3_server.create_bucket(bucket)}/scores"
    cfg = with_score(cfg, output=output, episodes_per_part=2)
    with pytest.raises(Exception, match="scoring failed on purpose"):
        run_score(with_score(cfg, max_actor_restarts=0), writer=FailingPartWriter)
    keys = s3_server.list_keys(bucket, "scores/")
    committed = [k for k in keys if f"/{schema.SCORE_PARTS_DIR}/" in k]
    assert len(committed) == 2 and f"scores/{schema.MANIFEST_NAME}" not in keys

    # A retried call's copy of a committed part, as a dead actor's retry would leave it.
    first = f"s3://{bucket}/{committed[0]}"
    storage.write_bytes(first.replace(".parquet", "0.parquet"), storage.read_bytes(first))
    lengths = expected_frames(cfg)
    before = committed_episodes(output)
    assert len(before) == 4  # two parts of two episodes (and a copy of one)
    result = run_score(cfg)
    assert result.scored_frames == sum(n for e, n in lengths.items() if e not in before)
    frames = pd.read_parquet(io.BytesIO(storage.read_bytes(result.file)))
    assert_exactly_once(frames, lengths)
    assert_same_values(frames, clean_frames)
    # (pyarrow leaves a "folder/" marker where it deleted a folder's last file)
    assert [k for k in sorted(s3_server.list_keys(bucket, "scores/")) if k[-1] != "/"] == [
        f"scores/{schema.MANIFEST_NAME}",
        f"scores/{schema.SCORE_FILE}",
    ]


def test_an_unfinished_run_with_other_settings_is_not_resumed(clean, tmp_path):
    cfg, _, _ = clean
    output = str(tmp_path / "scores")
    ScoreRun(output).open({"format": schema.SCORE_FORMAT, "checkpoint": "other"}, False)
    with pytest.raises(ScoreResumeError, match="other settings .*checkpoint"):
        run_score(with_score(cfg, output=output))
    result = run_score(with_score(cfg, output=output, overwrite=True))  # discards it
    assert_same_values(pd.read_parquet(result.file), clean[2])
