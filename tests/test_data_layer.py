"""The shared data-access helpers (rayrm.data) and evaluation's typed curves, without Ray."""

from __future__ import annotations

import pyarrow as pa

from rayrm.data import schema
from rayrm.data.shards import shard_files, task_vectors
from rayrm.evaluate.scoring import ScoredEpisodes


def test_shard_files_lists_chunk_files_of_one_run_or_all(tmp_path):
    chunks = tmp_path / schema.CHUNKS_DIR
    chunks.mkdir()
    for name in ("runA-1.parquet", "runA-2.parquet", "runB-1.parquet", ".runA-3.parquet.x.tmp"):
        (chunks / name).write_bytes(b"")
    assert shard_files(str(tmp_path), "runA") == ["chunks/runA-1.parquet", "chunks/runA-2.parquet"]
    assert len(shard_files(str(tmp_path))) == 3
    assert shard_files(str(tmp_path), "") == []  # a folder not opened yet names no run
    assert shard_files(str(tmp_path / "none")) == []


def test_task_vectors_takes_each_prompt_once_among_the_episodes_asked_for():
    index = pa.table(
        {
            "episode_id": ["a", "b", "c"],
            "prompt": ["red", "green", "red"],
            "language_embedding": [[1.0], [2.0], [3.0]],
        }
    )
    assert task_vectors(index) == {"red": [1.0], "green": [2.0]}
    assert task_vectors(index, ["c"]) == {"red": [3.0]}


def test_safe_name_keeps_a_path_to_one_file():
    assert schema.safe_name("ep/0:1 x") == "ep_0_1_x"


def test_scored_episodes_reads_as_columns_and_by_row_and_kind():
    rows = ScoredEpisodes(
        {"episode_id": ["a", "a@rewound"], "kind": ["episode", "rewound"], "prefix": [[0.1], [0.2]]}
    )
    assert rows["prefix"] == [[0.1], [0.2]] and rows.num_sequences == 2
    assert rows.row(1) == {"episode_id": "a@rewound", "kind": "rewound", "prefix": [0.2]}
    assert rows.indices("episode") == [0]
    assert rows.of_kind("rewound") == {
        "episode_id": ["a@rewound"],
        "kind": ["rewound"],
        "prefix": [[0.2]],
    }
