"""Peak memory of a rayrm embedding run at two dataset sizes: it must not grow with the size.

Each size runs in a fresh child process (its own local Ray, its own Python heap), which
samples every ``--every`` seconds with psutil: the driver's RSS, every Ray worker process's
RSS and USS (``ray::*``: read tasks, the embedding actor, Ray Data's own actors), the Ray
system processes (raylet, GCS, ...), and the object store in use. The frames are random
``--size`` x ``--size`` images, ``--frames`` per episode, in HDF5 files of up to 250 episodes;
the smaller size reads a subset of the larger one's files. The last lines compare the peaks::

    python bench/embed_memory.py                          # 500 and 2,000 episodes x 300 frames
    python bench/embed_memory.py --episodes 250 1000 --frames 100
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import h5py
import numpy as np
import psutil

logger = logging.getLogger("bench.embed_memory")
MAX_EPISODES_PER_FILE = 250
MB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--frames", type=int, default=300, help="frames per episode")
    parser.add_argument("--size", type=int, default=32, help="square frame side")
    parser.add_argument("--visual-dim", type=int, default=32)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--workdir", help="folder for HDF5 and Parquet (default tmp)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # input folder: run one size here
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the parent


def episodes_per_file(sizes: list[int]) -> int:
    """The largest count up to 250 that divides every size: each size is a set of files."""
    common = math.gcd(*sizes)
    return max(d for d in range(1, min(common, MAX_EPISODES_PER_FILE) + 1) if common % d == 0)


def write_files(folder: str, n_episodes: int, per_file: int, args) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(math.ceil(n_episodes / per_file)):
        path = os.path.join(folder, f"part{i:03d}.h5")
        with h5py.File(path, "w") as f:
            f.attrs["prompt"] = "Put the cube in the pot."
            first = i * per_file
            for e in range(first, min(n_episodes, first + per_file)):
                shape = (args.frames, args.size, args.size, 3)
                frames = rng.integers(0, 256, shape, dtype=np.uint8)
                f.create_group(f"episode_{e:06d}").create_dataset("side_cam", data=frames)
        paths.append(path)
    return paths


def input_folder(root: str, paths: list[str], n_episodes: int, per_file: int) -> str:
    """A folder with links to the files holding the first ``n_episodes`` episodes."""
    folder = os.path.join(root, f"input_{n_episodes}")
    os.makedirs(folder)
    for path in paths[: n_episodes // per_file]:
        os.symlink(path, os.path.join(folder, os.path.basename(path)))
    return folder


def run_child(folder: str, workdir: str, args) -> dict:
    result = os.path.join(workdir, f"result_{os.path.basename(folder)}.json")
    command = [sys.executable, __file__, "--child", folder, "--result", result]
    command += ["--frames", str(args.frames), "--size", str(args.size)]
    command += ["--visual-dim", str(args.visual_dim), "--every", str(args.every)]
    subprocess.run(command, check=True)
    with open(result) as f:
        return json.load(f)


def report(results: dict[int, dict]) -> None:
    keys = [k for k in next(iter(results.values())) if k.endswith("_mb")]
    logger.info("%-34s %s", "peak (MiB)", "  ".join(f"{n:>10d} ep" for n in results))
    for key in keys:
        logger.info("%-34s %s", key[:-3], "  ".join(f"{r[key]:>13.0f}" for r in results.values()))
    for key in ("seconds", "frames_per_second"):
        logger.info("%-34s %s", key, "  ".join(f"{r[key]:>13.1f}" for r in results.values()))
    small, large = results[min(results)], results[max(results)]
    for key in ("driver_rss_mb", "worker_rss_max_mb", "workers_rss_sum_mb"):
        logger.info(
            "%s: x%.2f for x%.1f episodes",
            key[:-3],
            large[key] / small[key],
            max(results) / min(results),
        )


def main_parent(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        data = os.path.join(root, "data")
        os.makedirs(data)
        start = time.perf_counter()
        per_file = episodes_per_file(args.episodes)
        paths = write_files(data, max(args.episodes), per_file, args)
        logger.info("wrote %d files in %.0f s", len(paths), time.perf_counter() - start)
        results = {}
        for n in sorted(args.episodes):
            results[n] = run_child(input_folder(root, paths, n, per_file), root, args)
            logger.info("%d episodes: %s", n, json.dumps(results[n]))
    report(results)


# --------------------------------------------------------------------------- the child


class Sampler(threading.Thread):
    """Peak memory of this process and of its Ray descendants, sampled in the background."""

    def __init__(self, every: float):
        super().__init__(daemon=True)
        self.every = every
        self.peaks: dict[str, float] = defaultdict(float)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()

    def sample(self) -> None:
        import ray

        me = psutil.Process()
        groups: dict[str, list[float]] = defaultdict(list)
        groups["driver_rss"].append(me.memory_info().rss)
        for proc in me.children(recursive=True):
            try:
                name = proc.name()
                if name.startswith("ray::"):
                    info = proc.memory_full_info()
                    groups["worker_rss"].append(info.rss)
                    groups["worker_uss"].append(info.uss)
                else:
                    groups["system_rss"].append(proc.memory_info().rss)
            except psutil.Error:
                continue  # a worker that just exited
        self.peak("driver_rss_mb", sum(groups["driver_rss"]))
        self.peak("worker_rss_max_mb", max(groups["worker_rss"], default=0))
        self.peak("workers_rss_sum_mb", sum(groups["worker_rss"]))
        self.peak("workers_uss_sum_mb", sum(groups["worker_uss"]))
        self.peak("ray_system_rss_sum_mb", sum(groups["system_rss"]))
        if ray.is_initialized():
            total = ray.cluster_resources().get("object_store_memory", 0)
            free = ray.available_resources().get("object_store_memory", total)
            self.peak("object_store_used_mb", total - free)

    def peak(self, key: str, value: float) -> None:
        self.peaks[key] = max(self.peaks[key], value / MB)


def main_child(args) -> None:
    import ray

    from rayrm.config import BackboneConfig, Config, EmbedConfig
    from rayrm.embed import run_embed

    sampler = Sampler(args.every)
    sampler.start()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = Config(
        workdir=os.path.dirname(args.child),
        backbone=BackboneConfig(name="tiny", visual_dim=args.visual_dim),
        embed=EmbedConfig(
            input=args.child,
            output=args.child + "_embeddings",
            batch_size=256,
            frames_per_block=1024,
        ),
    )
    try:
        result = run_embed(cfg)
        sampler.sample()
    finally:
        sampler.stopped.set()
        ray.shutdown()
    summary = dict(sampler.peaks)
    summary.update(
        episodes=result.num_episodes,
        frames=result.num_frames,
        seconds=result.seconds,
        frames_per_second=result.frames_per_second,
    )
    with open(args.result, "w") as f:
        json.dump(summary, f)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.child:
        main_child(args)
    else:
        main_parent(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
