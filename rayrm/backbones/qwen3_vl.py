"""Qwen3-VL as a frame encoder: one chat message [image, prompt] per frame, pooled hidden state.

Per frame the reference pipeline (docs/recipe.md#embedding) builds the message ``[image, task
prompt]``, applies the chat template with the generation prompt, left-pads the batch, runs the
model and averages the last hidden state over *every* position - padding included, so a frame's
embedding depended on the longest prompt in its batch. Here the mean is weighted by the attention
mask (real tokens only), so a frame embeds the same alone or in any batch; ``options.pool: image``
averages over the image tokens only. The embedding is float32 [hidden size] (4096 for Qwen3-VL-8B);
``language_dim`` is 0 because the prompt is fused into every frame.

Loading is offline from a local folder (``--backbone.checkpoint``): transformers'
``Qwen3VLModel`` (the language model's head is not loaded; the progress estimator in
``rayrm.zeroshot.gvl`` loads ``Qwen3VLForConditionalGeneration``), bf16 on a GPU
(``backbone.dtype``), flash-attention 2 when ``flash_attn`` is installed, else SDPA.

Inputs are built without ``Qwen3VLProcessor``: in transformers 5 it requires a video
processor, and that needs torchvision, which does not work beside our CPU torch. The
:class:`ChatInputs` builder does the processor's text work (chat template, one
``<|image_pad|>`` per merged patch, left padding, ``mm_token_type_ids``) and uses the PIL
(non-torchvision) ``Qwen2VLImageProcessorPil`` for pixels. Options: ``pool`` (``tokens`` |
``image``), ``min_pixels`` / ``max_pixels`` (the image processor's resize bounds; default the
folder's), ``attn`` (force ``sdpa`` / ``eager`` / ``flash_attention_2``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rayrm.backbones.base import Backbone, check_frames, register_backbone
from rayrm.backbones.minilm import mean_pool
from rayrm.config import BackboneConfig
from rayrm.devices import resolve_dtype
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
POOLS = ("tokens", "image")


def attention_implementation(
    device: torch.device, dtype: torch.dtype, requested: str | None = None
) -> str:
    """flash-attention 2 on a GPU in half precision when the package is installed, else SDPA."""
    if requested:
        return requested
    half = dtype in (torch.bfloat16, torch.float16)  # flash-attention has no fp32 kernels
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_model_folder(path: str | None) -> str:
    if not path:
        raise FileNotFoundError(
            "the Qwen3-VL backbone needs a local model folder: set --backbone.checkpoint"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json, not a transformers model folder")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "qwen3_vl":
        raise UserError(f"{path}: model_type {config.get('model_type')!r} is not qwen3_vl")
    return path


def hidden_size(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["text_config"]["hidden_size"])


def load_qwen3_vl(
    path: str, device: torch.device, dtype: torch.dtype, generation: bool = False, attn=None
):
    """``Qwen3VLModel`` (embedding) or ``Qwen3VLForConditionalGeneration`` (answers), eval."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

    cls = Qwen3VLForConditionalGeneration if generation else Qwen3VLModel
    model = cls.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype,
        attn_implementation=attention_implementation(device, dtype, attn),
    )
    logger.info(
        "loaded %s from %s (%s, %s)%s",
        cls.__name__,
        path,
        dtype,
        model.config._attn_implementation,
        "" if generation else "; lm_head is left out on purpose (transformers calls it UNEXPECTED)",
    )
    return model.eval().to(device)


def _read_chat_template(path: str) -> str | None:
    """Processor-level chat templates (``chat_template.json`` / ``.jinja``) of a model folder."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    as_json = os.path.join(path, "chat_template.json")
    if os.path.isfile(as_json):
        with open(as_json) as f:
            return json.load(f)["chat_template"]
    return None


def pil_image_processor_class():
    """Qwen's image processor without torchvision: ``Qwen2VLImageProcessorPil`` in transformers
    5 (where ``Qwen2VLImageProcessor`` is the torchvision one); before that split, the
    ``Qwen2VLImageProcessor`` class itself is the PIL/numpy one."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            Qwen2VLImageProcessor as Qwen2VLImageProcessorPil,
        )
    return Qwen2VLImageProcessorPil


def model_inputs(model, batch: dict) -> dict:
    """Only the inputs the installed transformers' forward takes (``mm_token_type_ids`` is
    new in transformers 5; earlier versions derive the same from ``input_ids``)."""
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in accepted}


class ChatInputs:
    """Conversations with images -> the model's batched, left-padded input tensors."""

    def __init__(self, path: str, options: dict | None = None):
        from transformers import AutoTokenizer

        options = options or {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.chat_template = self.tokenizer.chat_template or _read_chat_template(path)
        if not self.chat_template:
            raise UserError(f"{path}: no chat template (tokenizer or chat_template.json/jinja)")
        sizes = {k: options[k] for k in ("min_pixels", "max_pixels") if k in options}
        self.image_processor = pil_image_processor_class().from_pretrained(
            path, local_files_only=True, **sizes
        )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        if self.tokenizer.pad_token_id is None:
            raise UserError(f"{path}: the tokenizer has no pad token")

    def __call__(self, conversations: list[list[dict]], images: list[np.ndarray]) -> dict:
        """``images`` in the order their ``{"type": "image"}`` items appear, all conversations."""
        texts = [
            self.tokenizer.apply_chat_template(
                conv, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            for conv in conversations
        ]
        pixels = self.image_processor(images=list(images), return_tensors="pt")
        texts = self._expand_image_tokens(texts, pixels["image_grid_thw"])
        tokens = self.tokenizer(
            texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
        )
        ids = tokens["input_ids"]
        token_types = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
        return {
            "input_ids": ids,
            "attention_mask": tokens["attention_mask"],
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": token_types,
        }

    def _expand_image_tokens(self, texts: list[str], grids: torch.Tensor) -> list[str]:
        """One placeholder per image becomes one per merged patch (what the processor does)."""
        merge = self.image_processor.merge_size**2
        counts = iter((grids.prod(-1) // merge).tolist())
        out = []
        for text in texts:
            pieces = text.split(IMAGE_TOKEN)
            expanded = pieces[0]
            for piece in pieces[1:]:
                count = next(counts, None)
                if count is None:
                    raise ValueError("fewer images than image placeholders in the conversations")
                expanded += IMAGE_TOKEN * count + piece
            out.append(expanded)
        if next(counts, None) is not None:
            raise ValueError("more images than image placeholders in the conversations")
        return out


def frame_conversation(prompt: str) -> list[dict]:
    """The per-frame message: the image, then the task prompt (docs/recipe.md#embedding)."""
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


@dataclass
class Qwen3VLOptions:
    pool: str = "tokens"
    attn: str | None = None

    @classmethod
    def from_dict(cls, options: dict) -> Qwen3VLOptions:
        pool = options.get("pool", "tokens")
        if pool not in POOLS:
            raise UserError(f"options.pool must be one of {POOLS}, got {pool!r}")
        return cls(pool=pool, attn=options.get("attn"))


@register_backbone("qwen3_vl")
class Qwen3VLBackbone(Backbone):
    language_dim = 0
    option_names = frozenset({"pool", "attn", "min_pixels", "max_pixels"})

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        Qwen3VLOptions.from_dict(options)

    def __init__(self, cfg: BackboneConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        path = check_model_folder(cfg.checkpoint)
        self.options = Qwen3VLOptions.from_dict(cfg.options)
        self.visual_dim = hidden_size(path)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.inputs = ChatInputs(path, cfg.options)
        self.model = load_qwen3_vl(path, self.device, self.dtype, attn=self.options.attn)

    @torch.inference_mode()
    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        check_frames(frames)
        if len(prompts) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(prompts)} prompts")
        batch = self.inputs([frame_conversation(p) for p in prompts], list(frames))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        hidden = self.model(**model_inputs(self.model, batch), use_cache=False).last_hidden_state
        mask = batch["attention_mask"]
        if self.options.pool == "image":
            mask = mask * (batch["input_ids"] == self.inputs.image_token_id)
        return mean_pool(hidden.float(), mask).cpu().numpy()
