"""The embedding actors: load the backbone once, then embed (and write) each call's frames.

Follows Ray's callable-class pattern for model inference with ``map_batches`` (``__init__``
loads the model, ``__call__`` embeds a batch). On GPUs an actor runs several calls at once
(``embed.calls_per_actor``), so one batch's copies overlap another's compute.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import numpy as np
import pyarrow as pa
import torch

from rayrm.backbones import build_backbone
from rayrm.config import BackboneConfig
from rayrm.data import schema
from rayrm.data.chunks import write_chunks


def keep_large_allocations_on_the_heap() -> None:
    """Stop glibc from serving each batch's large CPU tensors with fresh mmap'd pages.

    Above its mmap threshold (128 KiB, adapting up to 32 MiB) glibc maps new pages for every
    allocation and unmaps them on free, so each batch's activations are page-faulted and
    zeroed anew. With the threshold at 256 MiB they are reused from the heap, which made
    ``tiny`` on a CPU about half as fast again (bench/RESULTS.md). Only for backbones on the
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
    (:func:`frames_per_call`) and runs the backbone on ``batch_size`` frames at a time.
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
        """Every camera's frames (``frame``, ``frame/<camera>``) -> their embeddings
        (``visual_embedding``, ``visual_embedding/<camera>``); the ``state`` passes through."""
        prompts = list(batch["prompt"])
        out = {"episode_id": batch["episode_id"], "frame_index": batch["frame_index"]}
        for column, frames in batch.items():
            if column == schema.FRAME_COLUMN or column.startswith(schema.FRAME_COLUMN + "/"):
                out[schema.embedded_column(column)] = self._embed_camera(frames, prompts)
        if schema.STATE_COLUMN in batch:
            state = batch[schema.STATE_COLUMN]
            if state.dtype == object:  # Ray Data's form for rows it could not stack
                state = np.stack(list(state))
            out[schema.STATE_COLUMN] = np.asarray(state, np.float32)
        return out

    def _embed_camera(self, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
        if frames.dtype == object:
            return self._embed_by_shape(frames, prompts)
        return self._embed(frames, prompts)

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


class ChunkWriter(FrameEmbedder):
    """The embedding actor of ``rayrm embed``: embeds a call's frames, writes them as one new
    chunk file under ``folder`` (``rayrm.data.chunks.write_chunks``) and returns only the
    chunks' records, so no embedding leaves the process that made it.

    Writing here rather than in tasks after the actors: the embeddings would otherwise cross
    the object store once more, and Ray Data would re-cut the actors' output into blocks of
    its target size, which for small frames and large embeddings made blocks of a few frames
    each and stalled the run (bench/RESULTS.md, the small-frame stall). On a
    GPU the write of one call overlaps the compute of the actor's other calls in flight.
    """

    def __init__(self, backbone_cfg: BackboneConfig, folder: str, run_id: str, **kwargs):
        super().__init__(backbone_cfg, **kwargs)
        self.folder, self.run_id = folder, run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return write_chunks(super().__call__(batch), self.folder, self.run_id)
