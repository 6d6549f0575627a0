"""A tiny random-init backbone: every test and the demo run it on a CPU in seconds.

Image encoder: DINOv2's preprocessing (x/255, then (x-0.5)/0.5), area-resize to 32x32,
three small convolutions, flatten (keeps *where* things are, which a global pool would
lose), one linear layer. Text encoder: lower-cased words hashed into a random embedding
table, mean-pooled. Both are deterministic from ``cfg.seed`` and independent of the batch.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rayrm.backbones.base import Backbone, frames_tensor, register_backbone
from rayrm.config import BackboneConfig

INPUT_SIZE = 32
VOCAB_SIZE = 4096
MAX_PROMPT_WORDS = 64  # the hashed-word "text encoder" takes this many words, like a real one


def _image_encoder(visual_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(32 * (INPUT_SIZE // 4) ** 2, visual_dim),
    )


@register_backbone("tiny")
class TinyBackbone(Backbone):
    thread_safe = True
    prompts_on_cpu = True
    option_names = frozenset()

    def __init__(self, cfg: BackboneConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.visual_dim = cfg.visual_dim
        self.language_dim = cfg.language_dim
        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            self.image_encoder = _image_encoder(cfg.visual_dim).eval().to(self.device)
        self.word_table = torch.randn(VOCAB_SIZE, cfg.language_dim, generator=generator)

    @torch.inference_mode()
    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        x = frames_tensor(frames).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        return self.image_encoder(x).float().cpu().numpy()

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(prompts), self.language_dim), dtype=np.float32)
        for i, prompt in enumerate(prompts):
            words = (_words(prompt) or [""])[:MAX_PROMPT_WORDS]
            ids = torch.tensor([zlib.crc32(w.encode()) % VOCAB_SIZE for w in words])
            out[i] = self.word_table[ids].mean(0).numpy()
        return out

    def prompt_problem(self, prompt: str) -> str | None:
        count = len(_words(prompt))
        if count > MAX_PROMPT_WORDS:
            limit = MAX_PROMPT_WORDS
            return f"prompt has {count} words; the tiny text encoder takes at most {limit}"
        return None


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())
