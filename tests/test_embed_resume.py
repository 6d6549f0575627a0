"""Resume and exactly-once (rayrm.embed): runs that lose their driver or an actor half-way.

(a) The driver is killed (SIGKILL, as a crash or a preempted node would) once some shards are
    committed; the rerun embeds only the other episodes. (b) An embedding actor's process
    exits on its k-th batch; Ray restarts the actor and retries the batch, and the run
    completes. Either way every episode is in the output exactly once, with the embeddings of
    the uninterrupted run (``tiny_run``; the test backbone is ``tiny`` plus test hooks).
An unfinished folder made with other settings, or holding episodes the input no longer has,
is not resumed (unless ``overwrite`` discards it), nor one another run is writing.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from _drivers import start_driver, wait_for_files, wait_until_no_new_files
from _embed_checks import (
    assert_same_rows,
    committed_chunks,
    leftovers,
    partial_ids,
    read_rows,
    with_backbone,
    with_embed,
)
from _failing_backbone import NAME as FAILING_BACKBONE
from _failing_backbone import importable_everywhere

from rayrm.data import schema
from rayrm.data.chunks import write_chunks
from rayrm.embed import ResumeError, run_embed
from rayrm.embed.ledger import RunFolder
from rayrm.embed.run import embed_settings


def frames_of(rows: dict[str, dict], ids) -> int:
    return sum(rows[i]["num_frames"] for i in ids)


def whole_episodes(output: str, rows: dict[str, dict]) -> set[str]:
    """Episodes whose committed chunks cover all their frames (what a rerun skips)."""
    covered: dict[str, set[int]] = {}
    for episode, start, n in committed_chunks(output):
        covered.setdefault(episode, set()).update(range(start, start + n))
    return {e for e, frames in covered.items() if len(frames) == rows[e]["num_frames"]}


def test_killed_driver_resumes_exactly_once(tiny_run, tmp_path, monkeypatch):
    importable_everywhere(monkeypatch)
    output = str(tmp_path / "emb")
    # Slow batches (tiny + a sleep) and a chunk file per 8 frames: a kill lands half-way.
    cfg = with_backbone(tiny_run, name=FAILING_BACKBONE, options={"delay_s": 0.15})
    cfg = with_embed(cfg, output=output, batch_size=8, frames_per_block=8)
    driver = start_driver("tests._embed_driver", cfg, tmp_path)
    try:
        wait_for_files(os.path.join(output, schema.CHUNKS_DIR), 8, driver, timeout=180)
    finally:
        driver.send_signal(signal.SIGKILL)  # the cluster lives on and reaps the job's actors
        driver.wait()
    assert not os.path.exists(os.path.join(output, schema.MANIFEST_NAME))  # nothing published
    # The job's actors write their own files: a call in flight may still commit one until
    # Ray reaps them. Count what is committed once no file has appeared for 3 s.
    wait_until_no_new_files(os.path.join(output, schema.CHUNKS_DIR), quiet_s=3.0, timeout=120)
    expected = read_rows(tiny_run.embed.output)
    before = whole_episodes(output, expected)
    assert partial_ids(output) and len(before) < len(expected)

    result = run_embed(cfg)  # the rerun, in this process's Ray
    # Only the episodes not whole before are embedded (a half-written one: all of it again).
    assert result.embedded_frames == frames_of(expected, set(expected) - before)
    assert_same_rows(read_rows(output), expected)  # each episode once, same embeddings
    assert leftovers(output) == []


def test_dead_actor_is_restarted_and_its_batch_retried(tiny_run, tmp_path, monkeypatch):
    importable_everywhere(monkeypatch)
    marker = tmp_path / "actor-exited"
    options = {"exit_on_batch": 3, "exit_marker": str(marker)}
    cfg = with_backbone(tiny_run, name=FAILING_BACKBONE, options=options)
    cfg = with_embed(cfg, output=str(tmp_path / "emb"), batch_size=8)
    result = run_embed(cfg)
    assert marker.exists()  # an actor process did exit mid-run
    expected = read_rows(tiny_run.embed.output)
    assert result.embedded_frames == frames_of(expected, expected)
    assert_same_rows(read_rows(cfg.embed.output), expected)


def test_an_unfinished_folder_is_resumed_only_when_it_matches(tiny_run, tmp_path):
    output = str(tmp_path / "emb")
    cfg = with_embed(tiny_run, output=output)
    other = with_backbone(cfg, seed=cfg.backbone.seed + 1)  # other weights, other embeddings
    RunFolder(output).open(embed_settings(other), overwrite=False).close()
    with pytest.raises(ResumeError, match=r"other settings \(backbone: .*'seed': 4"):
        run_embed(cfg)

    # Same settings, but a committed episode the input does not hold (the input changed).
    run = RunFolder(output).open(embed_settings(cfg), overwrite=True)
    ghost = {
        "episode_id": np.array(["ghost"] * 4, dtype=object),
        "frame_index": np.arange(4, dtype=np.int32),
        "visual_embedding": np.zeros((4, 16), np.float32),
    }
    write_chunks(ghost, output, run.run_id)
    run.close()
    with pytest.raises(ResumeError, match=r"1 committed episode\(s\) that are not in the input"):
        run_embed(cfg)

    # Another run holds the folder: refused, and its folder is left alone.
    held = RunFolder(output).open(embed_settings(cfg), overwrite=False)
    try:
        with pytest.raises(FileExistsError, match="another embedding run"):
            run_embed(cfg)
    finally:
        held.close()
    assert partial_ids(output) == ["ghost"]

    run_embed(with_embed(cfg, overwrite=True))  # overwrite discards it and starts again
    assert_same_rows(read_rows(output), read_rows(tiny_run.embed.output))
    assert leftovers(output) == []
