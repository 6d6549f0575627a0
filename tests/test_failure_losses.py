"""Failure-aware training's pieces on hand-made tensors: labels, masks, each loss term, the
rank pairs, the stratified split, old checkpoints, and the metrics recomputed by hand."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from rayrm import metrics
from rayrm.config import ConfigError, ModelConfig, load_config
from rayrm.data.shards import EpisodeBatch, split_episodes
from rayrm.evaluate.report import reward_hacking, success_head_metrics
from rayrm.train.checkpoint import load_model, save_checkpoint
from rayrm.train.loop import (
    DeviceEpisodes,
    Inputs,
    LossWeights,
    RankInputs,
    done_labels,
    progress_terms,
    rank_loss,
    window_inputs,
    window_loss,
)
from rayrm.train.model import ModelOutput, RewardTransformer
from rayrm.train.windows import (
    PrefixBatch,
    WindowBatch,
    rank_table,
    sample_rank_pairs,
    sample_windows,
    sequence_positions,
)

TINY = ModelConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=8, head_hidden=4, max_seq_len=6)


def _batch(lengths, prompts, success) -> EpisodeBatch:
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return EpisodeBatch(
        episode_ids=[f"e{i}" for i in range(len(lengths))],
        visual=rng.normal(size=(offsets[-1], 4)).astype(np.float32),
        language=rng.normal(size=(len(lengths), 3)).astype(np.float32),
        offsets=offsets,
        success=list(success),
        stage_boundaries=[[] for _ in lengths],
        prompts=list(prompts),
    )


def _device(lengths, prompts, success) -> DeviceEpisodes:
    batch = _batch(lengths, prompts, success)
    return DeviceEpisodes.from_batch(batch, torch.device("cpu"), False, sorted(set(prompts)))


def test_success_labels_mark_the_last_frames_of_successes_only():
    episodes = _device([10, 10], ["a", "a"], [True, False])
    frames = torch.tensor([[0, 4, 8, 9], [0, 4, 8, 9]])
    windows = WindowBatch(
        frame_index=episodes.offsets[:2, None] + frames,
        episode=torch.tensor([0, 1]),
        target=torch.zeros(2, 4),
        local_frame=frames,
    )
    inputs = window_inputs(episodes, windows, success_from=0.9)
    # (f + 1) / T >= 0.9: frames 8 and 9 of the success; nothing of the failure
    assert inputs.done.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert inputs.known.tolist() == [True, False]


def test_mismatched_windows_are_known_zero_targets_and_not_done():
    episodes = _device([12, 12, 12], ["a", "b", "a"], [True, True, False])
    g = torch.Generator().manual_seed(0)
    windows = sample_windows(episodes.lengths, episodes.offsets, 3000, 6, 0.0, g)
    table = torch.stack([episodes.language[0], episodes.language[1]])
    inputs = window_inputs(episodes, windows, table, 0.5, g, success_from=0.5)
    swapped = ~torch.all(inputs.language == episodes.language[windows.episode], dim=1)
    assert torch.all(inputs.known[swapped])  # progress 0 toward another task holds
    assert torch.all(inputs.done[swapped] == 0) and torch.all(inputs.progress[swapped] == 0)
    failure = (windows.episode == 2) & ~swapped
    assert failure.any() and not inputs.known[failure].any()
    assert inputs.done[~swapped & (windows.episode < 2)].sum() > 0


def test_progress_loss_ignores_failure_windows():
    target = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    inputs = Inputs(
        visual=torch.zeros(2, 3, 4),
        language=torch.zeros(2, 3),
        progress=target,
        known=torch.tensor([True, False]),
        done=torch.zeros(2, 3),
    )
    progress = torch.tensor([[0.2, 0.2, 0.5], [9.0, -9.0, 9.0]])
    terms = progress_terms(ModelOutput(progress=progress), inputs)
    expected = ((progress[0] - target[0]) ** 2).mean()
    torch.testing.assert_close(terms["progress"], expected)
    progress[1] = 0.0  # what the model says on a failure's window does not count
    torch.testing.assert_close(progress_terms(ModelOutput(progress), inputs)["progress"], expected)


def test_sarm_terms_mask_failures_and_unlabelled_frames():
    stage = torch.tensor([[0, 1, -1], [2, 2, 2]])
    logits = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(1))
    subtask = torch.tensor([[0.1, 0.6, 0.0], [0.4, 0.4, 0.4]])
    inputs = Inputs(
        visual=torch.zeros(2, 3, 4),
        language=torch.zeros(2, 3),
        progress=torch.zeros(2, 3),
        known=torch.tensor([True, False]),
        done=torch.zeros(2, 3),
        stage=stage,
        subtask=torch.tensor([[0.2, 0.5, float("nan")], [0.9, 0.9, 0.9]]),
    )
    out = ModelOutput(progress=torch.zeros(2, 3), stage_logits=logits, subtask=subtask)
    terms = progress_terms(out, inputs)
    torch.testing.assert_close(terms["stage"], F.cross_entropy(logits[0, :2], stage[0, :2]))
    torch.testing.assert_close(terms["progress"], torch.tensor((0.1**2 + 0.1**2) / 2))


def test_rank_loss_is_tau_weighted_bradley_terry_at_the_prefix_ends():
    progress = torch.tensor(
        [
            [0.1, 0.9, 0.0],  # success prefix 0, read at slot 1
            [0.2, 0.3, 0.7],  # success prefix 1, read at slot 2
            [0.5, 0.4, 0.0],  # failure prefix 0, read at slot 1
            [0.6, 0.6, 0.8],  # failure prefix 1, read at slot 2
        ]
    )
    read = torch.tensor([1, 2])
    slots = torch.zeros(2, 3, dtype=torch.int64)
    prefix = PrefixBatch(frame_index=slots, read=read, episode=read, local_frame=slots)
    tau = torch.tensor([0.25, 1.0])
    got = rank_loss(progress, RankInputs(prefix, prefix, tau, torch.zeros(4, 3)), scale=10.0)
    losses = [-np.log(1 / (1 + np.exp(-10 * (0.9 - 0.4)))), -np.log(1 / (1 + np.exp(-10 * -0.1)))]
    expected = (0.25 * losses[0] + 1.0 * losses[1]) / 1.25
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_rank_pairs_share_a_task_and_a_relative_time():
    lengths = [10, 20, 8, 16, 12]
    episodes = _device(lengths, ["a", "a", "b", "b", "c"], [True, False, True, False, False])
    table = rank_table(episodes.task, episodes.success)
    # episode 4 fails a task with no success here: it has no partner and is never drawn
    assert sorted(table.failures.tolist()) == [1, 3]
    g = torch.Generator().manual_seed(0)
    success, failure, tau = sample_rank_pairs(
        table, episodes.lengths, episodes.offsets, 500, 6, 0.2, g
    )
    assert torch.all(episodes.task[success.episode] == episodes.task[failure.episode])
    assert torch.all(episodes.success[success.episode] & ~episodes.success[failure.episode])
    assert tau.min() >= 0.2 and tau.max() <= 1.0
    for prefixes in (success, failure):
        n = torch.clamp(torch.ceil(tau * episodes.lengths[prefixes.episode]).long(), min=1)
        expected = episodes.offsets[prefixes.episode, None] + sequence_positions(n, 6)
        assert torch.equal(prefixes.frame_index, expected)
        assert torch.equal(prefixes.read, torch.clamp(n - 1, max=5))
    assert rank_table(episodes.task, torch.ones(5, dtype=torch.bool)) is None


def _pairs(episodes, n, g, success_from=0.8) -> RankInputs:
    success, failure, tau = sample_rank_pairs(
        episodes.ranks, episodes.lengths, episodes.offsets, n, 6, 0.2, g
    )
    done = torch.cat(
        [done_labels(episodes, p.episode, p.local_frame, success_from) for p in (success, failure)]
    )
    return RankInputs(success, failure, tau, done)


def test_window_loss_sums_the_weighted_terms_in_one_pass():
    torch.manual_seed(0)
    model = RewardTransformer(dataclasses.replace(TINY, dropout=0.0), 4, 3).eval()
    episodes = _device([10, 12, 9, 11], ["a", "a", "a", "a"], [True, False, True, False])
    g = torch.Generator().manual_seed(0)
    windows = sample_windows(episodes.lengths, episodes.offsets, 16, 6, 0.5, g)
    inputs = window_inputs(episodes, windows, success_from=0.8)
    pairs = _pairs(episodes, 8, g)
    weights = LossWeights(success=0.5, rank=2.0, rank_scale=10.0)
    total, terms, out = window_loss(model, inputs, 0.0, None, weights, pairs, episodes)
    alone = model(inputs.visual, inputs.language, return_all=True)
    torch.testing.assert_close(out.progress, alone.progress)
    prefixes = model(pairs.visual(episodes), pairs.language(episodes), return_all=True)
    # the success head reads the windows' frames and the pairs' prefixes (failures' frames)
    logits = torch.cat([alone.success_logit, prefixes.success_logit])
    bce = F.binary_cross_entropy_with_logits(logits, torch.cat([inputs.done, pairs.done]))
    torch.testing.assert_close(terms["success"], bce)
    torch.testing.assert_close(terms["rank"], rank_loss(prefixes.progress, pairs, 10.0))
    expected = terms["progress"] + 0.5 * terms["success"] + 2.0 * terms["rank"]
    torch.testing.assert_close(total, expected)


def test_pair_labels_mark_the_success_prefixes_late_frames_and_no_failure_frame():
    episodes = _device([10, 20, 10, 20], ["a", "a", "b", "b"], [True, False, True, False])
    pairs = _pairs(episodes, 200, torch.Generator().manual_seed(1), success_from=0.5)
    n = len(pairs.tau)
    assert pairs.done[n:].sum() == 0  # failure prefixes: never done
    frames = pairs.success.local_frame
    expected = (frames + 1).float() / episodes.lengths[pairs.success.episode, None] >= 0.5
    assert torch.equal(pairs.done[:n].bool(), expected)
    assert pairs.done[:n].any() and not pairs.done[:n].all()


def test_windows_come_from_the_eligible_episodes_only():
    episodes = _device([10, 30, 10, 30], ["a", "a", "a", "a"], [True, False, True, False])
    g = torch.Generator().manual_seed(0)
    windows = sample_windows(
        episodes.lengths, episodes.offsets, 500, 6, 0.5, g, eligible=episodes.success
    )
    assert set(windows.episode.tolist()) == {0, 2}
    nobody = torch.zeros(4, dtype=torch.bool)  # none eligible: every episode, by length
    windows = sample_windows(episodes.lengths, episodes.offsets, 500, 6, 0.5, g, eligible=nobody)
    assert set(windows.episode.tolist()) == {0, 1, 2, 3}


def test_split_holds_out_every_task_outcome_and_failure_mode():
    ids = [f"e{i:03d}" for i in range(60)]
    prompts = ["a" if i % 2 else "b" for i in range(60)]
    success = [i % 3 != 0 for i in range(60)]
    modes = [None if s else ("wrong_target" if i % 4 else "stall") for i, s in enumerate(success)]
    strata = list(zip(prompts, success, modes))
    held = split_episodes(ids, success, 0.25, 0, strata)
    for key in set(strata):
        members = [e for e, k in zip(ids, strata) if k == key]
        share = len([e for e in members if e in held]) / len(members)
        assert 0 < share < 1 and abs(share - 0.25) < 0.2, key
    assert held == split_episodes(list(reversed(ids)), success[::-1], 0.25, 0, strata[::-1])


def test_checkpoint_from_before_the_success_head_loads(tmp_path):
    cfg = dataclasses.replace(TINY, success_head=False)
    model = RewardTransformer(cfg, 4, 3).eval()
    save_checkpoint(str(tmp_path), model, {"train": {}})
    config_path = os.path.join(tmp_path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    del config["model"]["success_head"]  # written by a rayrm without the field
    with open(config_path, "w") as f:
        json.dump(config, f)
    loaded, _ = load_model(str(tmp_path))
    assert loaded.success_head is None
    visual = torch.randn(7, 4)
    language = torch.randn(3)
    out = loaded.prefix_outputs(visual, language)
    assert out["success"] is None
    torch.testing.assert_close(out["progress"], model.prefix_curve(visual, language))


def test_success_head_probabilities_along_the_prefix_curve():
    torch.manual_seed(0)
    model = RewardTransformer(dataclasses.replace(TINY, dropout=0.0), 4, 3).eval()
    visual, language = torch.randn(9, 4), torch.randn(3)
    got = model.prefix_outputs(visual, language)["success"]
    for t in (0, 3, 8):  # the prefix's own last frame, as for progress
        from rayrm.train.windows import prefix_positions, prefix_read_position

        seq = visual[prefix_positions(9, TINY.max_seq_len)[t]].unsqueeze(0)
        logit = model(seq, language.unsqueeze(0), return_all=True).success_logit
        at = prefix_read_position(9, TINY.max_seq_len)[t]
        assert got[t].item() == pytest.approx(torch.sigmoid(logit[0, at]).item(), abs=1e-6)


def _rows():
    return {
        "episode_id": ["s1", "s2", "w1", "w2", "st1"],
        "kind": ["episode"] * 5,
        "success": [True, True, False, False, False],
        "failure_mode": [None, None, "wrong_target", "wrong_target", "stall"],
        "stage_boundaries": [[]] * 5,
        "prefix": [[0.1, 0.95], [0.2, 0.8], [0.3, 0.97], [0.1, 0.5], [0.1, 0.2]],
        "success_pred": [[0.1, 0.9], [0.1, 0.7], [0.2, 0.1], [0.1, 0.6], [0.0, 0.05]],
    }


def test_success_head_auroc_per_failure_mode_from_the_curves():
    rows = _rows()
    got = success_head_metrics(rows, list(range(5)))
    final = [r[-1] for r in rows["success_pred"]]
    assert got["success_auroc"] == metrics.auroc(final, [True, True, False, False, False])
    # vs wrong_target: successes 0.9, 0.7 against 0.1, 0.6 -> every pair ordered
    assert got["success_auroc_vs_wrong_target"] == metrics.auroc(
        [0.9, 0.7, 0.1, 0.6], [True, True, False, False]
    )
    assert got["success_auroc_vs_stall"] == 1.0


def test_reward_hacking_flags_high_progress_that_the_success_head_calls_a_failure():
    rows = _rows()
    groups = ["success", "success", "failure", "failure", "failure"]
    got = reward_hacking(rows, list(range(5)), groups, progress_at=0.9, success_below=0.5)
    # s1: progress 0.95 but success 0.9 (fine); w1: 0.97 and success 0.1 (flagged)
    assert got["hacking_episodes"] == ["w1"]
    assert got["hacking_failure"] == 1 and got["hacking_success"] == 0
    assert got["hacking_wrong_target"] == 1 and got["hacking_stall"] == 0
    loose = reward_hacking(rows, list(range(5)), groups, progress_at=0.9, success_below=0.95)
    assert loose["hacking_episodes"] == ["s1", "w1"]


@pytest.mark.parametrize(
    "override", ["train.rank_weight=-1", "train.success_from=1.5", "train.rank_pairs=-2"]
)
def test_bad_failure_settings_are_refused_when_the_config_is_built(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[f"--{override}"])


def test_pairs_per_step_follow_the_failures_share_of_frames_unless_set():
    from rayrm.config import TrainConfig
    from rayrm.train.loop import pairs_per_step

    episodes = _device([10, 30, 10, 30], ["a", "a", "a", "a"], [True, False, True, False])
    cfg = TrainConfig(batch_size=32)  # rank_pairs null: failures hold 60 of 80 frames
    assert pairs_per_step(cfg, episodes, world=1) == 24
    assert pairs_per_step(cfg, episodes, world=2) == 12
    assert pairs_per_step(dataclasses.replace(cfg, rank_pairs=10), episodes, world=2) == 5
    assert pairs_per_step(dataclasses.replace(cfg, rank_pairs=0), episodes, world=1) == 0
    no_weight = dataclasses.replace(cfg, rank_weight=0.0, success_weight=0.0)
    assert pairs_per_step(no_weight, episodes, world=1) == 0
    few = _device([100, 2, 100], ["a", "a", "a"], [True, False, True])  # 1% of the frames
    assert pairs_per_step(cfg, few, world=1) == 1
    assert pairs_per_step(cfg, _device([10, 10], ["a", "a"], [True, True]), world=1) == 0


def test_split_holds_out_a_share_of_each_flag_even_when_every_stratum_is_one_episode():
    ids = [f"e{i}" for i in range(8)]
    success = [True] * 5 + [False] * 3
    strata = [(f"task {i}", s, None) for i, s in enumerate(success)]  # all different
    held = split_episodes(ids, success, 0.3, 0, strata)
    assert len([e for e in held if e in ids[:5]]) == 2  # round(0.3 * 5)
    assert len([e for e in held if e in ids[5:]]) == 1
