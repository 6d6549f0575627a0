"""Embedding on Ray Data: raw HDF5 episodes in, Parquet episode shards out; resumable.

::

    scan (metadata and cheap checks, no frames; Ray tasks when there are several files)
      -> HDF5EpisodeDatasource      read tasks: fixed-size frame blocks, episodes in order
      -> map_batches(FrameEmbedder) actor pool (one per GPU with num_actors 0), restarted
                                    by Ray when an actor dies, its call retried; a call
                                    takes whole blocks and runs the backbone on
                                    ``batch_size`` frames at a time; a GPU actor runs
                                    ``calls_per_actor`` calls at once (copies of one
                                    overlap the compute of another)
      -> driver: EpisodeAssembler   frame embeddings -> whole episodes
      -> ShardWriter                every ``episodes_per_shard`` episodes: one Parquet file,
                                    written in tmp/ and renamed into shards/ (the commit)
      -> failures.json, manifest.json, then the folder is renamed to <output>

    prompts: one Ray task loads the backbone and embeds each distinct prompt once
             (:class:`BackboneFacts`; a GPU backbone never loads on the driver, and
             DINOv2/MiniLM prompts are embedded on a CPU while the GPU actors start)

Why the driver assembles episodes: Ray Data's groupby is an all-to-all barrier, so nothing
could be committed (or resumed) before every frame was embedded, and all embeddings would sit
in the object store at once. The driver instead receives each frame embedding once (4 bytes
per dimension; ~3 KB per frame for a 768-d backbone), keeps only unfinished episodes and the
next shard or two in memory, and commits shards as episodes finish. Reading, inference and
writing overlap: Ray Data streams read tasks into the actors while the driver consumes their
output and a background thread writes the previous shard. Memory is bounded by Ray Data's
streaming backpressure (an object-store budget of a few dozen blocks per actor, see
``_streaming_context``), not by the number of episodes.

Output folder, resume, overwrite
--------------------------------
A run works in ``.<output>.partial/`` beside ``<output>`` (same file system, so the final
rename is atomic)::

    run.json            settings that decide the embeddings (backbone, camera, prompt)
    shards/*.parquet    committed shards: whole episodes, each file appeared by one rename
    tmp/                shards being written (cleared at start)

The committed shards are the ledger: the episode ids in ``shards/`` are exactly the finished
episodes, so a rerun reads that one column back and embeds only the other episodes. A crash
loses at most the episodes not yet committed. Readers look at ``<output>`` only, which exists
once complete (``manifest.json`` is written last, then the folder is renamed), so no partial
Parquet file or partial set of them is ever visible to them.

=====================================================  ===================================
found at start                                         the run
=====================================================  ===================================
nothing                                                starts in a new ``.partial``
``.partial`` with the same settings                    resumes it (whatever ``overwrite``)
``.partial`` with other settings, or holding episodes  error; ``overwrite: true`` discards
no longer in the input (or with other frame counts)    it and starts again
``<output>`` (finished, or anything else)              error unless ``overwrite: true``;
                                                       the old output stays until the new
                                                       one is complete, then is replaced
``.partial`` locked by a running embed                 error
=====================================================  ===================================

Exactly once: each episode id appears in one committed shard at most (the rerun skips
committed ids; within a run the assembler takes each frame once and drops any repeat of a
finished episode, e.g. from a retried task), and before publishing the ids in ``shards/`` are
checked against the input: every episode that did not fail, once.

Bad input
---------
A problem of one episode does not stop the others: unreadable files, missing camera, wrong
dtype or shape, too few frames, NaN in pose or action, bad stage boundaries, a repeated
episode id (found by the scan), frames that fail to read, non-finite embeddings (found while
embedding). Each is a row of ``failures.json`` (``file``, ``episode``, ``key``, ``reason``;
episode ``-`` for a whole file). At the end, if more episodes failed than
``max_failed_episodes`` (default 0; -1 allows any number), the run raises
:class:`InvalidEpisodesError` (the CLI exits with 2) and publishes nothing; ``.partial`` keeps
the good episodes and ``failures.json``. Fix or remove the bad inputs, or allow them, and rerun:
it resumes, and retries only the failed episodes. Within the limit the output is published
with ``failures.json`` and ``num_failed_episodes`` in the manifest.
Abort at once, before any frame is read: unknown backbone, no input files, an existing output
without ``overwrite``. Errors that are not about one episode (the backbone raising, a lost
cluster, a full disk) abort the run; committed shards stay for the rerun.

Inputs are local paths or URLs (``s3://``, ``gs://``, ``file://``; see ``rayrm.data.hdf5``).
The output is a local or mounted path (the driver writes it; renames must be atomic).

Run: ``rayrm embed --config configs/demo.yaml`` (or ``jobs/embed.py`` on a cluster). Rerunning
the same command after a crash resumes.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import fcntl
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from rayrm.backbones import build_backbone
from rayrm.backbones.base import backbone_class
from rayrm.config import BackboneConfig, Config, EmbedConfig
from rayrm.data import schema
from rayrm.data.hdf5 import (
    EpisodeInfo,
    EpisodeProblem,
    HDF5EpisodeDatasource,
    InvalidEpisodesError,
    is_url,
    list_hdf5_files,
    merge_scans,
    read_error,
    scan_episodes,
    scan_file,
)
from rayrm.data.shards import replace_folder

logger = logging.getLogger(__name__)

FORMAT = "rayrm.embeddings/1"
FAILURES_NAME = "failures.json"
RUN_NAME = "run.json"
PARTIAL_SUFFIX = "partial"
_MAX_SHARD_BYTES = 256 << 20  # a shard is committed early when its embeddings reach this
_MAX_SCAN_TASKS = 64
_BLOCKS_PER_READ_TASK = 16
_CALLS_QUEUED_PER_ACTOR = 4
_GPU_CALLS_PER_ACTOR = 3
# Ray Data's object store budget for one pipeline run, in blocks per actor (see
# _streaming_context), and its floor.
_BLOCKS_AHEAD_PER_GPU_ACTOR = 32
_BLOCKS_AHEAD_PER_CPU_ACTOR = 8
_MIN_READ_AHEAD_BYTES = 256 << 20


# --------------------------------------------------------------------------- the actors


def keep_large_allocations_on_the_heap() -> None:
    """Stop glibc from serving each batch's large CPU tensors with fresh mmap'd pages.

    Above its mmap threshold (128 KiB, adapting up to 32 MiB) glibc maps new pages for every
    allocation and unmaps them on free, so each batch's activations are page-faulted and
    zeroed anew. With the threshold at 256 MiB they are reused from the heap: measured with
    ``tiny`` on this CPU, 6,700-7,400 frames/s before, 10,900 after. Only for backbones on the
    CPU (GPU activations live on the device); a no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 256 << 20)
    mallopt(m_trim_threshold, 512 << 20)  # and keep freed memory for the next batch


class FrameEmbedder:
    """Ray Data callable class: loads the backbone once per actor, then embeds batches.

    A call gets whole read blocks where a block holds several backbone batches
    (:func:`_frames_per_call`) and runs the backbone on ``batch_size`` frames at a time.
    A batch may hold frames of several episodes, and episodes may differ in image size: Ray
    Data then hands over an object array of per-frame arrays, which is embedded one image
    size at a time (the backbone resizes, so sizes need not match across calls).
    """

    def __init__(self, backbone_cfg: BackboneConfig, torch_threads: int = 0, batch_size: int = 0):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.backbone = build_backbone(backbone_cfg)
        if self.backbone.device.type == "cpu":
            keep_large_allocations_on_the_heap()
        self.batch_size = batch_size  # frames per backbone call; 0 = the whole Ray Data batch
        # Ray may run several calls of this actor at once (EmbedConfig.calls_per_actor).
        self.one_at_a_time = (
            contextlib.nullcontext() if self.backbone.thread_safe else threading.Lock()
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames, prompts = batch["frame"], list(batch["prompt"])
        if frames.dtype == object:
            visual = self._embed_by_shape(frames, prompts)
        else:
            visual = self._embed(frames, prompts)
        return {
            "episode_id": batch["episode_id"],
            "frame_index": batch["frame_index"],
            "visual_embedding": visual,
        }

    def _embed(self, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Frames of one image size, ``batch_size`` of them per backbone call."""
        step = self.batch_size or max(1, len(frames))
        visual = np.empty((len(frames), self.backbone.visual_dim), dtype=np.float32)
        for start in range(0, len(frames), step):
            rows = slice(start, start + step)
            visual[rows] = self._embed_batch(frames[rows], prompts[rows])
        return visual

    def _embed_batch(self, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
        with self.one_at_a_time:
            visual = self.backbone.embed_frames(frames, prompts)
        visual = np.asarray(visual, dtype=np.float32)
        expected = (len(frames), self.backbone.visual_dim)
        if visual.shape != expected:
            name = self.backbone.cfg.name
            raise RuntimeError(f"backbone '{name}' returned {visual.shape}, expected {expected}")
        return visual

    def _embed_by_shape(self, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
        visual = np.empty((len(frames), self.backbone.visual_dim), dtype=np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(np.shape(frame), []).append(i)
        for rows in by_shape.values():
            stacked = np.stack([frames[i] for i in rows])
            visual[rows] = self._embed(stacked, [prompts[i] for i in rows])
        return visual


def describe_backbone(
    backbone_cfg: BackboneConfig, prompts: list[str], on_cpu: bool = False
) -> tuple[dict[str, np.ndarray], int, int]:
    """Prompt vectors and the backbone's (visual_dim, language_dim), from one model load.

    Runs inside a Ray task so a GPU backbone never loads on the driver; the dims go into the
    manifest without reading the written shards back. ``on_cpu`` builds the backbone on the CPU
    whatever the task's node has (``Backbone.prompts_on_cpu``)."""
    backbone = build_backbone(backbone_cfg, torch.device("cpu") if on_cpu else None)
    if not prompts:  # every episode failed the checks: only the dims are needed
        return {}, int(backbone.visual_dim), int(backbone.language_dim)
    vectors = np.asarray(backbone.embed_prompts(prompts), dtype=np.float32)
    if vectors.shape != (len(prompts), backbone.language_dim):
        raise RuntimeError(
            f"backbone '{backbone_cfg.name}' returned prompt embeddings of shape "
            f"{vectors.shape}, expected {(len(prompts), backbone.language_dim)}"
        )
    return dict(zip(prompts, vectors)), int(backbone.visual_dim), int(backbone.language_dim)


class BackboneFacts:
    """:func:`describe_backbone`'s result (prompt vectors, dims) from one Ray task.

    =========================================  ==========================================
    actors                                     the task
    =========================================  ==========================================
    GPU, backbone ``prompts_on_cpu``           on a CPU, started now: it runs beside the
                                               actors' start, off the critical path
    GPU, other backbones (VLMs)                on a GPU, waited for now, before the
                                               pipeline: later every GPU could be held by
                                               the actor pool, which would wait on the
                                               writer, which would wait on this task
    CPU                                        started when the first embeddings arrive,
                                               so its model load does not compete with the
                                               actors' start-up for the CPUs
    =========================================  ==========================================

    The writer waits for the result at its first commit.
    """

    def __init__(self, cfg: Config, episodes: list[EpisodeInfo]):
        ecfg = cfg.embed
        gpu_actors = ecfg.num_gpus_per_actor > 0
        on_cpu = gpu_actors and backbone_class(cfg.backbone.name).prompts_on_cpu
        self.task = ray.remote(describe_backbone).options(
            num_gpus=0 if on_cpu else ecfg.num_gpus_per_actor,
            num_cpus=ecfg.num_cpus_per_actor,
        )
        self.args = (cfg.backbone, sorted({e.prompt for e in episodes}), on_cpu)
        self.ref: ray.ObjectRef | None = None
        self.lock = threading.Lock()  # the writer thread may ask first
        if on_cpu:
            self.start()
        elif gpu_actors:
            self.get()  # also fails fast on a backbone that cannot load

    def start(self) -> None:
        with self.lock:
            if self.ref is None:
                self.ref = self.task.remote(*self.args)

    def get(self) -> tuple[dict[str, np.ndarray], int, int]:
        """(prompt -> vector, visual_dim, language_dim)."""
        self.start()
        return ray.get(self.ref)


# --------------------------------------------------------------------------- episodes


class EpisodeAssembler:
    """Frame embeddings arriving in any batches and order -> whole episodes, each once."""

    def __init__(self, episodes: list[EpisodeInfo]):
        self.info = {e.episode_id: e for e in episodes}
        self.partial: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # [T, D], filled [T]
        self.done: set[str] = set()

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[EpisodeInfo, np.ndarray]]:
        """Take one batch of frame rows; return the episodes it completes."""
        ids, index = batch["episode_id"], batch["frame_index"]
        visual = batch["visual_embedding"]
        if not len(ids):
            return []
        # Blocks hold runs of one episode's frames: handle each run with one slice.
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        finished = []
        for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
            episode_id = str(ids[a])
            if episode_id in self.done:
                logger.debug("dropped a repeat of finished episode %s", episode_id)
                continue
            info = self.info[episode_id]
            if episode_id not in self.partial:
                self.partial[episode_id] = (
                    np.empty((info.num_frames, visual.shape[1]), np.float32),
                    np.zeros(info.num_frames, bool),
                )
            frames, filled = self.partial[episode_id]
            frames[index[a:b]] = visual[a:b]
            filled[index[a:b]] = True
            if filled.all():
                del self.partial[episode_id]
                self.done.add(episode_id)
                finished.append((info, frames))
        return finished

    def unfinished(self) -> list[EpisodeInfo]:
        """Episodes not (fully) delivered: their frames failed to read."""
        return [info for eid, info in self.info.items() if eid not in self.done]


def non_finite_problem(info: EpisodeInfo, visual: np.ndarray) -> EpisodeProblem | None:
    finite = np.isfinite(visual).all(axis=1)
    if finite.all():
        return None
    reason = f"non-finite visual embedding at frame {int(np.argmin(finite))}"
    return EpisodeProblem(info.source_file, info.episode_id, "visual_embedding", reason)


def episode_table(
    rows: list[tuple[EpisodeInfo, np.ndarray]], language: dict[str, np.ndarray]
) -> pa.Table:
    """Finished episodes -> rows of ``schema.EPISODE_SCHEMA`` (columns built in one go)."""
    infos = [info for info, _ in rows]
    lengths = np.array([info.num_frames for info in infos], np.int64)
    visual_offsets = np.r_[0, np.cumsum([frames.size for _, frames in rows])].astype(np.int64)
    visual = np.concatenate([frames.ravel() for _, frames in rows])
    progress = [(np.arange(T, dtype=np.float32) + 1) / T for T in lengths]
    lang = [np.asarray(language[info.prompt], np.float32) for info in infos]
    columns = {
        "episode_id": pa.array([i.episode_id for i in infos], pa.string()),
        "source_file": pa.array([i.source_file for i in infos], pa.string()),
        "num_frames": pa.array(lengths.astype(np.int32)),
        "prompt": pa.array([i.prompt for i in infos], pa.string()),
        "success": pa.array([i.success for i in infos], pa.bool_()),
        "stage_boundaries": pa.array(
            [list(i.stage_boundaries) for i in infos], pa.list_(pa.int32())
        ),
        "visual_embedding": pa.LargeListArray.from_arrays(
            pa.array(visual_offsets), pa.array(visual)
        ),
        "language_embedding": _list_array(lang),
        "progress": _list_array(progress),
    }
    return pa.Table.from_pydict(columns, schema=schema.EPISODE_SCHEMA)


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.r_[0, np.cumsum([len(a) for a in arrays])].astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.float32)))


# --------------------------------------------------------------------------- the work folder


def partial_dir(output: str) -> str:
    """Where a run on ``output`` keeps its progress: a fixed name, so a rerun finds it."""
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.{PARTIAL_SUFFIX}")


class ResumeError(ValueError):
    """An unfinished run's folder that this run can't continue."""


class WorkFolder:
    """The ``.partial`` folder of one output: committed shards, the lock, publishing."""

    def __init__(self, path: str):
        self.path = path
        self.shards = os.path.join(path, schema.SHARDS_DIR)
        self.tmp = os.path.join(path, "tmp")
        self._lock_fd: int | None = None

    def open(self, settings: dict[str, Any], overwrite: bool) -> WorkFolder:
        os.makedirs(self.path, exist_ok=True)
        self._lock()
        try:
            self._prepare(settings, overwrite)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self, settings: dict[str, Any], overwrite: bool) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # shards a killed run was writing
        previous = self._read_json(RUN_NAME)
        if previous is not None and previous != settings:
            if not overwrite:
                raise ResumeError(
                    f"{self.path} holds an unfinished embedding with other settings "
                    f"({_settings_diff(previous, settings)}); pass --embed.overwrite true to "
                    "discard it"
                )
            self.clear()
        for folder in (self.shards, self.tmp):
            os.makedirs(folder, exist_ok=True)
        self._write_json(RUN_NAME, settings)

    def _lock(self) -> None:
        # flock on the folder itself: released by the OS when the process dies, and the
        # final rename carries it away, so no stale lock file is ever left behind.
        self._lock_fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise FileExistsError(f"another embedding run is writing {self.path}") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clear(self) -> None:
        """Drop all progress (keep the folder, which holds the lock, and the settings)."""
        for name in os.listdir(self.path):
            if name == RUN_NAME:
                continue
            target = os.path.join(self.path, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        for folder in (self.shards, self.tmp):
            os.makedirs(folder, exist_ok=True)

    def committed(self) -> pa.Table:
        """episode_id, source_file, num_frames of every committed shard (no embeddings)."""
        names = sorted(n for n in os.listdir(self.shards) if n.endswith(".parquet"))
        columns = ["episode_id", "source_file", "num_frames"]
        tables = [pq.read_table(os.path.join(self.shards, n), columns=columns) for n in names]
        if not tables:
            return schema.EPISODE_SCHEMA.empty_table().select(columns)
        return pa.concat_tables(tables)

    def has_progress(self) -> bool:
        return bool(os.listdir(self.shards)) or os.path.exists(self._file(FAILURES_NAME))

    def commit(self, table: pa.Table, name: str) -> None:
        """Write ``table`` as ``shards/<name>``: fully there or not at all."""
        tmp = os.path.join(self.tmp, name)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not outlive the data on a power cut
        os.replace(tmp, os.path.join(self.shards, name))

    def write_failures(self, problems: list[EpisodeProblem]) -> None:
        rows = [
            {"episode": p.episode, "file": p.file, "key": p.key, "reason": p.reason}
            for p in problems
        ]
        self._write_json(FAILURES_NAME, rows)

    def publish(self, output: str) -> None:
        """Drop the run's bookkeeping, then rename the folder to ``output``."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.remove(self._file(RUN_NAME))
        replace_folder(self.path, output)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _read_json(self, name: str) -> Any:
        if not os.path.exists(self._file(name)):
            return None
        with open(self._file(name)) as f:
            return json.load(f)

    def _write_json(self, name: str, data: Any) -> None:
        tmp = self._file(f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self._file(name))


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


# --------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Buffers finished episodes; commits every ``episodes_per_shard`` of them as one shard.

    Writing happens in one background thread (pyarrow releases the GIL), so the driver keeps
    draining the pipeline meanwhile; at most one shard waits to be written, which bounds the
    memory to about two shards."""

    def __init__(self, work: WorkFolder, facts: BackboneFacts, episodes_per_shard: int):
        self.work = work
        self.facts = facts  # the prompt vectors: needed from the first commit on
        self.episodes_per_shard = max(1, episodes_per_shard)
        self.rows: list[tuple[EpisodeInfo, np.ndarray]] = []
        self.bytes = 0
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def add(self, info: EpisodeInfo, visual: np.ndarray) -> None:
        self.rows.append((info, visual))
        self.bytes += visual.nbytes
        if len(self.rows) >= self.episodes_per_shard or self.bytes >= _MAX_SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        self.wait()
        if not self.rows:
            return
        rows, self.rows, self.bytes = self.rows, [], 0
        name = f"part-{self.run_id}-{self.count:05d}.parquet"
        self.count += 1
        self.pending = self.pool.submit(self._commit, rows, name)

    def _commit(self, rows: list, name: str) -> None:
        language = self.facts.get()[0]
        self.work.commit(episode_table(rows, language), name)
        logger.debug("committed %s (%d episodes)", name, len(rows))

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a failed write here

    def close(self) -> None:
        """Commit what is buffered and stop."""
        try:
            self.flush()
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

    def close_after_error(self) -> None:
        """The run failed elsewhere: still commit the finished episodes (whole episodes are
        valid commits, and the rerun then need not redo them), without hiding that error."""
        try:
            self.close()
        except Exception as err:
            logger.warning("could not commit the last finished episodes: %s", err)


# --------------------------------------------------------------------------- progress


class Progress:
    """A log line every ``every_s`` seconds: episodes and frames done, frames/s, ETA."""

    def __init__(self, episodes: list[EpisodeInfo], skipped: int, every_s: float):
        self.total_episodes = len(episodes) + skipped
        self.total_frames = sum(e.num_frames for e in episodes)
        self.skipped = skipped
        self.every_s = every_s
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first embeddings arrived
        self.last_log = self.start
        self.frames = 0
        self.episodes = 0

    def update(self, frames: int, episodes: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            logger.info("first embeddings after %.1f s of start-up", now - self.start)
        self.frames += frames
        self.episodes += episodes
        if now - self.last_log >= self.every_s:
            self.last_log = now
            self.log(now)

    def log(self, now: float | None = None) -> None:
        now = now or time.perf_counter()
        rate = self.frames / max(now - (self.first or now), 1e-9)
        left = self.total_frames - self.frames
        eta = _duration(left / rate) if rate > 0 else "?"
        logger.info(
            "embedded %d/%d episodes (%s earlier), %d/%d frames, %.0f frames/s, ETA %s",
            self.episodes + self.skipped,
            self.total_episodes,
            self.skipped,
            self.frames,
            self.total_frames,
            rate,
            eta,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# --------------------------------------------------------------------------- the pipeline


def _actor_pool(ecfg: EmbedConfig) -> ray.data.ActorPoolStrategy:
    size = ecfg.num_actors
    if size <= 0:  # one per GPU (or one on CPU)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        per_actor = ecfg.num_gpus_per_actor
        size = max(1, int(gpus // per_actor)) if per_actor > 0 else 1
    # GPU actors: measured on an H100 (DINOv2-reg4, 224x224, compiled), 6,700 frames/s with
    # two calls in flight and 7,060 with three, against 7,720 for the bare loop.
    calls = ecfg.calls_per_actor or (_GPU_CALLS_PER_ACTOR if ecfg.num_gpus_per_actor > 0 else 1)
    # Four calls queued per actor (Ray's default: two) keep it busy while the executor loop
    # notices a finished call and sends the next: measured 95% busy instead of 89% (then
    # with one call per batch; a call now takes a whole block, see _frames_per_call).
    queue = {
        "max_tasks_in_flight_per_actor": max(_CALLS_QUEUED_PER_ACTOR, 2 * calls),
        "max_concurrent_calls_per_actor": calls,
        # Our own lock serialises backbones that are not thread-safe (FrameEmbedder), so
        # Ray's single-thread wrapper is not needed; without it, one call per actor runs in
        # the actor's main thread, where glibc serves the backbone's large CPU tensors from
        # the tuned main heap (measured with tiny on this CPU: 9,240 frames/s in a worker
        # thread, 10,400 in the main thread).
        "enable_true_multi_threading": True,
    }
    if ecfg.max_actors > size:
        return ray.data.ActorPoolStrategy(min_size=size, max_size=ecfg.max_actors, **queue)
    return ray.data.ActorPoolStrategy(size=size, **queue)


def _frames_per_call(ecfg: EmbedConfig) -> int:
    """Frames per actor call: whole read blocks when a block holds several backbone batches
    (the actor then slices them into ``batch_size`` frames itself).

    Ray Data's own work per call (slicing the block, converting formats, building the output
    block, its iterators and stats) left the actor idle about 1.2 ms between calls: measured
    with ``tiny`` on this CPU, batches of 512 and blocks of 4,096, the gaps between backbone
    calls added up to 3.7% of the run with one call per batch and 2.0-2.4% with one per
    block (two runs each)."""
    return ecfg.batch_size * max(1, ecfg.frames_per_block // max(1, ecfg.batch_size))


def _read_tasks(episodes: list[EpisodeInfo], frames_per_block: int) -> int:
    """About ``_BLOCKS_PER_READ_TASK`` blocks per read task, and at least two tasks per CPU.

    Ray Data's default (200 tasks for a few hundred episodes) makes one-episode tasks whose
    scheduling costs more than reading them; a task streams its blocks as it reads, so
    longer tasks cost no memory."""
    blocks = sum(e.num_frames for e in episodes) / max(1, frames_per_block)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    wanted = max(math.ceil(blocks / _BLOCKS_PER_READ_TASK), 2 * cpus)
    return max(1, min(len(episodes), wanted))


@contextlib.contextmanager
def _streaming_context(ecfg: EmbedConfig, episodes: list[EpisodeInfo]) -> Iterator[None]:
    """Datasets created inside pass read blocks on whole and buffer a bounded amount.

    Block size: Ray Data merges the blocks a task yields until they reach
    ``target_max_block_size`` (128 MiB): a read task of 64x64 frames would then hand over one
    8,000-frame block at its end, so the actors would wait for whole read tasks and batches
    would be re-sliced. A block is passed on once it exceeds the target and sliced once it
    exceeds 1.5x the target: a target of 0.8x our block size passes each block on, whole.

    Memory: reading is far faster than embedding, and Ray Data lets the read-ahead grow up to
    its share of the object store (GBs), so the peak grew with the run's length (measured:
    317 MiB for 500 episodes, 897 MiB for 2,000). A limit of blocks per actor keeps the peak
    flat. Ray Data admits a read task only when its share of the budget holds the task's two
    buffered output blocks, so the limit also sets how many read tasks run at once:
    - GPU actors, 32 blocks: with 8, one read task ran at a time, which bounded DINOv2 on an
      H100 at 5,340 frames/s (224x224, blocks of 256 frames) against 7,700 for the bare loop;
    - CPU actors, 8 blocks: they embed far slower than one task reads, so more read-ahead
      only holds memory and competes for the CPUs (measured with tiny on 2 cores, blocks of
      4,096 frames: 0.86-0.90 of the bare loop in four runs with 8 blocks, 0.86 in one with 32).
    (A Dataset keeps the DataContext it was created under.)
    """
    block_bytes = ecfg.frames_per_block * max(int(np.prod(e.frame_shape)) for e in episodes)
    actors = max(ecfg.num_actors, ecfg.max_actors, 1)
    per_actor = (
        _BLOCKS_AHEAD_PER_GPU_ACTOR if ecfg.num_gpus_per_actor > 0 else _BLOCKS_AHEAD_PER_CPU_ACTOR
    )
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size, ctx.execution_options, ctx.memory_usage_poll_interval_s
    ctx.target_max_block_size = max(1, int(0.8 * block_bytes))
    # Ray Data starts a thread per task that polls the worker's memory for its stats; with
    # one task per block that was 0.5% of the embedding actor's main thread.
    ctx.memory_usage_poll_interval_s = None
    ctx.execution_options = copy.deepcopy(ctx.execution_options)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(_MIN_READ_AHEAD_BYTES, per_actor * actors * block_bytes)
    )
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.execution_options, ctx.memory_usage_poll_interval_s = saved


def build_dataset(cfg: Config, episodes: list[EpisodeInfo]) -> ray.data.Dataset:
    """Frame embeddings of ``episodes``: rows of episode_id, frame_index, visual_embedding."""
    with _streaming_context(cfg.embed, episodes):
        return _embedding_dataset(cfg, episodes)


def _embedding_dataset(cfg: Config, episodes: list[EpisodeInfo]) -> ray.data.Dataset:
    ecfg = cfg.embed
    frames = ray.data.read_datasource(
        HDF5EpisodeDatasource(episodes, ecfg.camera, ecfg.frames_per_block),
        override_num_blocks=_read_tasks(episodes, ecfg.frames_per_block),
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor fault tolerance yet; the only way to
        # bound restarts (Ray Data's default is unlimited: a batch that kills its actor
        # every time would loop forever) is the deprecated **ray_remote_args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return frames.map_batches(
            FrameEmbedder,
            fn_constructor_kwargs={
                "backbone_cfg": cfg.backbone,
                "torch_threads": ecfg.torch_threads,
                "batch_size": ecfg.batch_size,
            },
            batch_size=_frames_per_call(ecfg),
            batch_format="numpy",
            compute=_actor_pool(ecfg),
            num_gpus=ecfg.num_gpus_per_actor,
            num_cpus=ecfg.num_cpus_per_actor,
            max_restarts=ecfg.max_actor_restarts,
            max_task_retries=ecfg.max_actor_restarts,
        )


def _embed_episodes(
    cfg: Config,
    episodes: list[EpisodeInfo],
    writer: ShardWriter,
    progress: Progress,
) -> list[EpisodeProblem]:
    """Stream ``episodes`` through the pipeline into ``writer``; the episodes that failed."""
    assembler = EpisodeAssembler(episodes)
    failures: list[EpisodeProblem] = []
    dataset = build_dataset(cfg, episodes)
    # One block prefetched: with two, Ray Data holds the first block back until the second
    # is ready too (measured: the first embeddings reached the driver 0.5-1.2 s late).
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        writer.facts.start()  # no-op after the first batch
        finished = assembler.add(batch)
        for info, visual in finished:
            problem = non_finite_problem(info, visual)
            if problem is not None:
                logger.warning("%s", problem)
                failures.append(problem)
            else:
                writer.add(info, visual)
        progress.update(len(batch["frame_index"]), len(finished))
    return failures + _diagnose(assembler.unfinished(), cfg.embed.camera)


def _diagnose(episodes: list[EpisodeInfo], camera: str) -> list[EpisodeProblem]:
    """Why episodes' frames did not all arrive (the read tasks skip episodes that fail)."""
    if not episodes:
        return []
    reasons = ray.get([ray.remote(read_error).remote(info, camera) for info in episodes])
    problems = []
    for info, reason in zip(episodes, reasons):
        reason = reason or "frames were not all delivered (a read failed; rerun to retry)"
        problems.append(EpisodeProblem(info.source_file, info.episode_id, camera, reason))
        logger.warning("%s", problems[-1])
    return problems


def _scan_chunk(files: list[str], camera: str, prompt: str | None) -> list[tuple[list, list]]:
    return [scan_file(file, camera, prompt) for file in files]


def _scan_inputs(
    ecfg: EmbedConfig, files: list[str]
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Every episode's metadata: one file here, several in parallel Ray tasks."""
    if len(files) == 1:
        return scan_episodes(files, ecfg.camera, ecfg.prompt)
    n_chunks = min(len(files), _MAX_SCAN_TASKS)
    chunks = [files[i::n_chunks] for i in range(n_chunks)]
    task = ray.remote(_scan_chunk)
    results = ray.get([task.remote(chunk, ecfg.camera, ecfg.prompt) for chunk in chunks])
    by_file = {file: scan for chunk, res in zip(chunks, results) for file, scan in zip(chunk, res)}
    return merge_scans(by_file[file] for file in files)  # file order decides duplicate ids


def _resume_state(work: WorkFolder, episodes: list[EpisodeInfo], overwrite: bool) -> set[str]:
    """Episode ids already committed; checks they still match the input."""
    committed = work.committed()
    ids = committed.column("episode_id").to_pylist()
    if len(ids) != len(set(ids)):
        raise RuntimeError(f"{work.shards}: an episode is in two shards; the folder is damaged")
    now = {e.episode_id: (e.source_file, e.num_frames) for e in episodes}
    then = zip(
        committed.column("source_file").to_pylist(), committed.column("num_frames").to_pylist()
    )
    stale = [eid for eid, was in zip(ids, then) if now.get(eid) != was]
    if stale and not overwrite:
        raise ResumeError(
            f"{work.path} holds {len(stale)} episode(s) that are not in the input as they were "
            f"(e.g. {stale[:3]}); pass --embed.overwrite true to start again"
        )
    if stale:
        logger.warning("discarding %s: the input changed since it was started", work.path)
        work.clear()
        return set()
    if ids:
        logger.info("resuming %s: %d episode(s) already embedded", work.path, len(ids))
    return set(ids)


def failed_episodes(problems: list[EpisodeProblem]) -> int:
    """Distinct (file, episode) pairs: an episode with two problems is one failed episode."""
    return len({(p.file, p.episode) for p in problems})


def _check_failures(problems: list[EpisodeProblem], ecfg: EmbedConfig, work: WorkFolder) -> None:
    n_failed = failed_episodes(problems)
    if not n_failed:
        return
    if ecfg.max_failed_episodes < 0 or n_failed <= ecfg.max_failed_episodes:
        logger.warning(
            "%d episode(s) failed (allowed: %s); listed in %s",
            n_failed,
            "any" if ecfg.max_failed_episodes < 0 else ecfg.max_failed_episodes,
            FAILURES_NAME,
        )
        return
    note = (
        f"{n_failed} episode(s) failed, more than embed.max_failed_episodes="
        f"{ecfg.max_failed_episodes}; nothing published. The other episodes are kept in "
        f"{work.path} (failures in {FAILURES_NAME} there): fix or remove the bad input, or "
        "raise embed.max_failed_episodes, and rerun to resume."
    )
    raise InvalidEpisodesError(problems, note=note)


def _check_written(work: WorkFolder, expected: list[EpisodeInfo]) -> None:
    """Every episode that did not fail written exactly once (reads only the id column)."""
    written = work.committed().column("episode_id").to_pylist()
    wanted = sorted(e.episode_id for e in expected)
    if sorted(written) != wanted:
        missing = sorted(set(wanted) - set(written))[:5]
        raise RuntimeError(
            f"wrote {len(written)} episode rows ({len(set(written))} distinct), expected "
            f"{len(wanted)}; missing e.g. {missing}"
        )


def _write_manifest(
    path: str, cfg: Config, episodes: list[EpisodeInfo], dims: dict, num_failed: int
) -> None:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": asdict(cfg.backbone),
        "camera": cfg.embed.camera,
        **dims,
        "num_episodes": len(episodes),
        "num_frames": sum(e.num_frames for e in episodes),
        "num_failed_episodes": num_failed,
        "failures": FAILURES_NAME,
        "input_files": sorted({e.source_file for e in episodes}),
        "shards": sorted(os.listdir(os.path.join(path, schema.SHARDS_DIR))),
    }
    with open(os.path.join(path, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2)


def _settings(cfg: Config) -> dict[str, Any]:
    """What decides the embeddings: a rerun resumes only when these are unchanged."""
    return {
        "format": FORMAT,
        "backbone": asdict(cfg.backbone),
        "camera": cfg.embed.camera,
        "prompt": cfg.embed.prompt,
    }


@contextlib.contextmanager
def _work_folder(output: str, cfg: Config) -> Iterator[WorkFolder]:
    """The locked ``.partial`` folder; removed on failure when it holds nothing to resume."""
    work = WorkFolder(partial_dir(output)).open(_settings(cfg), cfg.embed.overwrite)
    try:
        yield work
    except BaseException:
        if os.path.isdir(work.path) and not work.has_progress():  # still ours: we hold the lock
            shutil.rmtree(work.path, ignore_errors=True)
        raise
    finally:
        work.close()


@dataclass
class EmbedResult:
    output: str
    num_episodes: int  # in the output
    num_frames: int  # in the output
    seconds: float
    embedded_frames: int = 0  # by this run (a resumed run skips the earlier ones)
    num_failed: int = 0
    startup_seconds: float = 0.0  # until the first embeddings arrived

    @property
    def frames_per_second(self) -> float:
        return self.embedded_frames / max(self.seconds, 1e-9)


def _check_output(output: str, overwrite: bool) -> None:
    if is_url(output):  # the commit protocol needs atomic renames on one file system
        raise ValueError(f"embed.output must be a local or mounted path, got {output}")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass --embed.overwrite true to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)


def _scan(ecfg: EmbedConfig, backbone: str) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    files = list_hdf5_files(ecfg.input)
    episodes, failures = _scan_inputs(ecfg, files)
    for problem in failures:
        logger.warning("%s", problem)
    logger.info(
        "%d episodes (%d frames) in %d file(s), %d failed the checks; backbone '%s'",
        len(episodes),
        sum(e.num_frames for e in episodes),
        len(files),
        failed_episodes(failures),
        backbone,
    )
    return episodes, failures


def _embed_into(
    work: WorkFolder, cfg: Config, episodes: list[EpisodeInfo], facts: BackboneFacts
) -> tuple[list[EpisodeProblem], Progress]:
    """Embed the episodes ``work`` lacks; their failures and the progress counts."""
    ecfg = cfg.embed
    done = _resume_state(work, episodes, ecfg.overwrite)
    todo = [e for e in episodes if e.episode_id not in done]
    progress = Progress(todo, len(done), ecfg.progress_every_s)
    writer = ShardWriter(work, facts, ecfg.episodes_per_shard)
    failures: list[EpisodeProblem] = []
    try:
        if todo:
            failures = _embed_episodes(cfg, todo, writer, progress)
    except BaseException:
        writer.close_after_error()
        raise
    writer.close()
    progress.log()
    return failures, progress


def _finish(
    work: WorkFolder,
    cfg: Config,
    episodes: list[EpisodeInfo],
    failures: list[EpisodeProblem],
    facts: BackboneFacts,
) -> list[EpisodeInfo]:
    """Failures table, limit, exactly-once check, manifest, publish; the episodes written."""
    work.write_failures(failures)
    _check_failures(failures, cfg.embed, work)
    failed = {(p.file, p.episode) for p in failures}
    written = [e for e in episodes if (e.source_file, e.episode_id) not in failed]
    _check_written(work, written)
    _, visual_dim, language_dim = facts.get()
    dims = {"visual_dim": visual_dim, "language_dim": language_dim}
    _write_manifest(work.path, cfg, written, dims, failed_episodes(failures))
    work.publish(cfg.embed.output)
    return written


def run_embed(cfg: Config) -> EmbedResult:
    """Embed ``cfg.embed.input`` into ``cfg.embed.output`` (both already resolved)."""
    start = time.perf_counter()
    ecfg = cfg.embed
    backbone_class(cfg.backbone.name)  # an unknown name fails here, before any work
    _check_output(ecfg.output, ecfg.overwrite)
    episodes, failures = _scan(ecfg, cfg.backbone.name)
    facts = BackboneFacts(cfg, episodes)
    with _work_folder(ecfg.output, cfg) as work:
        new_failures, progress = _embed_into(work, cfg, episodes, facts)
        failures += new_failures
        written = _finish(work, cfg, episodes, failures, facts)
    result = EmbedResult(
        output=ecfg.output,
        num_episodes=len(written),
        num_frames=sum(e.num_frames for e in written),
        seconds=time.perf_counter() - start,
        embedded_frames=progress.frames,
        startup_seconds=(progress.first or progress.start) - start,
        num_failed=failed_episodes(failures),
    )
    logger.info(
        "wrote %d episodes (%d frames; %d embedded now) to %s in %.1f s (%.0f frames/s)",
        result.num_episodes,
        result.num_frames,
        result.embedded_frames,
        result.output,
        result.seconds,
        result.frames_per_second,
    )
    return result
