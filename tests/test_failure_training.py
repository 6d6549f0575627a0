"""Failure-aware training end to end (real Ray Train, real evaluation): on a tiny two-task set
where a wrong-target failure differs from a success only in where the object ends up, the
failure-aware model tells them apart on held-out episodes and the success-only model of the
same size, trained the same way, does not.

The episodes are hand-made embeddings (no backbone): per frame, the arm's carry (a half
circle, the same in every episode) and, over the last fifth, where the cube was put (pot or
tray), plus noise. Task "pot": a success puts it in the pot, a wrong-target failure on the
tray; task "tray" the other way round. So a wrong-target failure of one task looks exactly
like a success of the other: only the instruction says which it is, and a model trained on
successes alone is never shown that the pairing matters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rayrm import metrics
from rayrm.config import BackboneConfig, EvaluateConfig, to_dict
from rayrm.data.chunks import whole_episode_table, write_episode_folder
from rayrm.data.hdf5 import EpisodeInfo
from rayrm.evaluate.run import run_evaluate
from rayrm.train.trainer import run_train

pytestmark = pytest.mark.usefixtures("ray_session")

VISUAL_DIM, LANGUAGE_DIM = 6, 4
PLACES = {"pot": (1.0, 0.0), "tray": (0.0, 1.0)}
PROMPTS = {"pot": "Put the cube in the pot.", "tray": "Put the cube on the tray."}


def _frames(rng, num_frames: int, place: str) -> np.ndarray:
    s = np.arange(num_frames) / (num_frames - 1)
    visual = np.zeros((num_frames, VISUAL_DIM), np.float32)
    visual[:, 0], visual[:, 1] = np.cos(np.pi * s), np.sin(np.pi * s)  # the carry
    visual[s >= 0.8, 2:4] = PLACES[place]  # where the cube ends up
    return visual + rng.normal(0, 0.05, visual.shape).astype(np.float32)


def write_wrong_target_set(folder: str, per_group: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for task, wrong in (("pot", "tray"), ("tray", "pot")):
        for outcome, place in (("success", task), ("wrong_target", wrong)):
            for k in range(per_group):
                num_frames = int(rng.integers(24, 40))
                info = EpisodeInfo(
                    f"{task}_{outcome}_{k:03d}",
                    "handmade",
                    num_frames,
                    (1, 1, 3),
                    PROMPTS[task],
                    outcome == "success",
                    (),
                    failure_mode=None if outcome == "success" else outcome,
                )
                rows.append((info, _frames(rng, num_frames, place)))
    language = {
        PROMPTS["pot"]: np.array([1, 0, 0, 0], np.float32),
        PROMPTS["tray"]: np.array([0, 1, 0, 0], np.float32),
    }
    # hand-made features, no backbone ran: the manifest records the dims the model reads
    backbone = to_dict(BackboneConfig(visual_dim=VISUAL_DIM, language_dim=LANGUAGE_DIM))
    manifest = {"visual_dim": VISUAL_DIM, "language_dim": LANGUAGE_DIM, "backbone": backbone}
    write_episode_folder(folder, whole_episode_table(rows, language), manifest)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_config

    work = tmp_path_factory.mktemp("wrong_target")
    embeddings = str(work / "embeddings")
    write_wrong_target_set(embeddings)
    cfg = make_config(work)
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train,
            embeddings=embeddings,
            batch_size=32,
            steps=300,
            val_every=100,
            val_ratio=0.25,
            lr=1e-3,
            lr_min=1e-4,
        ),
        evaluate=EvaluateConfig(
            embeddings=embeddings,
            output=str(work / "eval"),
            episode_figures=0,
            videos=0,
            report=False,
        ),
    )
    aware = run_train(cfg)
    only = run_train(
        dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, only_successful=True, run_name="success_only"),
        )
    )
    blind = run_train(  # the same training on zeroed inputs: what position alone gives
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, blind=True, run_name="blind"))
    )
    result = run_evaluate(
        cfg,
        checkpoint=aware.best_checkpoint,
        success_only_checkpoint=only.best_checkpoint,
        blind_checkpoint=blind.best_checkpoint,
    )
    return result


def _final_auroc(rows: dict, column: str) -> float:
    """AUROC of the final values, successes vs wrong-target failures, from the curves."""
    episodes = [i for i, k in enumerate(rows["kind"]) if k == "episode"]
    return metrics.auroc(
        [rows[column][i][-1] for i in episodes], [rows["success"][i] for i in episodes]
    )


def test_held_out_wrong_target_failures_are_separated_only_by_the_failure_aware_model(
    trained,
):
    rows, only_rows = trained.rows, trained.success_only_rows
    held_out = [i for i, k in enumerate(rows["kind"]) if k == "episode"]
    assert sum(rows["success"][i] is False for i in held_out) >= 10  # both tasks' failures
    aware = _final_auroc(rows, "prefix")
    only = _final_auroc(only_rows, "prefix")
    assert aware >= 0.9, f"failure-aware progress AUROC {aware:.3f}"
    assert only < 0.9, f"success-only progress AUROC {only:.3f}"
    # the success head, too, learned what the success-only model's could not
    head, only_head = _final_auroc(rows, "success_pred"), _final_auroc(only_rows, "success_pred")
    assert head >= only_head + 0.2, f"success head AUROC {head:.3f} vs {only_head:.3f}"
    # the reported metrics are these curves' metrics
    found = trained.metrics
    assert found["curves"]["prefix"]["auroc_vs_wrong_target"] == pytest.approx(aware)
    assert found["success_only_control"]["prefix"]["auroc_vs_wrong_target"] == pytest.approx(only)
    assert found["curves"]["prefix"]["success_auroc"] == pytest.approx(head)


def test_the_success_only_control_never_saw_a_failure(trained):
    from rayrm.train.checkpoint import read_checkpoint_config

    only = read_checkpoint_config(trained.metrics["success_only_checkpoint"])
    aware = read_checkpoint_config(trained.metrics["checkpoint"])
    assert only["train"]["only_successful"] is True
    assert aware["train"]["only_successful"] is False
    assert only["split"]["val_episodes"] == aware["split"]["val_episodes"]  # same held-out set


def test_the_model_beats_the_blind_control_on_held_out_episodes(trained):
    """Trained the same way on zeroed inputs, the blind control can only learn progress from
    the frame count: it cannot tell a success from a failure, nor see a rewind, so its
    scores are the floor the model must clear."""
    model, blind = trained.metrics["curves"]["prefix"], trained.metrics["blind_control"]["prefix"]
    assert model["num_rewound"] == blind["num_rewound"] >= 10
    assert model["auroc_success_vs_failure"] >= 0.9
    assert blind["auroc_success_vs_failure"] < model["auroc_success_vs_failure"] - 0.15
    assert model["rewind_fall_rate"] >= 0.8, model["rewind_fall_rate"]  # rewinds fall
    assert blind["rewind_fall_rate"] <= 0.5, blind["rewind_fall_rate"]
    assert model["rewind_voc_after_turn"] < blind["rewind_voc_after_turn"]
