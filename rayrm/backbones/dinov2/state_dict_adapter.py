"""DINOv2 checkpoints of either format -> a loaded :class:`DinoViT`, every key accounted for.

* the original facebookresearch state dict (``dinov2_vitb14_reg4_pretrain.pth``,
  ``dinov2_vitb14_pretrain.pth``, or ``.safetensors``): our parameter names *are* the original
  names, so the file loads as it is (``torch.load(weights_only=True)``); trainer wrappers
  (``teacher`` / ``model`` / ``state_dict``, ``module.`` / ``backbone.`` prefixes, chunked
  blocks) are unwrapped;
* a Hugging Face folder (``Dinov2Model`` / ``Dinov2WithRegistersModel``): transformers reads it
  from the local path only, and its state dict is renamed to the original names (separate
  q/k/v projections concatenated into ``qkv``).

The architecture is read off the tensors (:func:`infer_shape`); any key left over or missing
is listed in the error.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

from rayrm.backbones.dinov2.model import HEAD_DIM, DinoViT, VitShape
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

# Keys of the original format that the embedding does not use (masked-image pretraining only).
IGNORED_KEYS = ("mask_token",)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or not the model it claims to be."""


def _read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the loaders raise many types on bytes they cannot parse
        raise CheckpointError(
            f"{path} is not a PyTorch state dict that loads with weights_only=True: {err}"
        ) from None
    return _unwrap(state, path)


def _unwrap(state: object, path: str) -> dict[str, torch.Tensor]:
    """A bare state dict, or the original trainer's ``{"teacher": {"backbone.*": ...}}``."""
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds {type(state).__name__}, not a state dict of tensors")
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(module\.)?(backbone\.)?", "", key)
        # Training checkpoints with block_chunks > 0 nest blocks as blocks.<chunk>.<index>.
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        renamed[key] = value
    return renamed


_HF_RENAMES = [  # (HF name pattern, original name); both old and new transformers names
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"encoder\.layer\.(\d+)\.attention\.(o_proj|output\.dense)\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"layernorm\.", "norm."),
]
_HF_QKV = re.compile(
    r"encoder\.layer\.(\d+)\.attention\.(?:attention\.)?"
    r"(q_proj|k_proj|v_proj|query|key|value)\.(weight|bias)"
)


def hf_to_original(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers DINOv2 state dict to the original names; q, k, v -> qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        match = _HF_QKV.fullmatch(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part[0]] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key, count=1)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"layer {layer}: attention {kind} has only {sorted(parts)}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _read_hf_folder(path: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """State dict (original names) and head count of a transformers DINOv2 folder."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a DINOv2 model")
    if config.get("use_swiglu_ffn") or config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: only the GELU-MLP DINOv2 (ViT-S/B/L) is supported")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return hf_to_original(model.state_dict()), config.get("num_attention_heads")


def read_checkpoint(path: str | None) -> tuple[dict[str, torch.Tensor], int | None]:
    """Original-format file (.pth / .safetensors) or HF folder -> (original-name state, heads)."""
    if not path:
        raise CheckpointError(
            "the DINOv2 backbone needs weights: set --backbone.checkpoint to an original "
            "checkpoint file (e.g. dinov2_vitb14_reg4_pretrain.pth) or a transformers folder"
        )
    if not os.path.exists(path):
        raise CheckpointError(f"DINOv2 checkpoint {path} does not exist")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CheckpointError(
                f"{path} is a folder without config.json: not a transformers model"
            )
        return _read_hf_folder(path)
    return _read_state_dict_file(path), None


def _block_count(state: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_shape(state: dict[str, torch.Tensor], num_heads: int | None = None) -> VitShape:
    """Read the architecture off the tensors; fail listing what a DINOv2 ViT must have."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"not a DINOv2 ViT checkpoint: missing keys {missing}; it has e.g. "
            f"{sorted(state)[:8]} ({len(state)} keys)"
        )
    dim = state["cls_token"].shape[-1]
    positions = state["pos_embed"].shape[1] - 1
    side = round(positions**0.5)
    if side * side != positions:
        raise CheckpointError(f"pos_embed holds {positions} patch positions, not a square grid")
    registers = state.get("register_tokens")
    return VitShape(
        embed_dim=dim,
        depth=_block_count(state),
        num_heads=num_heads or max(1, dim // HEAD_DIM),
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_registers=0 if registers is None else registers.shape[1],
        layerscale="blocks.0.ls1.gamma" in state,
        pos_grid=side,
    )


def load_state(model: DinoViT, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names every missing and unexpected key."""
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not fit a DINOv2 ViT {model.shape}:\n"
            f"  missing keys ({len(result.missing_keys)}): {_listing(result.missing_keys)}\n"
            f"  unexpected keys ({len(result.unexpected_keys)}): "
            f"{_listing(result.unexpected_keys)}"
        )


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "") or "none"


def load_dinov2(
    path: str | None, num_heads: int | None = None, pos_interpolation: str = "antialias"
) -> DinoViT:
    """A DINOv2 ViT in fp32 on the CPU, from either checkpoint format, in eval mode."""
    state, heads = read_checkpoint(path)
    model = DinoViT(infer_shape(state, num_heads or heads), pos_interpolation)
    load_state(model, state, str(path))
    logger.info("loaded DINOv2 %s from %s", model.shape, path)
    return model.eval()
