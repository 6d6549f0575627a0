"""The Ray Data embedding pipeline: read tasks (HDF5 or LeRobot video) -> actors that embed
and write.

::

    episode_datasource           read tasks: fixed-size frame blocks, episodes in order
      -> map_batches(ChunkWriter)    actor pool (one per GPU with num_actors 0); a call takes
                                     whole blocks, runs the backbone ``batch_size`` frames at
                                     a time and writes the call's embeddings as one new
                                     Parquet chunk file (``rayrm.data.shards``); out come only
                                     the chunks' records, ~150 bytes each, for the driver;
                                     restarted by Ray when an actor dies, its call retried

Why the actors write (rather than a ``Datasink`` or writer tasks after them): the driver
needs each chunk's location as it is written, to log progress and to know what is
committed, which a ``Datasink`` hands over only at the end (its write tasks and completion
step are the same shape: files written in the workers, one commit at the end, here the
manifest); and writer tasks would move every embedding through the object store once more,
cut into Ray Data's target block size (see :class:`rayrm.embed.actor.ChunkWriter`).
``build_dataset`` (frame embeddings, no writing) serves evaluation of raw episodes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator

import numpy as np
import ray

from rayrm.config import Config, EmbedConfig
from rayrm.data.hdf5 import EpisodeInfo
from rayrm.data.sources import episode_datasource
from rayrm.embed.actor import ChunkWriter, FrameEmbedder

_BLOCKS_PER_READ_TASK = 16
_CALLS_QUEUED_PER_ACTOR = 4
_GPU_CALLS_PER_ACTOR = 3
# Ray Data's object store budget for one pipeline run, in blocks per actor (see
# _streaming_context), and its floor.
_BLOCKS_AHEAD_PER_GPU_ACTOR = 32
_BLOCKS_AHEAD_PER_CPU_ACTOR = 8
_MIN_READ_AHEAD_BYTES = 256 << 20


def _actor_pool(ecfg: EmbedConfig) -> ray.data.ActorPoolStrategy:
    size = ecfg.num_actors
    if size <= 0:  # one per GPU (or one on CPU)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        per_actor = ecfg.num_gpus_per_actor
        size = max(1, int(gpus // per_actor)) if per_actor > 0 else 1
    # GPU actors: three calls in flight came closer to the bare loop than two (on an H100,
    # bench/RESULTS.md): one call's copies overlap another's compute.
    calls = ecfg.calls_per_actor or (_GPU_CALLS_PER_ACTOR if ecfg.num_gpus_per_actor > 0 else 1)
    # Four calls queued per actor (Ray's default: two) keep it busy while the executor loop
    # notices a finished call and sends the next (bench/RESULTS.md; a call now takes a
    # whole block, see frames_per_call).
    queue = {
        "max_tasks_in_flight_per_actor": max(_CALLS_QUEUED_PER_ACTOR, 2 * calls),
        "max_concurrent_calls_per_actor": calls,
        # Our own lock serialises backbones that are not thread-safe (FrameEmbedder), so
        # Ray's single-thread wrapper is not needed; without it, one call per actor runs in
        # the actor's main thread, where glibc serves the backbone's large CPU tensors from
        # the tuned main heap, which is faster on a CPU (bench/RESULTS.md).
        "enable_true_multi_threading": True,
    }
    if ecfg.max_actors > size:
        return ray.data.ActorPoolStrategy(min_size=size, max_size=ecfg.max_actors, **queue)
    return ray.data.ActorPoolStrategy(size=size, **queue)


def frames_per_call(ecfg: EmbedConfig) -> int:
    """Frames per actor call: whole read blocks when a block holds several backbone batches
    (the actor then slices them into ``batch_size`` frames itself).

    Ray Data's own work per call (slicing the block, converting formats, building the output
    block, its iterators and stats) left the actor idle about 1.2 ms between calls; with one call
    per block the gaps between backbone calls take a smaller share of the run than with one
    per batch (bench/RESULTS.md)."""
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
    its share of the object store (GBs), so the peak grew with the run's length
    (bench/RESULTS.md). A limit of blocks per actor keeps the peak
    flat. Ray Data admits a read task only when its share of the budget holds the task's two
    buffered output blocks, so the limit also sets how many read tasks run at once:
    - GPU actors, 32 blocks: with 8, one read task ran at a time, which held DINOv2 on an
      H100 well below the bare loop (224x224, blocks of 256 frames);
    - CPU actors, 8 blocks: they embed far slower than one task reads, so more read-ahead
      only holds memory and competes for the CPUs (32 blocks were no faster than 8;
      bench/RESULTS.md).
    (A Dataset keeps the DataContext it was created under.)
    """
    frame_bytes = max(int(np.prod(e.frame_shape)) for e in episodes) * len(ecfg.views())
    block_bytes = ecfg.frames_per_block * frame_bytes
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
    """Frame embeddings of ``episodes``: rows of episode_id, frame_index, visual_embedding
    (and ``visual_embedding/<camera>``, ``state`` with several cameras or a state)."""
    with _streaming_context(cfg.embed, episodes):
        return _embedding_dataset(cfg, episodes)


def _embedding_dataset(
    cfg: Config, episodes: list[EpisodeInfo], actor=FrameEmbedder, actor_kwargs=None
) -> ray.data.Dataset:
    ecfg = cfg.embed
    frames = ray.data.read_datasource(
        episode_datasource(episodes, ecfg.views(), ecfg.frames_per_block, ecfg.state),
        override_num_blocks=_read_tasks(episodes, ecfg.frames_per_block),
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor fault tolerance yet; the only way to
        # bound restarts (Ray Data's default is unlimited: a batch that kills its actor
        # every time would loop forever) is the deprecated **ray_remote_args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return frames.map_batches(
            actor,
            fn_constructor_kwargs={
                "backbone_cfg": cfg.backbone,
                "torch_threads": ecfg.torch_threads,
                "batch_size": ecfg.batch_size,
                **(actor_kwargs or {}),
            },
            batch_size=frames_per_call(ecfg),
            batch_format="numpy",
            compute=_actor_pool(ecfg),
            num_gpus=ecfg.num_gpus_per_actor,
            num_cpus=ecfg.num_cpus_per_actor,
            max_restarts=ecfg.max_actor_restarts,
            max_task_retries=ecfg.max_actor_restarts,
        )


def chunk_dataset(
    cfg: Config, episodes: list[EpisodeInfo], folder: str, run_id: str
) -> ray.data.Dataset:
    """The embeddings of ``episodes`` written as chunk files under ``folder``; the dataset's
    rows are the chunks' records (``rayrm.data.chunks.CHUNK_RECORD_SCHEMA``)."""
    with _streaming_context(cfg.embed, episodes):
        return _embedding_dataset(cfg, episodes, ChunkWriter, {"folder": folder, "run_id": run_id})
