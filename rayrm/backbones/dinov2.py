"""DINOv2 ViT (plain, or with register tokens) as a frame encoder: CLS token after the final norm.

One compact ViT, written here, runs both checkpoint formats:

* the original facebookresearch state dict (``dinov2_vitb14_reg4_pretrain.pth``,
  ``dinov2_vitb14_pretrain.pth``): our parameter names *are* the original names, so the file
  loads as it is (``torch.load(weights_only=True)``), and any key left over or missing is listed;
* a Hugging Face folder (``Dinov2Model`` / ``Dinov2WithRegistersModel``): transformers reads it
  from the local path only, and its state dict is renamed to the original names (separate
  q/k/v projections concatenated into ``qkv``).

Why our own ViT rather than converting everything to HF's model: the reference numbers come
from the original code, whose position-embedding interpolation differs between its model variants
and from HF's plain ``Dinov2Model`` (see ``POS_INTERPOLATIONS``); a compact model states that
choice in one place, caches the interpolated table per patch grid instead of recomputing it
every batch, and runs plain ``scaled_dot_product_attention`` (SDPA) in bf16 without any HF
wrapper. Its numbers are checked against two independent implementations in the tests: the
original reference code (PyPI ``dinov2``) and transformers' models.

Frames arrive as uint8 [B, H, W, 3] and are preprocessed on the model's device:

* ``options.normalize``: ``seed`` (default: x/255, then (x-0.5)/0.5 on every channel) or
  ``imagenet`` (x/255, then ImageNet mean/std);
* ``options.resolution``: ``native`` (default, docs/recipe.md#embedding: no resize; where 14 does
  not divide H or W the frame is *center-cropped* to the largest multiple of 14 - at most 13 pixels
  lost, and no invented border content, which padding would add) or ``resize`` to
  ``options.image_size`` (an int or [H, W], multiples of 14; bicubic with antialias);
* ``options.pos_interpolation``: how the 37x37 pretraining position table is resampled to
  another patch grid - ``antialias`` (default: the original reg4 model and HF's
  ``Dinov2WithRegistersModel``), ``bicubic`` (HF's ``Dinov2Model``) or ``offset`` (the original
  code's plain models and the PyPI reference: scale factor with a +0.1 offset).

``backbone.dtype``: ``auto`` = bf16 on a GPU, fp32 on a CPU; or ``float32`` / ``bfloat16``.
``options.compile: true``: run the ViT through ``torch.compile`` (worth it on a GPU: a minute of
compilation per actor, then faster batches; see :class:`DinoV2Encoder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rayrm.backbones.base import Backbone, check_frames, frames_tensor, register_backbone
from rayrm.config import BackboneConfig
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

POS_INTERPOLATIONS = ("antialias", "bicubic", "offset")
NORMALIZATIONS = {
    "seed": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
RESOLUTIONS = ("native", "resize")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HEAD_DIM = 64  # every released DINOv2 ViT (S/B/L/g) has 64-wide heads
# Keys of the original format that the embedding does not use (masked-image pretraining only).
IGNORED_KEYS = ("mask_token",)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or not the model it claims to be."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on a GPU, fp32 elsewhere (CPU bf16 is slow; the reference ran fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"backbone.dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class VitShape:
    """What a state dict says about its ViT (heads are not in it: see ``HEAD_DIM``)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_dim: int
    num_registers: int
    layerscale: bool
    pos_grid: int  # the pretraining patch grid side (37 for 518x518)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, shape: VitShape):
        super().__init__()
        dim = shape.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, shape.num_heads)
        self.ls1 = LayerScale(dim) if shape.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, shape.mlp_dim)
        self.ls2 = LayerScale(dim) if shape.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """The original DINOv2 ViT's inference path; parameter names equal the original's."""

    def __init__(self, shape: VitShape, pos_interpolation: str = "antialias"):
        super().__init__()
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {pos_interpolation!r}"
            )
        self.shape = shape
        self.pos_interpolation = pos_interpolation
        dim = shape.embed_dim
        self.patch_embed = PatchEmbed(shape.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + shape.pos_grid**2, dim))
        if shape.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, shape.num_registers, dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] (H, W multiples of the patch) -> CLS [B, D]."""
        grid = (
            pixels.shape[-2] // self.shape.patch_size,
            pixels.shape[-1] // self.shape.patch_size,
        )
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1)
        x = x + self.position_table(grid, x.dtype)
        if self.register_tokens is not None:  # after the position embedding, as the original
            x = torch.cat((x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]), 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def position_table(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The position embedding for a patch grid, computed once per grid (weights are frozen)."""
        key = (grid, dtype, self.pos_embed.device)
        if key not in self._pos_cache:
            self._pos_cache[key] = self._interpolate(grid).to(dtype)
        return self._pos_cache[key]

    def _interpolate(self, grid: tuple[int, int]) -> torch.Tensor:
        side = self.shape.pos_grid
        if grid == (side, side):  # the pretraining grid: every implementation skips here
            return self.pos_embed
        table = self.pos_embed.float()  # bicubic in half precision shifts the table
        cls_pos, patch_pos = table[:, :1], table[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.pos_interpolation == "offset":
            scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
        else:
            antialias = self.pos_interpolation == "antialias"
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=antialias)
        if tuple(patch_pos.shape[-2:]) != grid:
            raise RuntimeError(f"position table resampled to {patch_pos.shape[-2:]}, not {grid}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat((cls_pos, patch_pos), dim=1)


# --------------------------------------------------------------------------- checkpoints


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


# --------------------------------------------------------------------------- preprocessing


def _image_size(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise UserError(f"backbone.options.image_size must be an int or [H, W], got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """uint8 frames -> normalised float pixels on the device, sized for the patch grid."""

    patch_size: int
    normalize: str = "seed"
    resolution: str = "native"
    image_size: tuple[int, int] | None = None

    @classmethod
    def from_options(cls, options: dict, patch_size: int) -> Preprocess:
        normalize = options.get("normalize", "seed")
        resolution = options.get("resolution", "native")
        if normalize not in NORMALIZATIONS:
            raise UserError(f"options.normalize must be one of {list(NORMALIZATIONS)}")
        if resolution not in RESOLUTIONS:
            raise UserError(f"options.resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        size = None
        if resolution == "resize":
            if "image_size" not in options:
                raise UserError("options.resolution 'resize' needs options.image_size")
            size = _image_size(options["image_size"])
            if any(s <= 0 or s % patch_size for s in size):
                raise UserError(f"options.image_size {size} must be multiples of {patch_size}")
        return cls(patch_size, normalize, resolution, size)

    def __call__(self, frames: np.ndarray, device: torch.device) -> torch.Tensor:
        return self.normalise(self.host_tensor(frames).to(device))

    def host_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """Checked, cropped uint8 frames as a CPU tensor sharing the array's memory."""
        check_frames(frames)
        return frames_tensor(self._crop(frames) if self.resolution == "native" else frames)

    def input_size(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the model's input for frames of ``frame_size`` after ``host_tensor``."""
        return self.image_size or tuple(frame_size)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (on the model's device) -> normalised float [B, 3, H', W']."""
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True)
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; uint8 resizers clip the same way
        mean, std = NORMALIZATIONS[self.normalize]
        mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean_t).div_(std_t)

    def _crop(self, frames: np.ndarray) -> np.ndarray:
        """Center crop to the largest multiple of the patch size (a no-op where it divides)."""
        h, w = frames.shape[1:3]
        p = self.patch_size
        if h < p or w < p:
            raise UserError(
                f"frames of {h}x{w} pixels are smaller than one {p}x{p} patch; use "
                "options.resolution: resize with options.image_size"
            )
        top, left = (h % p) // 2, (w % p) // 2
        return frames[:, top : top + h - h % p, left : left + w - w % p]


# --------------------------------------------------------------------------- the backbone


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

    def __init__(self, cfg: BackboneConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.encoder = DinoV2Encoder(cfg, self.device)
        self.visual_dim = self.encoder.dim

    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return self.encoder(frames)
