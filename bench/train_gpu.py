"""Training throughput: the compiled model-only step rate vs rayrm's whole training loop, one run.

    python bench/train_gpu.py                  # GPU: reference sizes, B 256, L 32, bf16, compiled
    python bench/train_gpu.py --tiny           # CPU smoke run (small model, few steps)

Two numbers, in windows (samples) per second, same model, batch and optimizer:

* ``model`` - the step alone: forward, MSE loss, backward, gradient clipping and a fused AdamW
  update of the reward transformer at the reference sizes (docs/recipe.md#model: d 512, 4
  layers, 8 heads, inputs D 768 + 384) on windows already gathered on the device (a few random
  batches, rotated), bf16 autocast, ``torch.compile``. This is the ceiling: no data at all.
* ``rayrm`` - ``rayrm.train.run_train`` on a local Ray with one GPU worker: the embedding
  folder read by the worker itself (its episodes' chunks), the episode buffer on the device,
  windows sampled per docs/recipe.md#windows (rewind 0.8) and gathered there each step, the same
  compiled step, checkpoints and validation. Its figure is the loop's own ``windows_per_s``
  over the last validation interval (steady state: compilation happens in the first); the
  whole run's wall time, Ray start-up, compilation and validations included, is printed
  beside it.

Episodes are random embeddings (throughput does not depend on their values), written as an
embedding folder (``write_episode_folder``: one chunk per episode, episodes table, manifest).
The last line is the ratio rayrm / model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import torch

from rayrm.config import Config, ModelConfig, TrainConfig
from rayrm.data import schema
from rayrm.data.chunks import write_episode_folder
from rayrm.devices import default_device
from rayrm.train.loop import Inputs, LossWeights, optimizer_and_schedule, window_loss
from rayrm.train.model import RewardTransformer
from rayrm.train.trainer import run_train

logger = logging.getLogger("bench.train_gpu")
VISUAL_DIM, LANGUAGE_DIM = 768, 384  # DINOv2 ViT-B + MiniLM, the recipe's inputs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--frames", type=int, default=300, help="mean frames per episode")
    parser.add_argument("--model-steps", type=int, default=300, help="timed model-only steps")
    parser.add_argument("--steps", type=int, default=3000, help="rayrm training steps")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small model and few steps (CPU)")
    parser.add_argument("--workdir", help="folder for the shards and the run (default tmp)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    args.model = ModelConfig()
    if args.tiny:
        args.model = ModelConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16)
        args.batch, args.episodes, args.frames = 32, 40, 60
        args.model_steps, args.steps = 20, 60
    return args


def write_shards(path: str, n_episodes: int, mean_frames: int) -> None:
    """Random episode embeddings as an embedding folder (one chunk per episode)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(mean_frames // 2, mean_frames * 3 // 2, n_episodes)
    rows = {
        "episode_id": [f"episode_{i:05d}" for i in range(n_episodes)],
        "source_file": ["bench"] * n_episodes,
        "num_frames": lengths.tolist(),
        "prompt": ["Put the cube in the pot."] * n_episodes,
        "success": [True] * n_episodes,
        "stage_boundaries": [[] for _ in range(n_episodes)],
        "visual_embedding": [rng.standard_normal(t * VISUAL_DIM, np.float32) for t in lengths],
        "language_embedding": [rng.standard_normal(LANGUAGE_DIM, np.float32)] * n_episodes,
        "failure_mode": [None] * n_episodes,
    }
    table = pa.Table.from_pydict(rows, schema=schema.EPISODE_SCHEMA)
    manifest = {"backbone": {"name": "bench-random"}, "visual_dim": VISUAL_DIM}
    write_episode_folder(path, table, {**manifest, "language_dim": LANGUAGE_DIM})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(args, device: torch.device) -> float:
    """Windows/s of the compiled step on pre-gathered device batches."""
    torch.manual_seed(0)
    model = RewardTransformer(args.model, VISUAL_DIM, LANGUAGE_DIM).to(device)
    step_model = model if args.no_compile else torch.compile(model)
    cfg = TrainConfig()
    optimizer, schedule = optimizer_and_schedule(model, cfg, args.model_steps * 2)
    seq = args.model.max_seq_len
    batches = [
        Inputs(
            visual=torch.randn(args.batch, seq, VISUAL_DIM, device=device),
            language=torch.randn(args.batch, LANGUAGE_DIM, device=device),
            progress=torch.rand(args.batch, seq, device=device),
            known=torch.ones(args.batch, dtype=torch.bool, device=device),
            done=torch.zeros(args.batch, seq, device=device),
        )
        for _ in range(4)
    ]
    bf16 = device.type == "cuda"

    def step(inputs: Inputs) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = window_loss(
                step_model, inputs, cfg.gt_stage_prob, weights=LossWeights.of(cfg)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()

    start = time.perf_counter()
    for i in range(10):  # compilation and warm-up
        step(batches[i % len(batches)])
    synchronize(device)
    logger.info("model-only warm-up (compilation) %.1f s", time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(args.model_steps):
        step(batches[i % len(batches)])
    synchronize(device)
    return args.model_steps * args.batch / (time.perf_counter() - start)


def rayrm_loop(args, workdir: str, use_gpu: bool) -> tuple[float, float]:
    """(steady windows/s of the last validation interval, wall seconds of the whole run)."""
    embeddings = os.path.join(workdir, "embeddings")
    write_shards(embeddings, args.episodes, args.frames)
    cfg = Config(
        workdir=workdir,
        model=args.model,
        train=TrainConfig(
            embeddings=embeddings,
            output=os.path.join(workdir, "train"),
            use_gpu=use_gpu,
            batch_size=args.batch,
            steps=args.steps,
            val_every=max(1, args.steps // 3),
            compile=not args.no_compile,
            max_failures=0,
        ),
    )
    start = time.perf_counter()
    result = run_train(cfg)
    return result.metrics["windows_per_s"], time.perf_counter() - start


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = default_device()
    model = model_only(args, device)
    logger.info("model-only: %.0f windows/s", model)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training worker is another process on the same GPU
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            steady, wall = rayrm_loop(args, workdir, device.type == "cuda")
    finally:
        ray.shutdown()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {
        "device": name,
        "batch": args.batch,
        "model": vars(args.model),
        "compiled": not args.no_compile,
        "bf16": device.type == "cuda",
        "windows_per_s": {"model": model, "rayrm": steady},
        "rayrm_steps": args.steps,
        "rayrm_wall_s": wall,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    logger.info(
        "rayrm loop: %.0f windows/s over the last validation interval; whole run %d steps in "
        "%.1f s (%.0f windows/s with start-up, compilation and validation)",
        steady,
        args.steps,
        wall,
        args.steps * args.batch / wall,
    )
    logger.info("setup: %s", json.dumps({k: v for k, v in report.items() if k != "windows_per_s"}))
    logger.info("ratio rayrm/model: %.3f", steady / model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
