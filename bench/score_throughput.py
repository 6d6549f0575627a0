"""Frames scored per second: ``rayrm score`` against ``rayrm evaluate`` and a bare loop.

Three ways to get every frame's reward for the same episodes of a generated LeRobot v3
dataset (one camera, mp4 written with PyAV), with the same checkpoint (a randomly initialised
model over the ``tiny`` backbone by default) and the same number of torch threads:

* ``score``    - ``rayrm.score.run_score`` on a local Ray: decode in read tasks, embed in
  the embedding actor, group per episode, score (causal and prefix) and write parts in the
  scoring actor, merge into ``rewards.parquet``;
* ``evaluate`` - the scoring pass of ``rayrm evaluate`` (``score_episodes``, ``split: all``,
  no rewound copies): the same input through the same embedding pipeline to one scoring
  actor, every curve gathered on the driver; its metrics, figures and report are not timed;
* ``loop``     - one process: PyAV decodes each episode (``rayrm.data.lerobot``'s
  decoder), and ``RewardScorer.step`` takes the frames one at a time, as an RL loop would.

Each figure is frames / wall seconds of the whole call (Ray start-up excluded: ``ray.init``
is done once before). The last line is the ratio score / loop::

    python bench/score_throughput.py                         # 60 episodes x 150 frames, 32x32
    python bench/score_throughput.py --episodes 20 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time

import numpy as np
import ray
import torch

from rayrm.config import (
    BackboneConfig,
    Config,
    EmbedConfig,
    EvaluateConfig,
    ModelConfig,
    ScoreConfig,
    resolve_paths,
    to_dict,
)
from rayrm.data.lerobot import decode_episode, scan_lerobot
from rayrm.data.lerobot_writer import LeRobotEpisode, write_lerobot_dataset
from rayrm.evaluate.scorer import RewardScorer
from rayrm.evaluate.scoring import score_episodes
from rayrm.score.run import run_score
from rayrm.train.checkpoint import save_checkpoint
from rayrm.train.model import RewardTransformer

logger = logging.getLogger("bench.score_throughput")
CAMERA = "observation.images.top"
TASKS = ("Pick the red cube.", "Open the drawer.", "Stack the blocks.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--frames", type=int, default=150, help="frames per episode")
    parser.add_argument("--size", type=int, default=32, help="square frame side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every side")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--workdir", help="folder for the dataset and outputs (default tmp)")
    return parser.parse_args(argv)


def write_dataset(root: str, episodes: int, frames: int, size: int) -> str:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    out = []
    for i in range(episodes):
        base = rng.integers(20, 120)
        video = np.stack(
            [np.clip(base + t * 100 / frames + 40 * ramp, 0, 255) for t in range(frames)]
        ).astype(np.uint8)
        video = np.broadcast_to(video, (frames, size, size, 3)).copy()
        out.append(LeRobotEpisode(task=TASKS[i % 3], frames={CAMERA: video}, success=True))
    return write_lerobot_dataset(root, out, fps=30, episodes_per_file=10)


def write_checkpoint(path: str, backbone: BackboneConfig) -> str:
    from rayrm.backbones import build_backbone

    facts = build_backbone(backbone, "cpu")
    visual_dim, language_dim = facts.visual_dim, facts.language_dim
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=16
    )
    model = RewardTransformer(model_cfg, visual_dim, language_dim)
    meta = {
        "train": {},
        "embeddings": None,
        "backbone": dataclasses.asdict(backbone),
        "stage_names": None,
        "split": {"val_ratio": 0.0, "seed": 0, "val_episodes": []},
    }
    save_checkpoint(path, model.eval(), meta)
    return path


def bench_loop(root: str, checkpoint: str, threads: int) -> tuple[int, float]:
    """Decode each episode with PyAV and step ``RewardScorer`` frame by frame."""
    torch.set_num_threads(threads)
    episodes, _ = scan_lerobot(root, [CAMERA], None, None)
    start = time.perf_counter()
    scorer = RewardScorer.from_checkpoint(checkpoint, device="cpu")
    frames = 0
    for info in episodes:
        scorer.reset([info.prompt])
        for frame in decode_episode(info):
            scorer.step(frame[None])
            frames += 1
    return frames, time.perf_counter() - start


def bench_score(cfg: Config, checkpoint: str) -> tuple[int, float]:
    start = time.perf_counter()
    result = run_score(cfg, checkpoint)
    return result.num_frames, time.perf_counter() - start


def bench_evaluate(cfg: Config, checkpoint: str) -> tuple[int, float]:
    evaluate = dataclasses.replace(cfg.evaluate, input=cfg.score.input, split="all", rewind=False)
    start = time.perf_counter()
    (rows,) = score_episodes(dataclasses.replace(cfg, evaluate=evaluate), [checkpoint], None)
    seconds = time.perf_counter() - start
    return sum(rows["num_frames"]), seconds


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="score-bench-")
    root = write_dataset(os.path.join(work, "ds"), args.episodes, args.frames, args.size)
    backbone = BackboneConfig(name=args.backbone, visual_dim=16, language_dim=8, seed=3)
    checkpoint = write_checkpoint(os.path.join(work, "ckpt"), backbone)
    cfg = resolve_paths(
        Config(
            workdir=work,
            backbone=backbone,
            embed=EmbedConfig(batch_size=256, frames_per_block=1024, torch_threads=args.threads),
            evaluate=EvaluateConfig(camera=CAMERA, batch_size=256),
            score=ScoreConfig(
                input=root,
                camera=CAMERA,
                output=os.path.join(work, "scores"),
                torch_threads=args.threads,
                overwrite=True,
            ),
        )
    )
    logger.info("config: %s", to_dict(cfg.score))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {
        "loop": bench_loop(root, checkpoint, args.threads),
        "evaluate": bench_evaluate(cfg, checkpoint),
        "score": bench_score(cfg, checkpoint),
    }
    ray.shutdown()
    print(
        f"{args.episodes} episodes x {args.frames} frames, {args.size}x{args.size}, "
        f"backbone {args.backbone}, {args.threads} torch thread(s)"
    )
    for name, (frames, seconds) in results.items():
        print(f"{name:9s} {frames:7d} frames {seconds:7.1f} s {frames / seconds:9.0f} frames/s")
    rate = {k: f / s for k, (f, s) in results.items()}
    print(f"score / evaluate: {rate['score'] / rate['evaluate']:.2f}")
    print(f"score / loop: {rate['score'] / rate['loop']:.2f}")


if __name__ == "__main__":
    main()
