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
``rayrm.backbones.qwen3_vl_progress`` loads ``Qwen3VLForConditionalGeneration``), bf16 on a GPU
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
from rayrm.backbones.dinov2 import resolve_dtype
from rayrm.backbones.minilm import mean_pool
from rayrm.config import BackboneConfig
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


# --------------------------------------------------------------------------- debug flavours
# Random-weight model folders with the files a real one holds, for tests and the benchmark
# (no Qwen3-VL weights can be downloaded here). The tokenizer is character-level, so a prompt
# costs more tokens than with Qwen's BPE; the chat template has Qwen's layout.

DEBUG_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    "<think>",
    "</think>",
]
DEBUG_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?%-_()[]'\"\n/="
DEBUG_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (text, vision) sizes: "tiny" runs a test in milliseconds; "8b" has Qwen3-VL-8B's shapes.
DEBUG_FLAVOURS = {
    "tiny": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mrope_section=[4, 2, 2],
        ),
        dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
    ),
    "8b": (
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            mrope_section=[24, 20, 20],
            vocab_size=151936,
        ),
        dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    ),
}


def _write_debug_tokenizer(folder: str) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*DEBUG_SPECIAL_TOKENS, *DEBUG_CHARS, "[UNK]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=DEBUG_SPECIAL_TOKENS[1:],
        chat_template=DEBUG_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    return vocab


def _debug_config(flavour: str, vocab: dict[str, int]):
    from transformers import Qwen3VLConfig

    text, vision = (dict(d) for d in DEBUG_FLAVOURS[flavour])
    mrope_section = text.pop("mrope_section")
    text.setdefault("vocab_size", len(vocab))
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": mrope_section,
        "mrope_interleaved": True,
    }
    vision.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen3VLConfig(
        text_config=dict(text, pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
        image_token_id=vocab[IMAGE_TOKEN],
        video_token_id=vocab[VIDEO_TOKEN],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )


def write_debug_model(
    folder: str,
    flavour: str = "tiny",
    max_pixels: int = 64 * 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> str:
    """A random-weight Qwen3-VL folder: config, weights, tokenizer, chat template, image
    processor config. ``max_pixels`` bounds the frame size the processor resizes to."""
    from transformers import Qwen3VLForConditionalGeneration

    vocab = _write_debug_tokenizer(folder)
    pil_image_processor_class()(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": max_pixels},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # an 8B-shaped model is built straight in bf16
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = Qwen3VLForConditionalGeneration(_debug_config(flavour, vocab))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    return folder
