"""The offline reference every served reward is checked against."""

from __future__ import annotations

from rayrm.evaluate.scorer import RewardScorer


def offline(checkpoint, frames, prompt):
    """(rewards, stages, success probabilities) of RewardScorer stepping one environment frame
    by frame."""
    scorer = RewardScorer.from_checkpoint(checkpoint, "cpu")
    scorer.reset(prompt)
    rewards, stages, successes = [], [], []
    for frame in frames:
        rewards.append(float(scorer.step(frame[None])[0]))
        stages.append(None if scorer.last_stage is None else int(scorer.last_stage[0]))
        successes.append(None if scorer.last_success is None else float(scorer.last_success[0]))
    return rewards, stages, successes
