"""rayrm evaluate: curves of every kind, metrics, figures, videos and the report, on embedding
shards and on raw HDF5 (embedded on the fly); the new metrics by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import h5py
import numpy as np
import pytest

from rayrm import metrics
from rayrm.annotate.labels import run_annotate, stage_json_from_hdf5
from rayrm.backbones import build_backbone
from rayrm.config import AnnotateConfig
from rayrm.evaluate.curves import CURVE_KINDS, rewind_frames
from rayrm.evaluate.media import MediaJob, render_episode
from rayrm.evaluate.run import run_evaluate
from rayrm.evaluate.scorer import RewardScorer
from rayrm.evaluate.scoring import score_episodes
from rayrm.video import count_mp4_frames
from tests._eval_helpers import STAGE_NAMES, make_checkpoint

# --- metrics by hand ---------------------------------------------------------------------


def test_rollout_ranking_by_hand():
    groups = ["success", "success", "partial", "failure", "failure"]
    ranking = metrics.rollout_ranking([0.9, 0.7, 0.8, 0.2, 0.8], groups)
    assert ranking["means"] == pytest.approx({"success": 0.8, "partial": 0.8, "failure": 0.5})
    assert ranking["ordered"] is False  # success and partial tie
    # pairs: s>p: (0.9,0.8) win, (0.7,0.8) loss; s>f: 0.9>0.2, 0.9>0.8, 0.7>0.2 win, 0.7<0.8
    # loss; p>f: 0.8>0.2 win, 0.8=0.8 half -> (1 + 3 + 1.5) / 8
    assert ranking["pair_accuracy"] == pytest.approx(5.5 / 8)
    assert metrics.rollout_ranking([0.9, 0.1], ["success", "failure"])["ordered"] is True
    alone = metrics.rollout_ranking([0.5], ["success"])
    assert alone["ordered"] is None and math.isnan(alone["pair_accuracy"])


def test_outcome_groups_from_stages_reached():
    assert metrics.outcome_group(True, 4, 4) == "success"
    assert metrics.outcome_group(None, 1, 4) == "success"  # no flag counts as expert
    assert metrics.outcome_group(False, 3, 4) == "partial"  # more than half the stages
    assert metrics.outcome_group(False, 2, 4) == "failure"
    assert metrics.outcome_group(False, 1, 0) == "failure"  # no stage information


def test_rewind_metrics_and_frames_by_hand():
    order, turn = rewind_frames(10, 0.6, 0.5)
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 4, 3, 2] and turn == 5
    falls = [0.1, 0.5, 0.9, 0.6, 0.3]
    rises = [0.1, 0.5, 0.6, 0.7, 0.8]
    found = metrics.rewind_metrics([falls, rises], [2, 2])
    assert found["voc_after_turn"] == pytest.approx(0.0)  # -1 and +1
    assert found["fall_rate"] == 0.5
    assert found["drop_mean"] == pytest.approx(((0.9 - 0.3) + (0.6 - 0.8)) / 2)


def test_stage_accuracy_and_mse_by_hand():
    assert metrics.stage_accuracy([[0, 1, 1], [2, 2], [0]], [[0, 1, 2], [2, 2], []]) == 0.8
    assert math.isnan(metrics.stage_accuracy([[0]], [[]]))
    assert metrics.mse_to_targets([[0, 1], [1]], [[0, 0.5], [0]]) == pytest.approx((0.125 + 1) / 2)


# --- whole runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annotated(tiny_run, tmp_path_factory):
    """The session's embeddings, copied and annotated with the synthetic ground truth."""
    work = tmp_path_factory.mktemp("annotated")
    path = str(work / "embeddings")
    shutil.copytree(tiny_run.embed.output, path)
    stages = work / "stages.json"
    stages.write_text(json.dumps(stage_json_from_hdf5([tiny_run.synth.output])))
    cfg = AnnotateConfig(
        stages=str(stages), embeddings=path, stage_names=STAGE_NAMES, allow_unannotated=True
    )
    run_annotate(cfg)
    embed = dataclasses.replace(tiny_run.embed, output=path)
    return dataclasses.replace(tiny_run, embed=embed)


# two failures (stall, drop) among them: AUROC and per-mode metrics need more than one
VAL_IDS = [f"episode_{i:04d}" for i in (0, 1, 2, 4, 5, 8)]


@pytest.fixture(scope="module")
def sarm_eval(annotated, tmp_path_factory):
    work = tmp_path_factory.mktemp("sarm_eval")
    model = make_checkpoint(annotated, work / "model", num_stages=4, val_ids=VAL_IDS)
    blind = make_checkpoint(annotated, work / "blind", num_stages=4, blind=True, seed=1)
    evaluate = dataclasses.replace(
        annotated.evaluate,
        embeddings=annotated.embed.output,
        output=str(work / "eval"),
        blind_checkpoint=blind,
        episode_figures=4,
        videos=3,
    )
    cfg = dataclasses.replace(annotated, evaluate=evaluate)
    return cfg, model, run_evaluate(cfg, checkpoint=model, title="test model")


def test_metrics_for_every_curve_kind_beside_the_blind_control(sarm_eval):
    cfg, _, result = sarm_eval
    found = json.load(open(result.metrics_path))
    assert found["num_stages"] == 4 and found["stage_names"] == STAGE_NAMES
    for table in (found["curves"], found["blind_control"]):
        assert set(table) == set(CURVE_KINDS)
        for kind in CURVE_KINDS:
            values = table[kind]
            assert values["num_expert"] + values["num_failure"] == len(VAL_IDS)
            assert values["num_rewound"] == values["num_expert"]
            for key in (
                "voc_expert",
                "auroc_success_vs_failure",
                "stage_accuracy",
                "rank_final_pair_accuracy",
                "rewind_voc_after_turn",
                "mse_expert",
            ):
                assert values[key] is not None and np.isfinite(values[key]), (kind, key)
    assert found["causal_max_abs_diff"] < 1e-5
    rows = json.load(open(os.path.join(cfg.evaluate.output, "curves.json")))
    assert sorted(set(rows["source_episode"])) == VAL_IDS
    # Per failure mode, recomputed from the curves: successes against that mode's failures.
    episodes = [i for i, kind in enumerate(rows["kind"]) if kind == "episode"]
    modes = {rows["failure_mode"][i] for i in episodes if rows["success"][i] is False}
    assert modes and None not in modes
    for mode in modes:
        chosen = [i for i in episodes if rows["success"][i] or rows["failure_mode"][i] == mode]
        expected = metrics.auroc(
            [rows["prefix"][i][-1] for i in chosen], [rows["success"][i] for i in chosen]
        )
        assert found["curves"]["prefix"][f"auroc_vs_{mode}"] == pytest.approx(expected)
    # The blind control sees zeros: its curve depends on the episode length only.
    blind = result.blind_rows
    by_length = {}
    for n, curve in zip(blind["num_frames"], blind["prefix"]):
        np.testing.assert_allclose(by_length.setdefault(n, curve), curve, atol=1e-6)
    assert len(by_length) < len(blind["prefix"])  # some lengths repeat, so this tested something
    csv_lines = open(os.path.join(cfg.evaluate.output, "metrics.csv")).read().splitlines()
    assert csv_lines[0] == "model,curve,metric,value"
    assert {line.split(",")[0] for line in csv_lines[1:]} == {"model", "blind"}
    assert {line.split(",")[1] for line in csv_lines[1:]} == set(CURVE_KINDS)


def test_curves_follow_their_definitions(sarm_eval):
    cfg, _, result = sarm_eval
    rows = result.rows
    for i, kind in enumerate(rows["kind"]):
        n = rows["num_frames"][i]
        assert all(len(rows[k][i]) == n for k in ("prefix", "chained", "causal", "stage_pred"))
        np.testing.assert_allclose(rows["causal"][i], rows["prefix"][i], atol=1e-5)
        if kind == "rewound":  # forward to the turn, then back over its own frames
            order = rows["frame_index"][i]
            assert order[: rows["turn"][i] + 1] == list(range(rows["turn"][i] + 1))
            assert np.all(np.diff(order[rows["turn"][i] :]) == -1)
            assert np.argmax(rows["true_progress"][i]) == rows["turn"][i]
        elif rows["success"][i]:  # annotated: true stages are the labels
            assert len(rows["true_stage"][i]) == n
            assert rows["true_progress"][i][-1] == pytest.approx(1.0)
        else:
            assert rows["true_progress"][i] == [] and rows["true_stage"][i] == []


def test_figures_videos_and_report(sarm_eval):
    cfg, _, result = sarm_eval
    out = cfg.evaluate.output
    rows = result.rows
    pngs = sorted(os.listdir(os.path.join(out, "episodes")))
    videos = sorted(os.listdir(os.path.join(out, "videos")))
    assert len(pngs) == 4 and len(videos) == 3
    assert any("rewound" in p for p in pngs)  # figures interleave the groups
    for name in videos:
        episode = name[: -len(".mp4")].replace("_rewound", "~rewound")
        steps = rows["num_frames"][rows["episode_id"].index(episode)]
        assert count_mp4_frames(os.path.join(out, "videos", name)) == steps
    assert os.path.getsize(result.plot_path) > 50_000
    page = open(result.report_path).read()
    assert page.count("data:image/png;base64,") == 1 + 4
    assert page.count("<video") == 3 and "data:video/mp4;base64," in page
    for kind in CURVE_KINDS:
        assert f"<th>{kind}<br>model</th>" in page and f"<th>{kind}<br>blind</th>" in page


def test_streaming_scorer_on_raw_frames_equals_the_evaluation(sarm_eval):
    """The RewardScorer from the checkpoint path, fed raw frames one at a time, gives the
    evaluation's causal (and prefix) curves."""
    cfg, model, result = sarm_eval
    rows = result.rows
    scorer = RewardScorer.from_checkpoint(model)
    episodes = VAL_IDS[:2]
    with h5py.File(cfg.synth.output, "r") as f:
        frames = [f[e]["side_cam"][:] for e in episodes]
    scorer.reset([cfg.synth.prompt] * 2)
    for e, episode in enumerate(episodes):
        i = rows["episode_id"].index(episode)
        scorer.reset(cfg.synth.prompt, env_ids=[e])
        values = [scorer.step(frame[None], env_ids=[e])[0] for frame in frames[e]]
        np.testing.assert_allclose(values, rows["causal"][i], atol=1e-4)
        np.testing.assert_allclose(values, rows["prefix"][i], atol=1e-4)


def test_raw_hdf5_gives_the_same_curves_as_the_shards(sarm_eval):
    cfg, model, result = sarm_eval
    raw = dataclasses.replace(
        cfg, evaluate=dataclasses.replace(cfg.evaluate, input=cfg.synth.output)
    )
    (rows,) = score_episodes(raw, [model], VAL_IDS)
    assert rows["episode_id"] == result.rows["episode_id"]
    for a, b in zip(rows["prefix"], result.rows["prefix"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # true stages come from the HDF5 boundaries there, from the annotation here: the same
    assert rows["true_stage"] == result.rows["true_stage"]


def test_videos_are_skipped_without_the_raw_file(sarm_eval, tmp_path):
    _, _, result = sarm_eval
    row = {name: values[0] for name, values in result.rows.items()}
    row["source_file"] = str(tmp_path / "gone.h5")
    job = MediaJob(row, None, STAGE_NAMES, 4, str(tmp_path), True, "side_cam", 10)
    made = render_episode(job)
    assert made.video is None and "not found" in made.skipped
    assert os.path.exists(made.png)


def test_backbone_dims_must_match_the_checkpoint(sarm_eval, tmp_path):
    cfg, _, _ = sarm_eval
    other = dataclasses.replace(cfg.backbone, visual_dim=cfg.backbone.visual_dim + 1)
    assert build_backbone(other).visual_dim != build_backbone(cfg.backbone).visual_dim
    checkpoint = make_checkpoint(cfg, tmp_path / "ckpt", val_ids=VAL_IDS[:1])
    config_path = os.path.join(checkpoint, "config.json")
    config = json.load(open(config_path))
    config["backbone"]["visual_dim"] += 1
    json.dump(config, open(config_path, "w"))
    raw = dataclasses.replace(
        cfg, evaluate=dataclasses.replace(cfg.evaluate, input=cfg.synth.output)
    )
    with pytest.raises(ValueError, match="checkpoint expects"):
        score_episodes(raw, [checkpoint], VAL_IDS[:1])


def test_metrics_json_is_recomputed_from_curves_json(sarm_eval):
    """The metrics of each curve kind, recomputed here from the written curves with
    independent code (sklearn's AUROC, scipy's Spearman): a swapped curve kind, a broken
    AUROC or metrics of other rows would not match."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    cfg, _, result = sarm_eval
    found = json.load(open(result.metrics_path))["curves"]
    rows = json.load(open(os.path.join(cfg.evaluate.output, "curves.json")))
    rewound = json.load(open(os.path.join(cfg.evaluate.output, "rewound_curves.json")))
    success = [s is not False for s in rows["success"]]
    assert 2 <= sum(success) <= len(success) - 2  # more than one of each outcome
    for kind in CURVE_KINDS:
        final = [c[-1] for c in rows[kind]]
        expert = [c for c, s in zip(rows[kind], success) if s]
        values = found[kind]
        assert values["auroc_success_vs_failure"] == pytest.approx(roc_auc_score(success, final))
        voc = np.mean([spearmanr(c, np.arange(len(c))).statistic for c in expert])
        assert values["voc_expert"] == pytest.approx(voc)
        assert values["final_expert_mean"] == pytest.approx(np.mean([c[-1] for c in expert]))
        falls = [c[-1] < c[t] for c, t in zip(rewound[kind], rewound["turn"])]
        assert values["rewind_fall_rate"] == pytest.approx(np.mean(falls))
    # the kinds differ, so the checks above tell them apart (causal equals prefix by design)
    assert found["chained"]["voc_expert"] != pytest.approx(found["prefix"]["voc_expert"])
    finals = {kind: [c[-1] for c in rows[kind]] for kind in ("prefix", "chained")}
    assert finals["prefix"] != pytest.approx(finals["chained"])
