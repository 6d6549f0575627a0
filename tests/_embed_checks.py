"""Checks shared by the embedding tests: read an output back, compare two outputs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq

from rayrm.data import schema
from rayrm.embed import FAILURES_NAME, partial_dir


def read_rows(output: str) -> dict[str, dict]:
    """Episode id -> row; fails when an id appears twice (exactly once, not at least once)."""
    rows = pq.read_table(os.path.join(output, schema.SHARDS_DIR)).to_pylist()
    ids = [row["episode_id"] for row in rows]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    return {row["episode_id"]: row for row in rows}


def read_json(folder: str, name: str):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def read_failures(folder: str) -> list[dict]:
    return read_json(folder, FAILURES_NAME)


def leftovers(folder) -> list[str]:
    """Hidden folders of an embedding run (``.<output>.partial``, ``.old-*``) in ``folder``."""
    return [n for n in os.listdir(folder) if ".partial" in n or ".old-" in n]


def partial_ids(output: str) -> list[str]:
    """Episode ids committed in an unfinished run's folder (sorted, repeats kept)."""
    shards = os.path.join(partial_dir(output), schema.SHARDS_DIR)
    files = [os.path.join(shards, n) for n in os.listdir(shards)]
    ids = [i for f in files for i in pq.read_table(f, columns=["episode_id"]).column(0).to_pylist()]
    return sorted(ids)


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
