"""Training input: bytes each rank reads, and rayrm's window pipeline vs the reference DataLoader.

    .venv/bin/python bench/train_input.py [--episodes 200] [--frames 300] [--seconds 10]

Bytes per rank: the episodes are written as an embedding folder (``write_episode_folder``),
assigned to 1, 2 and 4 ranks as ``rayrm train`` assigns them (``assign_episodes``), and each
rank reads its own with the reader the workers use (``EpisodeReader``, what
``rayrm.train.loop.load_episodes`` runs): the bytes read per rank, and their total, which must
be one copy of the training set whatever the worker count.

Both sides produce batches of ``--batch`` windows of L=32 embeddings (D=768) with ReWiND targets
and rewind augmentation (docs/recipe.md#windows), from the same synthetic embeddings:

* reference: a ``torch.utils.data.Dataset`` built the reference pipeline's way: per sample, a
  linear scan over the episodes for the length-weighted choice, an HDF5 slice of the window,
  padding through Python lists; a ``DataLoader`` with 4 workers collates the batch. Rewound frames
  are taken from the slice already read (the reference pipeline reads each one from HDF5 again; not
  copied here, so the baseline is the fair one).
* rayrm: the episodes loaded once from the embedding folder into a flat tensor
  (``EpisodeReader`` + ``episodes_from_table``), then ``sample_windows`` + ``window_inputs``:
  index tensors and one gather per batch (what each training worker runs between optimizer
  steps).

Prints windows/s of each and, last, the ratio rayrm / reference (goal >= 20 on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import h5py
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from rayrm.data import schema
from rayrm.data.chunks import write_episode_folder
from rayrm.data.shards import EpisodeReader, episodes_from_table
from rayrm.train.loop import DeviceEpisodes, window_inputs
from rayrm.train.trainer import assign_episodes
from rayrm.train.windows import sample_windows

logger = logging.getLogger("bench.train_input")
SEQ_LEN, DIM, LANG_DIM = 32, 768, 384


def make_episodes(n: int, mean_frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_frames // 2, mean_frames * 3 // 2, n)
    return [rng.standard_normal((t, DIM), dtype=np.float32) for t in lengths]


def write_reference_hdf5(path: str, episodes: list[np.ndarray]) -> None:
    """The reference pipeline's embedding buffer: one group per episode."""
    with h5py.File(path, "w") as f:
        for i, emb in enumerate(episodes):
            g = f.create_group(f"episode_{i:05d}")
            g["dino_embeddings"] = emb
            g["minlm_task_embedding"] = np.zeros((1, LANG_DIM), np.float32)
            g["progress"] = (np.arange(len(emb), dtype=np.float32) + 1) / len(emb)


def write_folder(path: str, episodes: list[np.ndarray]) -> None:
    rows = {
        "episode_id": [f"episode_{i:05d}" for i in range(len(episodes))],
        "source_file": ["bench"] * len(episodes),
        "num_frames": [len(e) for e in episodes],
        "prompt": ["task"] * len(episodes),
        "success": [True] * len(episodes),
        "stage_boundaries": [[] for _ in episodes],
        "visual_embedding": [e.ravel() for e in episodes],
        "language_embedding": [np.zeros(LANG_DIM, np.float32) for _ in episodes],
        "failure_mode": [None] * len(episodes),
    }
    table = pa.Table.from_pydict(rows, schema=schema.EPISODE_SCHEMA)
    write_episode_folder(path, table, {"visual_dim": DIM, "language_dim": LANG_DIM})


class ReferenceStyleDataset(Dataset):
    """docs/recipe.md#windows the way the reference pipeline does it (the bottleneck this
    benchmark measures)."""

    def __init__(self, path: str, rewind_prob: float = 0.8):
        self.path, self.rewind_prob = path, rewind_prob
        with h5py.File(path, "r") as f:
            self.keys = sorted(f)
            self.lengths = [len(f[k]["progress"]) for k in self.keys]
        self.file = None

    def __len__(self) -> int:
        return sum(self.lengths)

    def _pick_episode(self) -> int:
        r, cumulative = np.random.randint(sum(self.lengths)), 0
        for i, n in enumerate(self.lengths):  # linear lookup, as the reference pipeline
            cumulative += n
            if r < cumulative:
                return i
        return len(self.lengths) - 1

    def __getitem__(self, _):
        if self.file is None:  # one handle per DataLoader worker
            self.file = h5py.File(self.path, "r")
        i = self._pick_episode()
        group, total = self.file[self.keys[i]], self.lengths[i]
        a = np.random.randint(0, total - 3)
        b = np.random.randint(a + 3, total)
        frames = list(group["dino_embeddings"][a:b])  # per-sample HDF5 slice
        progress = [j / (total - a) for j in range(b - a)]
        if np.random.rand() < self.rewind_prob:
            s = np.random.randint(a, b - 2)
            back = list(range(b - 2, s, -1))
            frames += [frames[f - a] for f in back]  # already read: no second HDF5 read
            progress += [(f - a) / (total - a) for f in back]
        if len(frames) < SEQ_LEN:
            frames += [frames[-1]] * (SEQ_LEN - len(frames))
            progress += [progress[-1]] * (SEQ_LEN - len(progress))
        else:
            idx = np.linspace(0, len(frames) - 1, SEQ_LEN).astype(int)
            frames, progress = [frames[j] for j in idx], [progress[j] for j in idx]
        language = torch.from_numpy(group["minlm_task_embedding"][0])
        return torch.from_numpy(np.stack(frames)), language, torch.tensor(progress)


def reference_windows_per_s(path: str, batch: int, seconds: float) -> float:
    loader = DataLoader(ReferenceStyleDataset(path), batch_size=batch, num_workers=4, shuffle=True)
    iterator, windows = iter(loader), 0
    next(iterator)  # workers started
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        visual, _, _ = next(iterator)
        windows += len(visual)
    return windows / (time.perf_counter() - start)


def rayrm_windows_per_s(path: str, batch: int, seconds: float) -> tuple[float, float]:
    start = time.perf_counter()
    host = episodes_from_table(EpisodeReader(path).read())
    episodes = DeviceEpisodes.from_batch(host, torch.device("cpu"), False, ["task"])
    load_seconds = time.perf_counter() - start
    generator, windows = torch.Generator().manual_seed(0), 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        w = sample_windows(episodes.lengths, episodes.offsets, batch, SEQ_LEN, 0.8, generator)
        inputs = window_inputs(episodes, w)
        windows += len(inputs.visual)
    return windows / (time.perf_counter() - start), load_seconds


def bytes_per_rank(path: str, workers: int) -> list[int]:
    """Parquet bytes each of ``workers`` ranks reads for its own episodes."""
    index = EpisodeReader(path).index()
    ids = index.column("episode_id").to_pylist()
    frames = dict(zip(ids, index.column("num_frames").to_pylist()))
    read = []
    for rank_ids in assign_episodes(ids, frames, workers):
        reader = EpisodeReader(path)
        reader.read(rank_ids)
        read.append(reader.bytes_read)
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--frames", type=int, default=300, help="mean frames per episode")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    episodes = make_episodes(args.episodes, args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        h5_path, pq_path = os.path.join(tmp, "reference.h5"), os.path.join(tmp, "embeddings")
        write_reference_hdf5(h5_path, episodes)
        write_folder(pq_path, episodes)
        frames = sum(len(e) for e in episodes)
        logger.info(
            "%d episodes, %d frames, D=%d, L=%d, batch %d",
            len(episodes),
            frames,
            DIM,
            SEQ_LEN,
            args.batch,
        )
        one_copy = sum(e.nbytes for e in episodes)
        for workers in (1, 2, 4):
            read = bytes_per_rank(pq_path, workers)
            logger.info(
                "%d rank(s): %s MB read per rank, %.1f MB in total (%.3f of one copy)",
                workers,
                ", ".join(f"{b / 1e6:.1f}" for b in read),
                sum(read) / 1e6,
                sum(read) / one_copy,
            )
        reference = reference_windows_per_s(h5_path, args.batch, args.seconds)
        logger.info("reference-style DataLoader (4 workers): %.0f windows/s", reference)
        ours, load = rayrm_windows_per_s(pq_path, args.batch, args.seconds)
        logger.info("rayrm windows (after a %.2f s one-time load): %.0f windows/s", load, ours)
    logger.info("ratio rayrm / reference: %.1f", ours / reference)


if __name__ == "__main__":
    main()
