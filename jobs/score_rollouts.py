"""Online rewards from a Ray actor: the pattern an RL loop uses.

    python jobs/score_rollouts.py --checkpoint outputs/demo/train/reward_model/checkpoint_... \
        --episodes outputs/demo/raw/episodes.h5 [--num-envs 8] [--num-gpus 0]

A `RewardScorerActor` loads the checkpoint (and the backbone named in it) inside the actor, on
its GPU when it asks for one. Recorded episodes stand in for environments here: each step
sends one raw frame per environment and gets each environment's progress back; a finished
environment starts the next episode with `reset(..., env_ids=[i])`. An RL loop does the same
with its own frames, reward = progress (or its increase). Works on local Ray or, through
`ray job submit --working-dir . -- python jobs/score_rollouts.py ...`, on a cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import ray

from rayrm.config import RayConfig
from rayrm.data.hdf5 import open_hdf5
from rayrm.evaluate.scorer import RewardScorerActor
from rayrm.runtime import init_ray, setup_logging

logger = logging.getLogger("rayrm.score_rollouts")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="rayrm checkpoint folder")
    parser.add_argument("--episodes", required=True, help="HDF5 file of recorded episodes")
    parser.add_argument("--camera", default="side_cam")
    parser.add_argument("--num-envs", type=int, default=4, help="environments stepped together")
    parser.add_argument("--max-episodes", type=int, default=8)
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the scorer actor")
    return parser.parse_args(argv)


def load_episodes(path: str, camera: str, limit: int) -> list[tuple[str, str, np.ndarray]]:
    """(episode id, prompt, frames) of the first ``limit`` episodes."""
    out = []
    with open_hdf5(path) as f:
        for name in sorted(f)[:limit]:
            prompt = f[name].attrs.get("prompt", f.attrs.get("prompt", ""))
            out.append((name, str(prompt), f[name][camera][:]))
    return out


def score(args: argparse.Namespace) -> dict[str, list[float]]:
    episodes = load_episodes(args.episodes, args.camera, args.max_episodes)
    actor_class = ray.remote(RewardScorerActor).options(num_gpus=args.num_gpus, num_cpus=0)
    scorer = actor_class.remote(args.checkpoint)
    num_envs = min(args.num_envs, len(episodes))
    queue = list(range(len(episodes)))
    running = [queue.pop(0) for _ in range(num_envs)]  # episode index per environment
    step = [0] * num_envs
    rewards: dict[str, list[float]] = {name: [] for name, _, _ in episodes}
    ray.get(scorer.reset.remote([episodes[i][1] for i in running]))
    while any(r is not None for r in running):
        envs = [e for e, r in enumerate(running) if r is not None]
        frames = np.stack([episodes[running[e]][2][step[e]] for e in envs])
        progress = ray.get(scorer.step.remote(frames, envs))
        for e, value in zip(envs, progress):
            rewards[episodes[running[e]][0]].append(float(value))
            step[e] += 1
            if step[e] == len(episodes[running[e]][2]):  # episode over: start the next one
                running[e] = queue.pop(0) if queue else None
                step[e] = 0
                if running[e] is not None:
                    ray.get(scorer.reset.remote(episodes[running[e]][1], env_ids=[e]))
    return rewards


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    init_ray(RayConfig())  # the cluster of `ray job submit` (RAY_ADDRESS), else a local Ray
    rewards = score(args)
    for name, values in rewards.items():
        logger.info(
            "%s: %d steps, progress first %.2f, max %.2f, final %.2f",
            name,
            len(values),
            values[0],
            max(values),
            values[-1],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
