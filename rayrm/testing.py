"""Helpers for tests, benchmarks and the demo: checkpoints of randomly initialised models.

Random weights give rewards that move with the frames, which is all the serving, scoring and
embedding machinery needs; nothing here is for producing a useful model. Three kinds:

* :func:`random_checkpoint`: a reward-model checkpoint over the tiny backbone;
* :func:`write_random_checkpoint`: an original-format DINOv2 state dict (``VIT_FLAVOURS``);
* :func:`write_debug_model`: a Qwen3-VL model folder (``DEBUG_FLAVOURS``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rayrm.backbones.dinov2.model import DinoViT, VitShape
from rayrm.backbones.qwen3_vl import IMAGE_TOKEN, VIDEO_TOKEN, pil_image_processor_class
from rayrm.config import BackboneConfig, ModelConfig, TrainConfig, to_dict
from rayrm.train.checkpoint import save_checkpoint
from rayrm.train.model import RewardTransformer

SMALL_MODEL = ModelConfig(
    d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=8, dropout=0.0
)


def random_checkpoint(
    path: str,
    backbone: BackboneConfig | None = None,
    model: ModelConfig = SMALL_MODEL,
    num_stages: int = 0,
    seed: int = 0,
) -> str:
    """A checkpoint folder at ``path`` over ``backbone`` (default: the tiny backbone, 32-dim
    frames and 16-dim prompts) that ``load_model`` and ``RewardScorer`` read like a trained one.
    """
    backbone = backbone or BackboneConfig(name="tiny", visual_dim=32, language_dim=16)
    if backbone.name != "tiny":
        raise ValueError("random_checkpoint builds dims for the tiny backbone only")
    torch.manual_seed(seed)
    cfg = dataclasses.replace(model, num_stages=num_stages)
    net = RewardTransformer(cfg, backbone.visual_dim, backbone.language_dim)
    if num_stages:
        net.set_stage_priors(torch.full((num_stages,), 1.0 / num_stages))
    meta = {
        "train": to_dict(TrainConfig()),
        "backbone": to_dict(backbone),
        "stage_names": [f"stage {k}" for k in range(num_stages)] if num_stages else None,
    }
    save_checkpoint(path, net.eval(), meta)
    return path


# --------------------------------------------------------------------------- DINOv2

# Architectures of the released checkpoints (and a debug one), for random-weight benchmarks.
VIT_FLAVOURS = {
    "vitb14_reg4": VitShape(768, 12, 12, 14, 3072, 4, True, 37),
    "vitb14": VitShape(768, 12, 12, 14, 3072, 0, True, 37),
    "debug": VitShape(32, 2, 2, 14, 128, 4, True, 4),
}


def write_random_checkpoint(path: str, flavour: str = "vitb14_reg4", seed: int = 0) -> str:
    """An original-format state dict with random weights (benchmarks; no real weights here)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DinoViT(VIT_FLAVOURS[flavour])
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                nn.init.constant_(param, 0.1)
            elif param.dim() > 1 or name in ("cls_token", "register_tokens"):
                nn.init.trunc_normal_(param, std=0.02)
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------- Qwen3-VL
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
