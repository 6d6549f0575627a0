"""The backbone interface and its registry."""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rayrm.config import BackboneConfig
from rayrm.devices import default_device
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rayrm.backbones"
# Built-in backbones, imported only when chosen.
_BUILTIN_MODULES = {
    "tiny": "rayrm.backbones.tiny",
    "dinov2": "rayrm.backbones.dinov2",
    "dinov2_minilm": "rayrm.backbones.dinov2_minilm",
    "qwen3_vl": "rayrm.backbones.qwen3_vl",
}
_REGISTRY: dict[str, type[Backbone]] = {}


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnknownBackboneOptionError(UserError):
    pass


class Backbone(abc.ABC):
    """Turns uint8 frames and task prompts into float32 embeddings.

    ``visual_dim`` is the size of one frame's embedding; ``language_dim`` the size of a
    prompt's embedding, or 0 for backbones that fuse the prompt into every frame (VLMs).
    Implementations load their weights in ``__init__`` and are pure afterwards: the same
    frames give the same embeddings whatever the batch they arrive in.
    """

    visual_dim: int
    language_dim: int
    # May ``embed_frames`` run in several threads at once? rayrm.embed overlaps several calls
    # per GPU actor when it may, and serialises them otherwise (tokenizers, for one, are not).
    thread_safe: bool = False
    # Do ``embed_prompts`` and the dims come out the same when built on the CPU, at a cost
    # small beside a GPU actor's start (a float32 text encoder, a ViT's weights)? rayrm.embed
    # then computes them in a CPU task beside the GPU actors instead of on a GPU before them
    # (a large part of a GPU actor's start-up; bench/RESULTS.md). Not for VLMs (billions of
    # parameters).
    prompts_on_cpu: bool = False
    # The ``backbone.options`` keys this backbone reads; None = not declared (any key passes,
    # e.g. a plugin's). Declared names let a misspelt option fail before any actor starts.
    option_names: frozenset[str] | None = None

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse option names the backbone does not read; subclasses add value checks
        that need no weights. Runs on the driver before Ray starts (:func:`check_backbone`)."""
        if cls.option_names is None:
            return
        unknown = sorted(set(options) - cls.option_names)
        if unknown:
            known = ", ".join(sorted(cls.option_names)) or "none"
            raise UnknownBackboneOptionError(
                f"backbone.options: {', '.join(unknown)} not read by this backbone "
                f"(it reads: {known})"
            )

    def __init__(self, cfg: BackboneConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or default_device()

    @abc.abstractmethod
    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """uint8 [B, H, W, 3] frames (and each frame's prompt) -> float32 [B, visual_dim]."""

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> float32 [N, language_dim]; backbones without a text encoder return [N, 0]."""
        return np.zeros((len(prompts), 0), dtype=np.float32)

    def prompt_problem(self, prompt: str) -> str | None:
        """Why the text encoder cannot take ``prompt`` whole (it would be truncated), or None.

        Callers that take prompts from users (``rayrm serve``) refuse such a prompt instead of
        scoring a task the model never read to the end."""
        return None


def frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """Checked uint8 frames as a CPU tensor sharing the array's memory.

    Ray Data batches are read-only; backbones only read the tensor (copy it to the device or
    into a new float tensor), so no defensive copy of the batch is made."""
    check_frames(frames)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(frames))


def check_frames(frames: np.ndarray) -> None:
    """Backbones take RGB uint8 [B, H, W, 3]; say clearly what arrived instead."""
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be RGB [B, H, W, 3], got shape {tuple(frames.shape)}")


def register_backbone(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    def decorator(cls: type[Backbone]) -> type[Backbone]:
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    """Register third-party backbones (group ``rayrm.backbones``, ``name = pkg.mod:Class``).

    A plugin that fails to import is logged and skipped, so one broken package cannot hide
    the built-in backbones or the others."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            _REGISTRY[entry.name] = entry.load()
        except Exception as err:  # any import-time failure of someone else's package
            logger.warning(
                "backbone entry point '%s' (%s) failed: %s", entry.name, entry.value, err
            )


def available_backbones() -> list[str]:
    _load_entry_points()
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def _import_backbone(spec: str) -> type[Backbone]:
    """``package.module:ClassName`` -> that class (a backbone outside the registry)."""
    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UnknownBackboneError(f"backbone '{spec}' cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise UnknownBackboneError(f"backbone '{spec}' is not a Backbone subclass")
    return cls


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name``; ``package.module:ClassName`` imports one directly.

    The import form reaches a backbone that is neither built in nor an entry point, in every
    Ray worker that can import the module (workers do not share the driver's registry)."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY and ":" in name:
        return _import_backbone(name)
    if name not in _REGISTRY:
        raise UnknownBackboneError(
            f"unknown backbone '{name}'; available: {', '.join(available_backbones())} "
            "(or give package.module:ClassName)"
        )
    return _REGISTRY[name]


def check_backbone(cfg: BackboneConfig) -> None:
    """The backbone exists and takes ``cfg.options``: checked when a command's config is
    built, not on an actor after its retries. Imports the backbone's module, loads no weights."""
    backbone_class(cfg.name).check_options(cfg.options)


def build_backbone(cfg: BackboneConfig, device: torch.device | None = None) -> Backbone:
    return backbone_class(cfg.name)(cfg, device)
