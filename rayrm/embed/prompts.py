"""Prompt vectors and backbone dims, from one Ray task (a GPU backbone never loads on the
driver)."""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import ray
import torch

from rayrm.backbones import build_backbone
from rayrm.backbones.base import backbone_class
from rayrm.config import BackboneConfig, Config
from rayrm.data.hdf5 import EpisodeInfo


class PromptVectors(NamedTuple):
    """Each prompt's language vector, and the backbone's dims (for the manifest, and for
    checking a checkpoint against the backbone that embeds its input)."""

    vectors: dict[str, np.ndarray]
    visual_dim: int
    language_dim: int


def prompt_vectors(
    backbone_cfg: BackboneConfig, prompts: list[str], on_cpu: bool = False
) -> PromptVectors:
    """Prompt vectors and the backbone's dims, from one model load.

    Runs inside a Ray task so a GPU backbone never loads on the driver; the dims go into the
    manifest without reading the written shards back. ``on_cpu`` builds the backbone on the CPU
    whatever the task's node has (``Backbone.prompts_on_cpu``)."""
    backbone = build_backbone(backbone_cfg, torch.device("cpu") if on_cpu else None)
    dims = int(backbone.visual_dim), int(backbone.language_dim)
    if not prompts:  # every episode failed the checks: only the dims are needed
        return PromptVectors({}, *dims)
    vectors = np.asarray(backbone.embed_prompts(prompts), dtype=np.float32)
    if vectors.shape != (len(prompts), backbone.language_dim):
        raise RuntimeError(
            f"backbone '{backbone_cfg.name}' returned prompt embeddings of shape "
            f"{vectors.shape}, expected {(len(prompts), backbone.language_dim)}"
        )
    return PromptVectors(dict(zip(prompts, vectors)), *dims)


class PromptVectorsTask:
    """The one Ray task that makes :class:`PromptVectors` for ``cfg.backbone`` and the
    episodes' prompts; ``rayrm embed`` and evaluation's on-the-fly embedding both use it.

    =========================================  ==========================================
    actors                                     the task
    =========================================  ==========================================
    GPU, backbone ``prompts_on_cpu``           on a CPU, started now: it runs beside the
                                               actors' start, off the critical path
    GPU, other backbones (VLMs)                on a GPU, waited for now, before the
                                               pipeline: a backbone that cannot load fails
                                               before any frame is read, and no GPU is
                                               needed again once the actors hold them all
    CPU                                        started when the first embeddings arrive,
                                               so its model load does not compete with the
                                               actors' start-up for the CPUs
    =========================================  ==========================================

    The driver waits for the result when it publishes (the episodes table holds the vectors).
    """

    def __init__(self, cfg: Config, episodes: list[EpisodeInfo]):
        ecfg = cfg.embed
        gpu_actors = ecfg.num_gpus_per_actor > 0
        on_cpu = gpu_actors and backbone_class(cfg.backbone.name).prompts_on_cpu
        self.task = ray.remote(prompt_vectors).options(
            num_gpus=0 if on_cpu else ecfg.num_gpus_per_actor,
            num_cpus=ecfg.num_cpus_per_actor,
        )
        self.args = (cfg.backbone, sorted({e.prompt for e in episodes}), on_cpu)
        self.ref: ray.ObjectRef | None = None
        self.lock = threading.Lock()
        if on_cpu:
            self.start()
        elif gpu_actors:
            self.get()  # also fails fast on a backbone that cannot load

    def start(self) -> None:
        with self.lock:
            if self.ref is None:
                self.ref = self.task.remote(*self.args)

    def get(self) -> PromptVectors:
        self.start()
        return ray.get(self.ref)
