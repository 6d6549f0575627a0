"""The streaming RewardScorer: causal, equal to the batch prefix curves, usable in a Ray actor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch

from rayrm.evaluate.scorer import RewardScorer, RewardScorerActor
from rayrm.train.model import RewardTransformer
from tests._eval_helpers import make_checkpoint, small_model_config

LENGTHS = [3, 8, 21, 13]  # shorter than, equal to and longer than L = 8 (subsampled prefixes)


def _model(num_stages: int, language_dim: int = 5) -> RewardTransformer:
    torch.manual_seed(0)
    cfg = dataclasses.replace(small_model_config(), num_stages=num_stages, dropout=0.0)
    model = RewardTransformer(cfg, visual_dim=6, language_dim=language_dim).eval()
    if num_stages:
        model.set_stage_priors(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    return model


def _episodes(seed: int = 0, language_dim: int = 5):
    rng = np.random.default_rng(seed)
    visual = [rng.normal(size=(n, 6)).astype(np.float32) for n in LENGTHS]
    language = rng.normal(size=(len(LENGTHS), language_dim)).astype(np.float32)
    return visual, language


def _batch(model, visual, language) -> list[dict]:
    out = []
    for v, lang in zip(visual, language):
        lang = torch.from_numpy(lang) if model.language_dim else None
        found = model.prefix_outputs(torch.from_numpy(v), lang)
        out.append({k: None if x is None else x.numpy() for k, x in found.items()})
    return out


def _stream(scorer, visual, language):
    """Every episode stepped as one environment; ragged lengths through env_ids."""
    scorer.reset(language=language)
    progress = [np.zeros(len(v), np.float32) for v in visual]
    stages = [np.zeros(len(v), np.int64) for v in visual]
    for t in range(max(LENGTHS)):
        active = [i for i, v in enumerate(visual) if len(v) > t]
        values = scorer.step(np.stack([visual[i][t] for i in active]), env_ids=active)
        for n, i in enumerate(active):
            progress[i][t] = values[n]
            if scorer.last_stage is not None:
                stages[i][t] = scorer.last_stage[n]
    return progress, stages


@pytest.mark.parametrize("num_stages", [0, 4])
def test_streaming_equals_the_batch_prefix_curves(num_stages):
    model = _model(num_stages)
    visual, language = _episodes()
    expected = _batch(model, visual, language)
    progress, stages = _stream(RewardScorer(model, {"train": {}}), visual, language)
    for got, want, stage in zip(progress, expected, stages):
        np.testing.assert_allclose(got, want["progress"], atol=1e-5, rtol=0)
        if num_stages:
            np.testing.assert_array_equal(stage, want["stage"])


def test_streaming_is_causal_and_resets_one_environment():
    model = _model(0)
    visual, language = _episodes()
    scorer = RewardScorer(model, {"train": {}}, initial_capacity=2)  # forces the buffer to grow
    envs = [3, 2]  # environment 0 plays episode 3, environment 1 episode 2 (21 frames)
    scorer.reset(language=language[envs])
    first = [scorer.step(np.stack([visual[e][t] for e in envs])) for t in range(6)]
    # Values so far depend only on frames so far: other future frames change nothing.
    altered = [v.copy() for v in visual]
    altered[2][6:] += 10.0
    again = RewardScorer(model, {"train": {}})
    again.reset(language=language[envs])
    for t in range(6):
        np.testing.assert_allclose(again.step(np.stack([altered[e][t] for e in envs])), first[t])
    # Environment 0 starts a new episode (episode 1) while environment 1 goes on.
    scorer.reset(env_ids=[0], language=language[1:2])
    expected = _batch(model, [visual[1]], language[1:2])[0]["progress"]
    for t in range(len(visual[1])):
        value = scorer.step(np.stack([visual[1][t], visual[2][6 + t]]))
        assert value[0] == pytest.approx(expected[t], abs=1e-5)
    episode2 = _batch(model, [visual[2]], language[2:3])[0]["progress"]
    assert value[1] == pytest.approx(episode2[6 + len(visual[1]) - 1], abs=1e-5)


def test_blind_scorer_sees_only_zeros():
    model = _model(0)
    visual, language = _episodes()
    blind = RewardScorer(model, {"train": {"blind": True}})
    progress, _ = _stream(blind, visual, language)
    zeros = [np.zeros_like(v) for v in visual]
    expected = _batch(model, zeros, np.zeros_like(language))
    for got, want in zip(progress, expected):
        np.testing.assert_allclose(got, want["progress"], atol=1e-5)


def test_bad_inputs_are_clear_errors():
    scorer = RewardScorer(_model(0), {"train": {}})
    with pytest.raises(ValueError, match="reset with prompts"):
        scorer.reset(num_envs=2)  # the model reads a language embedding
    scorer.reset(language=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"embeddings \[N, 6\]"):
        scorer.step(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="2 observations for 1 environments"):
        scorer.step(np.zeros((2, 6), np.float32), env_ids=[0])


def test_raw_frames_in_a_ray_actor(tiny_run, tmp_path):
    """From a checkpoint path, inside an actor: raw uint8 frames through the checkpoint's
    backbone give the same values as their embeddings."""
    import h5py

    from rayrm.backbones import build_backbone

    checkpoint = make_checkpoint(tiny_run, tmp_path / "ckpt")
    with h5py.File(tiny_run.synth.output, "r") as f:
        frames = [f[name]["side_cam"][:10] for name in sorted(f)[:2]]
    actor = ray.remote(RewardScorerActor).options(num_cpus=0).remote(checkpoint)
    prompt = tiny_run.synth.prompt
    ray.get(actor.reset.remote([prompt, prompt]))
    from_frames = [ray.get(actor.step.remote(np.stack(pair))) for pair in zip(*frames)]
    local = RewardScorer.from_checkpoint(checkpoint)
    backbone = build_backbone(local.backbone.cfg)
    local.reset(language=backbone.embed_prompts([prompt, prompt]))
    for t in range(10):
        embeddings = backbone.embed_frames(np.stack([frames[0][t], frames[1][t]]), ["", ""])
        np.testing.assert_allclose(local.step(embeddings), from_frames[t], atol=1e-5)
    ray.kill(actor)


def test_the_score_rollouts_job(tiny_run, tmp_path):
    """jobs/score_rollouts.py: more episodes than environments, so environments reset alone;
    every episode's rewards equal a fresh single-environment scorer's."""
    import importlib.util

    import h5py

    spec = importlib.util.spec_from_file_location("score_rollouts", "jobs/score_rollouts.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    checkpoint = make_checkpoint(tiny_run, tmp_path / "ckpt")
    args = job.parse_args(
        [
            "--checkpoint",
            checkpoint,
            "--episodes",
            tiny_run.synth.output,
            "--num-envs",
            "2",
            "--max-episodes",
            "3",
        ]
    )
    rewards = job.score(args)
    local = RewardScorer.from_checkpoint(checkpoint)
    with h5py.File(tiny_run.synth.output, "r") as f:
        for name in sorted(f)[:3]:
            frames = f[name]["side_cam"][:]
            local.reset(tiny_run.synth.prompt)
            expected = [local.step(frame[None])[0] for frame in frames]
            np.testing.assert_allclose(rewards[name], expected, atol=1e-5)
