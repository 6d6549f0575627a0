"""The ``dinov2`` backbone: frames -> DINOv2 CLS embeddings, a loaded ViT on one device.

``backbone.checkpoint``: an original-format file or a transformers folder
(``state_dict_adapter``); ``backbone.options``: ``num_heads``, ``pos_interpolation``
(``model``), ``normalize`` / ``resolution`` / ``image_size`` (``preprocessing``) and
``compile``. ``backbone.dtype``: ``auto`` = bf16 on a GPU, fp32 on a CPU; or ``float32`` /
``bfloat16``. ``options.compile: true``: run the ViT through ``torch.compile`` (worth it on a
GPU: a minute of compilation per actor, then faster batches; see :class:`DinoV2Encoder`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import numpy as np
import torch

from rayrm.backbones.base import Backbone, register_backbone
from rayrm.backbones.dinov2.model import POS_INTERPOLATIONS
from rayrm.backbones.dinov2.preprocessing import Preprocess
from rayrm.backbones.dinov2.state_dict_adapter import load_dinov2
from rayrm.config import BackboneConfig
from rayrm.devices import resolve_dtype
from rayrm.errors import UserError

# backbone.options the encoder reads (preprocessing's included).
ENCODER_OPTIONS = frozenset(
    {"num_heads", "pos_interpolation", "compile", "normalize", "resolution", "image_size"}
)


def check_encoder_options(options: dict) -> None:
    """The preprocessing options' values, without weights (``check_options``)."""
    # The patch size is the checkpoint's: image_size's multiple is checked once it loads.
    Preprocess.from_options(options, patch_size=1)
    interpolation = options.get("pos_interpolation", "antialias")
    if interpolation not in POS_INTERPOLATIONS:
        raise UserError(
            f"backbone.options.pos_interpolation must be one of {POS_INTERPOLATIONS}, "
            f"got {interpolation!r}"
        )


class DinoV2Encoder:
    """Frames -> CLS embeddings with a loaded DINOv2 ViT (used by ``dinov2`` and
    ``dinov2_minilm``).

    Safe to call from several threads at once (``rayrm.embed`` runs three calls per GPU actor):
    on a GPU each thread has its own CUDA stream and pinned staging buffer, so one batch's
    host-to-device copy and readback overlap another batch's compute.

    ``options.compile: true`` runs the ViT through ``torch.compile``. Compiled shapes are
    static: the first batch's size becomes the chunk size, later batches run in chunks of it
    and a short last chunk is padded (the ViT treats frames independently, so padding does
    not change the real frames' embeddings), so partial batches cost no recompilation.
    """

    def __init__(self, cfg: BackboneConfig, device: torch.device):
        options = cfg.options
        self.device = device
        self.dtype = resolve_dtype(cfg.dtype, device)
        model = load_dinov2(
            cfg.checkpoint,
            num_heads=options.get("num_heads"),
            pos_interpolation=options.get("pos_interpolation", "antialias"),
        )
        self.model = model.to(device=device, dtype=self.dtype)
        self.preprocess = Preprocess.from_options(options, model.shape.patch_size)
        self.dim = model.shape.embed_dim
        self.compiled = torch.compile(self.model) if options.get("compile", False) else None
        self._chunk = 0  # compiled batch size, set by the first call
        self._grids: set[tuple[int, int]] = set()  # patch grids with a ready position table
        self._first_call = threading.Lock()
        self._per_thread = threading.local()
        if device.type == "cuda":  # weights copied before other streams read them
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        host = self.preprocess.host_tensor(frames)
        self._prepare_grid(self.preprocess.input_size(host.shape[1:3]))
        with self._thread_stream():
            pixels = self.preprocess.normalise(self._upload(host)).to(self.dtype)
            return self._forward(pixels).float().cpu().numpy()

    def _prepare_grid(self, size: tuple[int, int]) -> None:
        """Compute a patch grid's position table once, before any thread uses it: each thread
        runs on its own stream, so a table another stream is still computing must not be
        read (and a compiled model then sees a cached constant, not a cache update)."""
        grid = (size[0] // self.model.shape.patch_size, size[1] // self.model.shape.patch_size)
        if grid in self._grids:
            return
        with self._first_call:
            self.model.position_table(grid, self.dtype)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._grids.add(grid)

    def _thread_stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._per_thread, "stream", None)
        if stream is None:
            stream = self._per_thread.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """uint8 frames to the device through this thread's pinned buffer (an asynchronous
        copy on the thread's stream; the buffer is reused only after the readback that ends
        the call has synchronised that stream)."""
        if self.device.type != "cuda":
            return host
        staging = getattr(self._per_thread, "staging", None)
        if staging is None or staging.numel() < host.numel():
            staging = self._per_thread.staging = torch.empty(
                host.numel(), dtype=torch.uint8, pin_memory=True
            )
        staged = staging[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(pixels)
        with self._first_call:  # compile once, not once per thread
            if self._chunk == 0:
                self._chunk = len(pixels)
                return self.compiled(pixels)
        chunk, n = self._chunk, len(pixels)
        outputs = []
        for start in range(0, n, chunk):
            part = pixels[start : start + chunk]
            if len(part) < chunk:
                part = torch.cat([part, part.new_zeros((chunk - len(part), *part.shape[1:]))])
            outputs.append(self.compiled(part)[: min(chunk, n - start)])
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


@register_backbone("dinov2")
class DinoV2Backbone(Backbone):
    """DINOv2 alone: visual embeddings only (``language_dim`` 0)."""

    language_dim = 0
    thread_safe = True
    prompts_on_cpu = True
    option_names = ENCODER_OPTIONS

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        check_encoder_options(options)

    def __init__(self, cfg: BackboneConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.encoder = DinoV2Encoder(cfg, self.device)
        self.visual_dim = self.encoder.dim

    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return self.encoder(frames)
