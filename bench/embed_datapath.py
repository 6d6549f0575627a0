"""The embedding data path alone: what the driver does and receives, and its ceiling.

    .venv/bin/python bench/embed_datapath.py [--frames 100000] [--dims 64 4096]

A free backbone (``FreeBackbone``: zeros of the asked size, no model cost) runs ``rayrm embed``
on the same HDF5 frames once per embedding size D, on a local Ray with ``--cpus`` logical
CPUs. For each D it prints:

* the driver process's CPU-seconds per million frames (``getrusage`` of this process only:
  Ray's own daemons are child processes, not counted; Ray Data's executor threads in the
  driver are);
* the bytes of pipeline output the driver received per million frames
  (``EmbedResult.driver_bytes``: chunk records; embeddings go from writer tasks to storage);
* frames/s end to end and per logical CPU: the ceiling the data path puts on any backbone.

Last line: the ratio of the driver's CPU-seconds per million frames at the largest D to the
smallest (goal <= 1.3: the driver's work must not grow with the embedding size).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
from collections.abc import Sequence

import h5py
import numpy as np
import ray

from rayrm.backbones.base import Backbone
from rayrm.config import BackboneConfig, Config, EmbedConfig, RayConfig
from rayrm.embed import run_embed

logger = logging.getLogger("bench.embed_datapath")
PROMPT = "Put the cube in the pot."


class FreeBackbone(Backbone):
    """Zeros of ``cfg.visual_dim`` per frame: the pipeline's cost without a model's."""

    thread_safe = True
    prompts_on_cpu = True

    def __init__(self, cfg: BackboneConfig, device=None):
        super().__init__(cfg, device)
        self.visual_dim, self.language_dim = cfg.visual_dim, cfg.language_dim

    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(frames), self.visual_dim), np.float32)

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(prompts), self.language_dim), np.float32)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64, help="square frame side")
    parser.add_argument("--episode-frames", type=int, default=100)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--frames-per-block", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    return parser.parse_args(argv)


def write_episodes(path: str, args) -> None:
    """Episodes of random frames; all but ten are HDF5 hard links to those ten (every
    episode is read the same way, and the file stays small)."""
    rng = np.random.default_rng(0)
    n = max(1, args.frames // args.episode_frames)
    shape = (args.episode_frames, args.size, args.size, 3)
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = PROMPT
        for i in range(n):
            name = f"episode_{i:06d}"
            if i < 10:
                f.create_group(name).create_dataset(
                    "side_cam", data=rng.integers(0, 256, shape, np.uint8)
                )
            else:
                f[name] = f[f"episode_{i % 10:06d}"]


def driver_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(dim: int, h5_path: str, workdir: str, args) -> dict:
    cfg = Config(
        workdir=workdir,
        backbone=BackboneConfig(name="embed_datapath:FreeBackbone", visual_dim=dim, language_dim=8),
        embed=EmbedConfig(
            input=h5_path,
            output=os.path.join(workdir, f"embeddings_{dim}"),
            batch_size=args.batch_size,
            frames_per_block=args.frames_per_block,
            overwrite=True,
        ),
        ray=RayConfig(),
    )
    before = driver_cpu_seconds()
    result = run_embed(cfg)
    cpu = driver_cpu_seconds() - before
    per_million = 1e6 / result.embedded_frames
    return {
        "dim": dim,
        "frames": result.embedded_frames,
        "driver_cpu_s_per_mframe": cpu * per_million,
        "driver_bytes_per_mframe": result.driver_bytes * per_million,
        "frames_per_s": result.frames_per_second,
        "frames_per_s_per_cpu": result.frames_per_second / args.cpus,
        "seconds": result.seconds,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)  # the backbone is imported by name, here and in every worker
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="rayrm-datapath-") as tmp:
        workdir = args.workdir or tmp
        h5_path = os.path.join(workdir, "episodes.h5")
        write_episodes(h5_path, args)
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            run_one(args.dims[0], h5_path, workdir, args)  # warm-up: Ray Data's own actors
            rows = [run_one(dim, h5_path, workdir, args) for dim in args.dims]
        finally:
            ray.shutdown()
    for row in rows:
        logger.info(
            "D=%d: %d frames in %.1f s, %.0f frames/s (%.0f per logical CPU); driver "
            "%.2f CPU-s and %.0f bytes received per million frames",
            row["dim"],
            row["frames"],
            row["seconds"],
            row["frames_per_s"],
            row["frames_per_s_per_cpu"],
            row["driver_cpu_s_per_mframe"],
            row["driver_bytes_per_mframe"],
        )
    ratio = rows[-1]["driver_cpu_s_per_mframe"] / rows[0]["driver_cpu_s_per_mframe"]
    logger.info(
        "driver CPU-s per million frames, D=%d / D=%d: %.2f",
        rows[-1]["dim"],
        rows[0]["dim"],
        ratio,
    )


if __name__ == "__main__":
    main()
