"""Checks shared by the embedding tests: read an output back, compare two outputs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq

from rayrm.data import schema
from rayrm.data.shards import read_episodes, read_manifest
from rayrm.embed import run_dir
from rayrm.embed.ledger import FAILURES_FILE


def read_rows(output: str) -> dict[str, dict]:
    """Episode id -> whole-episode row, as readers see it; fails when an id appears twice
    (exactly once, not at least once)."""
    rows = read_episodes(output).to_pylist()
    ids = [row["episode_id"] for row in rows]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    return {row["episode_id"]: row for row in rows}


def read_json(folder: str, name: str):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def read_failures(output: str) -> list[dict]:
    """The failures table of a published output, else of its unfinished run."""
    if os.path.exists(os.path.join(output, schema.MANIFEST_NAME)):
        return read_json(output, read_manifest(output)["failures"])
    return read_json(run_dir(output), FAILURES_FILE)


def leftovers(output: str) -> list[str]:
    """What a finished run must not leave in its output: its run state, temporary files,
    chunk files or tables no manifest names."""
    if not os.path.isdir(output):
        return []
    found = [n for n in os.listdir(output) if n == schema.RUN_DIR or n.endswith(".tmp")]
    if os.path.exists(os.path.join(output, schema.MANIFEST_NAME)):
        manifest = read_manifest(output)
        named = {manifest["episodes"], manifest["failures"], *manifest["chunks"]}
        chunks = os.path.join(output, schema.CHUNKS_DIR)
        ours = (
            [f"{schema.CHUNKS_DIR}/{n}" for n in os.listdir(chunks)]
            if os.path.isdir(chunks)
            else []
        )
        ours += [n for n in os.listdir(output) if n.startswith(("episodes-", "failures-"))]
        found += [n for n in ours if n not in named]
    return sorted(found)


def committed_chunks(output: str) -> list[tuple[str, int, int]]:
    """(episode id, frame start, frames) of every chunk an unfinished run committed, sorted
    (repeats kept)."""
    chunks = os.path.join(output, schema.CHUNKS_DIR)
    names = (
        [n for n in os.listdir(chunks) if n.endswith(".parquet")] if os.path.isdir(chunks) else []
    )
    rows = []
    for name in names:
        table = pq.read_table(
            os.path.join(chunks, name), columns=["episode_id", "frame_start", "num_frames"]
        )
        rows += zip(*(table.column(c).to_pylist() for c in table.column_names))
    return sorted(rows)


def partial_ids(output: str) -> list[str]:
    """Episode ids with at least one committed chunk in an unfinished run (sorted, once)."""
    return sorted({episode for episode, _, _ in committed_chunks(output)})


def with_embed(cfg, **changes):
    return dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, **changes))


def with_backbone(cfg, **changes):
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, **changes))


def assert_same_rows(actual: dict[str, dict], expected: dict[str, dict], skip=()) -> None:
    assert sorted(actual) == sorted(expected)
    for episode_id, row in actual.items():
        for column in schema.EPISODE_SCHEMA.names:
            if column in skip:
                continue
            if column == "visual_embedding":
                np.testing.assert_allclose(
                    row[column], expected[episode_id][column], atol=1e-5, err_msg=episode_id
                )
            else:
                assert row[column] == expected[episode_id][column], (episode_id, column)
