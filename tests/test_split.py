"""The training split (rayrm.train.trainer.make_split over rayrm.data.shards.split_episodes):
held out by a stable hash, in proportion per outcome, task and failure mode; short episodes and,
with ``only_successful``, failures kept out of training. Pure functions: no Ray."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pyarrow as pa
import pytest
from conftest import make_config

from rayrm.data.shards import ShardError, split_episodes
from rayrm.train.trainer import make_split

TASKS = ["stack the cubes", "open the drawer"]


def episode_index(
    num: int = 60, short: tuple[int, ...] = (), modes: tuple[str, ...] = ("stall", "drop")
) -> pa.Table:
    """``num`` episodes: two tasks, a third of them failed (two failure modes), 20+ frames
    each except the indices in ``short`` (3 frames)."""
    ids = [f"episode_{i:04d}" for i in range(num)]
    success = [i % 3 != 0 for i in range(num)]
    mode = [None if s else modes[i // 3 % len(modes)] for i, s in enumerate(success)]
    return pa.table(
        {
            "episode_id": ids,
            "success": success,
            "num_frames": [3 if i in short else 20 + i % 7 for i in range(num)],
            "prompt": [TASKS[i % 2] for i in range(num)],
            "failure_mode": mode,
        }
    )


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, train={"val_ratio": 0.25, "seed": 5})


def with_train(cfg, **changes):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def rows(index: pa.Table) -> list[dict]:
    return index.to_pylist()


def test_the_split_does_not_depend_on_episode_order(cfg):
    index = episode_index()
    split = make_split(cfg, index)
    shuffled = index.take(pa.array([(7 * i) % len(index) for i in range(len(index))]))
    again = make_split(cfg, shuffled)
    assert split.val == again.val and sorted(split.train) == sorted(again.train)
    assert set(split.val) != set(make_split(with_train(cfg, seed=6), index).val)  # seeded


def test_the_split_is_the_same_in_another_process():
    """The hash is stable across processes (Python's own ``hash`` of a str is not)."""
    index = episode_index()
    ids, success = index.column("episode_id").to_pylist(), index.column("success").to_pylist()
    here = sorted(split_episodes(ids, success, 0.25, 5))
    code = (
        "import json, sys; from rayrm.data.shards import split_episodes; "
        "ids, success = json.load(sys.stdin); "
        "print(json.dumps(sorted(split_episodes(ids, success, 0.25, 5))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    there = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([ids, success]),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert json.loads(there.stdout) == here


def test_each_outcome_task_and_failure_mode_is_held_out_in_proportion(cfg):
    index = episode_index(num=96, modes=("stall", "drop", "wrong_target"))
    split = make_split(cfg, index)
    strata = {}
    for row in rows(index):
        key = (row["prompt"], row["success"], row["failure_mode"])
        strata.setdefault(key, []).append(row["episode_id"])
    assert len(strata) == 2 * (1 + 3)
    for key, members in strata.items():
        held = sum(e in split.val for e in members)
        assert abs(held - 0.25 * len(members)) < 1, (key, held, len(members))
    # and so per outcome: a quarter of the successes and a quarter of the failures
    for flag in (True, False):
        members = [r["episode_id"] for r in rows(index) if r["success"] is flag]
        held = sum(e in split.val for e in members)
        assert abs(held - 0.25 * len(members)) < 1, (flag, held)
    assert sorted(split.train + split.val) == sorted(index.column("episode_id").to_pylist())


def test_only_successful_trains_on_successes_and_validates_on_the_same_episodes(cfg):
    index = episode_index()
    success = dict(zip(index.column("episode_id").to_pylist(), index.column("success")))
    both = make_split(cfg, index)
    only = make_split(with_train(cfg, only_successful=True), index)
    assert any(not success[e].as_py() for e in both.train)
    assert all(success[e].as_py() for e in only.train)
    assert sorted(only.train) == sorted(e for e in both.train if success[e].as_py())
    assert only.val == both.val  # the control is scored on the same held-out episodes
    assert any(not success[e].as_py() for e in only.val)  # failures still held out to score
    assert only.train_frames == sum(only.frames[e] for e in only.train)


def test_episodes_under_four_frames_are_left_out_of_both_sides(cfg, caplog):
    short = (0, 1, 2, 4, 9)
    index = episode_index(short=short)
    with caplog.at_level(logging.WARNING, logger="rayrm.train.trainer"):
        split = make_split(cfg, index)
    short_ids = {f"episode_{i:04d}" for i in short}
    assert not short_ids & set(split.train) and not short_ids & set(split.val)
    assert "skipping 5 episode(s) shorter than 4 frames" in caplog.text
    # the other episodes split as they would without the short ones' being short
    full = make_split(cfg, episode_index())
    assert set(split.val) == set(full.val) - short_ids
    assert set(split.train) == set(full.train) - short_ids


def test_no_episode_long_enough_is_a_clear_error(cfg):
    with pytest.raises(ShardError, match="4 frames a window needs"):
        make_split(cfg, episode_index(num=6, short=tuple(range(6))))
