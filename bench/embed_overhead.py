"""What the rayrm embedding pipeline costs on top of the model: frames/s against a bare loop.

Two numbers, in frames per second, on the same frames with the same backbone and the same
number of torch compute threads:

* ``bare``     - ``Backbone.embed_frames`` over the frames already in memory, in batches of the
  same size as the pipeline's, with the same allocator setting as its actors
  (``keep_large_allocations_on_the_heap``); only the calls are timed, reading HDF5 is not;
* ``pipeline`` - ``rayrm.embed.run_embed`` on a local Ray: HDF5 in, read tasks, the actor
  pool, driver-side assembly, Parquet shards and manifest out. Its start-up (scan, backbone
  load for the prompts, actor start, model load) is timed; ``ray.init`` is reported apart.

The bare loop runs before and after each pipeline run and their mean is that run's
reference, so a load change on a shared machine during the run shows up as the gap between
the two. The frame count is sized from a short calibration so that the bare loop takes
``--seconds``. The last line is the ratio pipeline / bare (goal on a 2-core CPU machine with
``tiny``: >= 0.9), the median over ``--repeat`` runs::

    python bench/embed_overhead.py                       # tiny, 64x64, 1 thread, ~1 min each
    python bench/embed_overhead.py --repeat 3            # three pipeline runs, the median
    python bench/embed_overhead.py --threads 2 --seconds 30
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import h5py
import numpy as np
import ray
import torch

from rayrm.backbones import build_backbone
from rayrm.config import BackboneConfig, Config, EmbedConfig, RayConfig
from rayrm.embed import run_embed
from rayrm.embed.actor import keep_large_allocations_on_the_heap

logger = logging.getLogger("bench.embed_overhead")
PROMPT = "Put the cube in the pot."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="bare loop duration")
    parser.add_argument("--size", type=int, default=64, help="square frame side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--frames-per-block", type=int, help="frames per read block (default 8 batches)"
    )
    parser.add_argument("--episode-frames", type=int, default=200)
    parser.add_argument(
        "--distinct-episodes", type=int, default=400, help="episodes with their own frames"
    )
    parser.add_argument("--workdir", help="folder for the HDF5 and Parquet (default tmp)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="pipeline runs, each on a fresh Ray and followed by a bare loop; the ratio "
        "printed last is their median (runs on a shared machine vary by several percent)",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="run a tiny Ray Data job before timing, so Ray Data's own actors (stats, "
        "autoscaling) are up, as on a cluster that ran any dataset before",
    )
    return parser.parse_args(argv)


def episode_frames(index: int, args) -> np.ndarray:
    """Frames of episode ``index``: random, but the same for both sides."""
    rng = np.random.default_rng(index)
    shape = (args.episode_frames, args.size, args.size, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def batches(frames_of, n_episodes: int, batch_size: int):
    """The episodes' frames in batches of ``batch_size`` across episode ends, as the
    pipeline's read blocks are (the batch size changes how fast the backbone runs: large
    temporary tensors come from mmap, smaller ones from the heap)."""
    pending, count = [], 0
    for i in range(n_episodes):
        pending.append(frames_of(i))
        count += len(pending[-1])
        while count >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size]
            pending, count = [joined[batch_size:]], count - batch_size
    if count:
        yield np.concatenate(pending)


def bare_fps(backbone, frames_of, n_episodes: int, batch_size: int) -> float:
    """Frames/s of ``embed_frames`` alone over the episodes' frames (loading not timed)."""
    seconds, frames = 0.0, 0
    prompts = [PROMPT] * batch_size
    for batch in batches(frames_of, n_episodes, batch_size):
        t = time.perf_counter()
        backbone.embed_frames(batch, prompts[: len(batch)])
        seconds += time.perf_counter() - t
        frames += len(batch)
    return frames / seconds


def calibrate(backbone, args) -> int:
    """Episodes for a bare loop of about ``args.seconds``."""
    frames = episode_frames(0, args)
    bare_fps(backbone, lambda i: frames, 1, args.batch_size)  # warm-up
    fps = bare_fps(
        backbone, lambda i: frames, max(1, int(2000 / args.episode_frames)), args.batch_size
    )
    return max(2, round(fps * args.seconds / args.episode_frames))


def write_episodes(path: str, n_episodes: int, args) -> None:
    """``n_episodes`` episodes, of which ``--distinct-episodes`` hold their own frames and the
    rest are HDF5 hard links to them (both sides read every episode the same way). Writing GBs
    of distinct frames made the timed loops that followed it here up to 25% slower for
    minutes, whichever side ran first."""
    distinct = min(n_episodes, args.distinct_episodes)
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = PROMPT
        for i in range(n_episodes):
            name = f"episode_{i:06d}"
            if i < distinct:
                f.create_group(name).create_dataset("side_cam", data=episode_frames(i, args))
            else:
                f[name] = f[f"episode_{i % distinct:06d}"]


def hdf5_reader(path: str):
    handle = h5py.File(path, "r")
    names = sorted(handle)
    return lambda i: handle[names[i]]["side_cam"][()]


def run_pipeline(backbone_cfg: BackboneConfig, h5_path: str, workdir: str, args):
    cfg = Config(
        workdir=workdir,
        backbone=backbone_cfg,
        embed=EmbedConfig(
            input=h5_path,
            output=os.path.join(workdir, "embeddings"),
            batch_size=args.batch_size,
            frames_per_block=args.frames_per_block or 8 * args.batch_size,
            torch_threads=args.threads,
            overwrite=True,
        ),
        ray=RayConfig(),
    )
    return run_embed(cfg)


def pipeline_on_fresh_ray(backbone_cfg: BackboneConfig, h5_path: str, workdir: str, args):
    """One pipeline run on a Ray started for it (``ray.init`` is not in the run's time)."""
    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    logger.info("ray.init: %.1f s (not in the pipeline's time)", time.perf_counter() - start)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.warm:
        ray.data.range(10).map_batches(lambda b: b).materialize()
    try:
        return run_pipeline(backbone_cfg, h5_path, workdir, args)
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_large_allocations_on_the_heap()  # as the pipeline's actors do on the CPU
    backbone_cfg = BackboneConfig(name="tiny")
    backbone = build_backbone(backbone_cfg)
    n_episodes = calibrate(backbone, args)
    n_frames = n_episodes * args.episode_frames
    logger.info(
        "%d episodes x %d frames of %dx%d", n_episodes, args.episode_frames, args.size, args.size
    )
    ratios = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        h5_path = os.path.join(workdir, "episodes.h5")
        write_episodes(h5_path, n_episodes, args)
        os.sync()  # else the kernel writes GBs of dirty pages back during the timed loops
        frames_of = hdf5_reader(h5_path)
        # Untimed: the first pass of a fresh process ran 10% slower here than later ones.
        bare_fps(backbone, frames_of, max(1, n_episodes // 5), args.batch_size)
        before = bare_fps(backbone, frames_of, n_episodes, args.batch_size)
        logger.info("bare: %.0f frames/s", before)
        for run in range(1, args.repeat + 1):
            result = pipeline_on_fresh_ray(backbone_cfg, h5_path, workdir, args)
            after = bare_fps(backbone, frames_of, n_episodes, args.batch_size)
            bare = (before + after) / 2  # the bare loops on either side of this run
            steady = n_frames / (result.seconds - result.startup_seconds)
            ratios.append(result.frames_per_second / bare)
            logger.info(
                "run %d: pipeline %.0f frames/s (%d frames, start-up included; start-up %.1f s, "
                "after it %.0f frames/s), bare %.0f frames/s after it; ratio %.3f, after the "
                "start-up %.3f",
                run,
                result.frames_per_second,
                n_frames,
                result.startup_seconds,
                steady,
                after,
                ratios[-1],
                steady / bare,
            )
            before = after
    logger.info(
        "setup: tiny backbone, %dx%d frames, batch %d, blocks of %d, %d torch thread(s), "
        "%d cores, Ray Data %s",
        args.size,
        args.size,
        args.batch_size,
        args.frames_per_block or 8 * args.batch_size,
        args.threads,
        os.cpu_count(),
        "warm" if args.warm else "cold (its own actors start in the timed run)",
    )
    if len(ratios) > 1:
        logger.info("ratios: %s (the median last)", ", ".join(f"{r:.3f}" for r in ratios))
    logger.info("ratio pipeline/bare: %.3f", statistics.median(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
