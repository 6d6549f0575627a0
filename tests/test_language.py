"""Language that matters: synthetic episodes of several tasks, and the evaluation's per-task
final value with the true and with a wrong instruction (model beside the blind control)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rayrm.config import SynthConfig, load_config
from rayrm.data import synthetic
from rayrm.data.shards import episodes_from_table, read_episodes
from rayrm.evaluate.curves import final_values
from rayrm.evaluate.report import instruction_metrics, instruction_summary, metrics_lines
from rayrm.evaluate.run import run_evaluate
from rayrm.evaluate.scoring import score_episodes, wrong_instructions
from rayrm.train.checkpoint import load_model
from tests._eval_helpers import make_checkpoint
from tests.conftest import make_config

TASKS = ["red", "green"]
PROMPTS = [synthetic.TASK_PROMPT.format(c) for c in TASKS]


# --- synthetic tasks ---------------------------------------------------------------------


def _digest(path) -> str:
    """Attributes, camera bytes and rounded pose/action of every episode of a file."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for key, value in sorted(f.attrs.items()):
            h.update(f"{key}={np.asarray(value).tolist()!r}".encode())
        for name in f:
            group = f[name]
            for key, value in sorted(group.attrs.items()):
                h.update(f"{name}.{key}={np.asarray(value).tolist()!r}".encode())
            for key in ("side_cam", "wrist_cam"):
                h.update(group[key][()].tobytes())
            for key in ("tcp_pose", "action"):
                h.update(np.round(group[key][()], 4).tobytes())
    return h.hexdigest()


def test_one_task_default_is_unchanged(tmp_path):
    """Pinned from the generator before tasks existed: the demo keeps its data and figures."""
    cfg = SynthConfig(
        num_episodes=3,
        image_size=16,
        min_stage_frames=2,
        max_stage_frames=3,
        failure_fraction=0.34,
        seed=5,
    )
    path = synthetic.write_synthetic_dataset(cfg, tmp_path / "one.h5")
    assert _digest(path) == "bb6b8414385cc0f4c42a932d6273ce756b66255461a10eba0c6339052bb43d1d"


def test_tasks_differ_only_in_the_cube_colour():
    cfg = SynthConfig(image_size=32)
    red = synthetic.make_episode(np.random.default_rng([4, 2]), cfg, "none", "red")
    green = synthetic.make_episode(np.random.default_rng([4, 2]), cfg, "none", "green")
    np.testing.assert_array_equal(red["cube_xy"], green["cube_xy"])  # same scene and motion
    changed = np.any(red["side_cam"] != green["side_cam"], axis=-1)  # [T, H, W]
    assert changed.any()
    # Only pixels near the cube change (noise is the same draw for both).
    size = cfg.image_size
    for t in range(len(changed)):
        rows, cols = np.nonzero(changed[t])
        if len(rows):
            cx, cy = red["cube_xy"][t] * size
            assert np.abs(cols + 0.5 - cx).max() <= 0.06 * size + 1
            assert np.abs(rows + 0.5 - cy).max() <= 0.06 * size + 1


def test_tasks_are_spread_over_successes_and_failures(tmp_path):
    cfg = SynthConfig(num_episodes=13, image_size=16, failure_fraction=0.4, seed=2, tasks=TASKS)
    path = synthetic.write_synthetic_dataset(cfg, tmp_path / "multi.h5")
    with h5py.File(path, "r") as f:
        assert "prompt" not in f.attrs  # no file-wide prompt: each episode has its own
        found = [(g.attrs["prompt"], bool(g.attrs["success"])) for g in f.values()]
        first_frames = {name: f[name]["side_cam"][0] for name in f}
        prompts = {name: f[name].attrs["prompt"] for name in f}
    counts = Counter(found)
    for success in (True, False):
        per_task = [counts[(p, success)] for p in PROMPTS]
        assert max(per_task) - min(per_task) <= 1 and min(per_task) >= 1, counts
    # the prompt names the colour the frames show
    for name, frame in first_frames.items():
        for colour in TASKS:
            near = np.abs(frame.astype(int) - synthetic.CUBE_COLORS[colour]).max(-1) < 30
            assert near.any() == (prompts[name] == synthetic.TASK_PROMPT.format(colour)), name
    again = synthetic.write_synthetic_dataset(cfg, tmp_path / "again.h5")
    assert _digest(again) == _digest(path)  # deterministic from the seed
    reseeded = synthetic.plan_tasks(dataclasses.replace(cfg, seed=3), ["none"] * 13)
    assert reseeded != synthetic.plan_tasks(cfg, ["none"] * 13)


@pytest.mark.parametrize("tasks", [["red", "blue-ish"], ["red", "red"]])
def test_bad_tasks_are_refused(tasks):
    with pytest.raises(ValueError, match="synth.tasks"):
        synthetic.validate_config(SynthConfig(tasks=tasks))


def test_multitask_demo_config_parses():
    cfg = load_config("configs/demo_multitask.yaml")
    assert len(cfg.synth.tasks) >= 2 and cfg.train.mismatch_prob == 0.2
    synthetic.validate_config(cfg.synth)


# --- the table by hand -------------------------------------------------------------------


def _rows(final_wrong: list) -> dict[str, list]:
    return {
        "kind": ["episode"] * 4 + ["rewound"],
        "prompt": ["a", "a", "b", "b", "a"],
        "success": [True, False, True, True, None],
        "prefix": [[0.1, 0.9], [0.3], [0.2, 0.8], [0.6], [0.5]],
        "final_wrong": final_wrong,
    }


def test_instruction_table_by_hand():
    table = instruction_metrics(_rows([0.2, 0.3, 0.5, 0.7, None]))
    found = {(r["task"], r["outcome"]): r for r in table}
    assert found[("a", "success")]["final_true"] == pytest.approx(0.9)
    assert found[("a", "success")]["gap"] == pytest.approx(0.7)
    assert found[("a", "failure")]["true_above_wrong"] == 0.0  # 0.3 vs 0.3: not above
    b = found[("b", "success")]
    assert b["num_episodes"] == 2 and b["final_wrong"] == pytest.approx(0.6)
    assert b["true_above_wrong"] == 0.5  # 0.8 > 0.5, 0.6 < 0.7
    everything = found[("all tasks", "success")]
    assert everything["num_episodes"] == 3
    assert everything["final_true"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    assert found[("b", "failure")]["num_episodes"] == 0
    assert found[("b", "failure")]["final_true"] is None


def test_one_task_gives_a_note_not_a_number(caplog):
    rows = _rows([None] * 5)
    rows["prompt"] = ["a"] * 5
    summary = instruction_summary(rows, rows)
    assert summary["model"] is None and summary["blind"] is None
    assert ">= 2 tasks" in summary["note"] and summary["tasks"] == ["a"]
    assert any(">= 2 tasks" in line for line in metrics_lines({}, None, summary))
    with caplog.at_level(logging.INFO, logger="rayrm.evaluate.scoring"):
        assert wrong_instructions({"a": [1.0, 2.0]}) is None
    assert "needs >= 2 tasks" in caplog.text


# --- a real run --------------------------------------------------------------------------


def _reads_language(checkpoint: str) -> str:
    """Random weights barely notice a one-word change of the prompt (final values move by
    ~1e-4); amplified language projection weights make a checkpoint whose language path
    clearly matters, so a wrong instruction that is not fed would show."""
    path = os.path.join(checkpoint, "model.safetensors")
    state = load_file(path)
    state["language_proj.weight"] = state["language_proj.weight"] * 50
    save_file(state, path)
    return checkpoint


@pytest.fixture(scope="module")
def multitask_eval(tmp_path_factory, ray_session):
    from rayrm.embed import run_embed

    work = tmp_path_factory.mktemp("multitask")
    cfg = make_config(work, synth={"tasks": TASKS, "num_episodes": 8})
    synthetic.write_synthetic_dataset(cfg.synth)
    run_embed(cfg)
    model = _reads_language(make_checkpoint(cfg, work / "model"))
    blind = make_checkpoint(cfg, work / "blind", blind=True, seed=1)
    evaluate = dataclasses.replace(
        cfg.evaluate,
        output=str(work / "eval"),
        blind_checkpoint=blind,
        episode_figures=1,
        videos=0,
    )
    cfg = dataclasses.replace(cfg, evaluate=evaluate)
    return cfg, model, run_evaluate(cfg, checkpoint=model, title="multitask")


def _shard_batch(cfg):
    return episodes_from_table(read_episodes(cfg.embed.output))


def test_wrong_instruction_is_fed(multitask_eval):
    """final_wrong is the last prefix value with the other task's instruction, recomputed
    here through ``prefix_curve``; random weights read the instruction, so it differs from the
    true one, while the blind control (zeros) gives the same value under both."""
    cfg, checkpoint, result = multitask_eval
    model, _ = load_model(checkpoint)
    batch = _shard_batch(cfg)
    language = {p: batch.language[batch.prompts.index(p)] for p in PROMPTS}
    rows, gaps = result.rows, []
    for i, kind in enumerate(rows["kind"]):
        if kind != "episode":
            assert rows["final_wrong"][i] is None
            continue
        source = batch.episode_ids.index(rows["episode_id"][i])
        visual = torch.from_numpy(np.array(batch.episode(source)))
        (other,) = [p for p in PROMPTS if p != batch.prompts[source]]
        expected = model.prefix_curve(visual, torch.from_numpy(language[other]))[-1]
        assert rows["final_wrong"][i] == pytest.approx(float(expected), abs=1e-5)
        gaps.append(abs(rows["final_wrong"][i] - rows["prefix"][i][-1]))
        true = final_values(model, visual, torch.from_numpy(language[batch.prompts[source]])[None])
        assert float(true[0]) == pytest.approx(rows["prefix"][i][-1], abs=1e-5)
    assert min(gaps) > 1e-2
    blind = result.blind_rows
    for wrong, curve in zip(blind["final_wrong"], blind["prefix"]):
        if wrong is not None:
            assert wrong == pytest.approx(curve[-1], abs=1e-6)


def test_per_task_table_in_json_csv_and_report(multitask_eval):
    cfg, _, result = multitask_eval
    found = json.load(open(result.metrics_path))["instruction"]
    assert found["tasks"] == sorted(PROMPTS) and found["note"] is None
    keys = {(r["task"], r["outcome"]) for r in found["model"]}
    assert keys == {(t, o) for t in [*PROMPTS, "all tasks"] for o in ("success", "failure")}
    total = sum(r["num_episodes"] for r in found["model"] if r["task"] != "all tasks")
    assert total == 8  # every recorded episode, none of the rewound copies
    for row in found["blind"]:
        if row["num_episodes"]:
            assert row["gap"] == pytest.approx(0.0, abs=1e-6)
    lines = list(csv.DictReader(open(os.path.join(cfg.evaluate.output, "metrics.csv"))))
    task_rows = [r for r in lines if r["metric"].startswith("instruction/success/gap/")]
    assert {r["model"] for r in task_rows} == {"model", "blind"}
    assert {r["curve"] for r in task_rows} == {"prefix"}
    page = open(result.report_path).read()
    assert "Language: true vs wrong instruction" in page and PROMPTS[1] in page


def test_raw_input_gives_the_same_wrong_values(multitask_eval):
    cfg, checkpoint, result = multitask_eval
    raw = dataclasses.replace(
        cfg, evaluate=dataclasses.replace(cfg.evaluate, input=cfg.synth.output, split="all")
    )
    (rows,) = score_episodes(raw, [checkpoint], None)
    assert rows["episode_id"] == result.rows["episode_id"]
    for a, b in zip(rows["final_wrong"], result.rows["final_wrong"]):
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, abs=1e-4))
