"""The open streams of one replica and their batched steps; plain Python, no Serve in it.

A stream is one environment episode: the prompt's language vector and the embeddings of the
frames seen so far. A step appends one frame and reads the causal reward exactly as
:class:`rayrm.evaluate.scorer.RewardScorer` does (same window positions, same read-out:
``causal_outputs``), so a stream's rewards equal the offline scorer's for the same frames,
whatever else shares the batch.

:meth:`StreamTable.step` takes the steps of many streams at once and makes one backbone call
per frame shape and one reward-model call per round; a round holds each stream at most once,
so a client that pipelines two steps of one stream gets them applied in order.

Stream ids are ``<replica tag>.<random hex>``: the tag tells the router which replica holds
the stream (``rayrm.serve.routing``), and tells a replica that receives a stream it never
made that the stream's owner is gone (:class:`StreamLostError`, never a wrong reward).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable

import numpy as np
import torch

from rayrm.backbones import build_backbone
from rayrm.config import BackboneConfig, ServeConfig, from_dict
from rayrm.devices import default_device
from rayrm.evaluate.scorer import causal_outputs, raw_frames_refused
from rayrm.serve.errors import (
    BadRequestError,
    ServeError,
    ServerFullError,
    StreamLostError,
    UnknownStreamError,
)
from rayrm.train.checkpoint import load_model
from rayrm.train.windows import sequence_positions

MIN_CAPACITY = 64  # frames of history allocated when a stream opens; doubles when full


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def stream_owner(stream_id: str) -> str:
    """The tag of the replica that opened ``stream_id``."""
    return stream_id.split(".", 1)[0]


def group_by_owner(streams: list[str]) -> dict[str, list[int]]:
    """Positions of ``streams`` per owning replica tag, in order: one call per replica."""
    groups: dict[str, list[int]] = {}
    for i, stream in enumerate(streams):
        groups.setdefault(stream_owner(stream), []).append(i)
    return groups


@dataclasses.dataclass
class Stream:
    prompt: str
    language: torch.Tensor  # [D_lang]
    history: torch.Tensor  # [capacity, D]: embeddings of the frames seen, in order
    last_used: float
    length: int = 0
    frame_shape: tuple[int, ...] | None = None  # fixed by the first frame

    def append(self, embedding: torch.Tensor) -> None:
        if self.length == len(self.history):
            grown = self.history.new_zeros(2 * len(self.history), self.history.shape[1])
            grown[: self.length] = self.history
            self.history = grown
        self.history[self.length] = embedding
        self.length += 1


@dataclasses.dataclass
class StepResult:
    reward: float  # causal progress after this frame, in [0, 1]
    step: int  # frames seen by the stream, this one included
    stage: int | None = None  # SARM checkpoints: the predicted stage
    # checkpoints with a success head: the probability that the task is done at this frame
    success: float | None = None


class StreamTable:
    """Open, step and close the streams of one replica (see the module docstring)."""

    def __init__(
        self,
        model,
        config: dict,
        tag: str,
        limits: ServeConfig,
        backbone=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model = model.eval()
        self.config = config
        self.tag = tag
        self.limits = limits
        self.clock = clock
        self.device = model_device(model)
        self.blind = bool(config.get("train", {}).get("blind", False))
        self.seq_len = int(model.cfg.max_seq_len)
        self.streams: dict[str, Stream] = {}
        self._backbone = backbone
        self._prompt_vectors: dict[str, torch.Tensor] = {}
        self.steps_done = 0  # steps scored, and the model calls they took: batching's effect
        self.model_calls = 0

    @classmethod
    def from_checkpoint(cls, path: str, tag: str, limits: ServeConfig, device=None):
        """The checkpoint's model and the backbone it names, loaded now: a replica pays for
        them when it starts, not on its first request."""
        model, config = load_model(path, device or default_device())
        backbone = None
        if "backbone" in config:
            backbone = build_backbone(
                from_dict(BackboneConfig, config["backbone"]), model_device(model)
            )
        return cls(model, config, tag, limits, backbone)

    @property
    def backbone(self):
        if self._backbone is None:
            raise BadRequestError("the checkpoint names no backbone: send embeddings")
        return self._backbone

    def info(self) -> dict:
        return {
            "visual_dim": int(self.model.visual_dim),
            "frame_layout": self.config.get("frame_layout"),
            "language_dim": int(self.model.language_dim),
            "window": self.seq_len,
            "num_stages": int(getattr(self.model.cfg, "num_stages", 0)),
            "backbone": self.config.get("backbone", {}).get("name"),
            "open_streams": len(self.streams),
            "max_streams": self.limits.max_streams,
            "steps": self.steps_done,
            "model_calls": self.model_calls,
        }

    # ------------------------------------------------------------------ open / close

    def open(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise BadRequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
        self._close_idle()
        if len(self.streams) >= self.limits.max_streams:
            raise ServerFullError(
                f"replica holds {len(self.streams)} open streams (serve.max_streams); close "
                "some, or add replicas"
            )
        stream_id = f"{self.tag}.{secrets.token_hex(8)}"
        history = torch.zeros(MIN_CAPACITY, self.model.visual_dim, device=self.device)
        language = self._language(prompt)
        self.streams[stream_id] = Stream(prompt, language, history, last_used=self.clock())
        return stream_id

    def close(self, stream_id: str) -> None:
        self._stream(stream_id)
        del self.streams[stream_id]

    def stream_info(self, stream_id: str) -> dict:
        """One stream's state, and the facts of the replica that holds it."""
        stream = self._stream(stream_id)
        return {"stream": stream_id, "prompt": stream.prompt, "step": stream.length} | {
            "replica": self.tag,
            **self.info(),
        }

    def _close_idle(self) -> None:
        cutoff = self.clock() - self.limits.stream_idle_s
        for stream_id in [s for s, v in self.streams.items() if v.last_used < cutoff]:
            del self.streams[stream_id]

    def _language(self, prompt: str) -> torch.Tensor:
        if self.model.language_dim == 0:
            return torch.zeros(0, device=self.device)
        if prompt not in self._prompt_vectors:
            problem = self.backbone.prompt_problem(prompt)
            if problem:
                raise BadRequestError(problem)
            vector = np.asarray(self.backbone.embed_prompts([prompt]), np.float32)[0]
            self._prompt_vectors[prompt] = torch.from_numpy(vector).to(self.device)
        return self._prompt_vectors[prompt]

    def _stream(self, stream_id) -> Stream:
        if not isinstance(stream_id, str):
            raise BadRequestError(f"a stream id is a string, got {type(stream_id).__name__}")
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        if stream_owner(stream_id) != self.tag:
            raise StreamLostError(
                f"stream {stream_id} lost: the replica that held it is gone; open it again"
            )
        raise UnknownStreamError(f"unknown or closed stream {stream_id}")

    # ------------------------------------------------------------------ steps

    def step(self, requests: list[tuple[str, np.ndarray]]) -> list[StepResult | ServeError]:
        """Each (stream id, frame or embedding) -> its result or its error, in order."""
        results: list[StepResult | ServeError | None] = [None] * len(requests)
        pending = []
        for i, (stream_id, observation) in enumerate(requests):
            try:
                stream = self._stream(stream_id)
                pending.append((i, stream, self._check(stream, observation)))
            except ServeError as err:
                results[i] = err
        while pending:  # rounds: each stream at most once, its steps in arrival order
            seen, this_round, later = set(), [], []
            for item in pending:
                (later if id(item[1]) in seen else this_round).append(item)
                seen.add(id(item[1]))
            for (i, _, _), result in zip(this_round, self._step_round(this_round)):
                results[i] = result
            pending = later
        return results

    def _check(self, stream: Stream, obs) -> np.ndarray:
        """A frame [H, W, 3] uint8 or an embedding [D] float; 400 saying what arrived."""
        obs = np.asarray(obs)
        dim = self.model.visual_dim
        if obs.ndim == 1:
            if obs.dtype.kind != "f" or len(obs) != dim:
                raise BadRequestError(
                    f"an embedding is float [{dim}], got {obs.dtype} {list(obs.shape)}"
                )
            if not np.isfinite(obs).all():
                raise BadRequestError("the embedding holds NaN or infinity")
            return obs
        refused = raw_frames_refused(self.model, self.config)
        if refused:
            raise BadRequestError(refused)
        side = self.limits.max_frame_side
        if obs.dtype != np.uint8 or obs.ndim != 3 or obs.shape[2] != 3:
            raise BadRequestError(
                f"a frame is uint8 [H, W, 3] (or send an embedding, float [{dim}]); "
                f"got {obs.dtype} {list(obs.shape)}"
            )
        if not (0 < obs.shape[0] <= side and 0 < obs.shape[1] <= side):
            raise BadRequestError(f"frame {list(obs.shape)} is outside 1..{side} per side")
        if stream.frame_shape is None:  # set here, so a change within one batch is caught
            stream.frame_shape = obs.shape
        if obs.shape != stream.frame_shape:
            raise BadRequestError(
                f"frame {list(obs.shape)} differs from this stream's first frame "
                f"{list(stream.frame_shape)}"
            )
        return obs

    @torch.no_grad()
    def _step_round(self, items: list) -> list[StepResult | ServeError]:
        try:
            visual = self._embed([stream for _, stream, _ in items], [o for _, _, o in items])
        except ServeError as err:
            return [err] * len(items)
        streams = [stream for _, stream, _ in items]
        for stream, embedding in zip(streams, visual):
            stream.append(embedding)
            stream.last_used = self.clock()
        count = torch.tensor([s.length for s in streams], device=self.device)
        positions = sequence_positions(count, self.seq_len)
        windows = torch.stack([s.history[p] for s, p in zip(streams, positions)])
        language = torch.stack([s.language for s in streams])
        progress, stage, success = causal_outputs(self.model, windows, language, count, self.blind)
        self.steps_done += len(streams)
        self.model_calls += 1
        progress = progress.cpu().numpy()
        stage = None if stage is None else stage.cpu().numpy()
        success = None if success is None else success.cpu().numpy()
        return [
            StepResult(
                float(progress[n]),
                s.length,
                None if stage is None else int(stage[n]),
                None if success is None else float(success[n]),
            )
            for n, s in enumerate(streams)
        ]

    def _embed(self, streams: list[Stream], observations: list[np.ndarray]) -> torch.Tensor:
        """[N, D] embeddings: frames through the backbone, one call per frame shape."""
        out = torch.zeros(len(observations), self.model.visual_dim, device=self.device)
        by_shape: dict[tuple, list[int]] = {}
        for n, obs in enumerate(observations):
            if obs.ndim == 1:
                out[n] = torch.from_numpy(obs.astype(np.float32)).to(self.device)
            else:
                by_shape.setdefault(obs.shape, []).append(n)
        for rows in by_shape.values():
            frames = np.stack([observations[n] for n in rows])
            prompts = [streams[n].prompt for n in rows]  # VLM backbones read it with the frame
            vectors = np.asarray(self.backbone.embed_frames(frames, prompts), np.float32)
            out[rows] = torch.from_numpy(vectors).to(self.device)
        return out
