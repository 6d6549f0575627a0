"""The DINOv2 ViT's inference path (plain, or with register tokens): CLS token after the final norm.

Parameter names equal the original facebookresearch names, so an original state dict loads as
it is (``state_dict_adapter`` maps the other formats onto them). Attention is plain
``scaled_dot_product_attention``; the interpolated position table is cached per patch grid
(weights are frozen), instead of being recomputed every batch.

``pos_interpolation``: how the 37x37 pretraining position table is resampled to another patch
grid - ``antialias`` (default: the original reg4 model and HF's ``Dinov2WithRegistersModel``),
``bicubic`` (HF's ``Dinov2Model``) or ``offset`` (the original code's plain models and the
PyPI reference: scale factor with a +0.1 offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

POS_INTERPOLATIONS = ("antialias", "bicubic", "offset")
HEAD_DIM = 64  # every released DINOv2 ViT (S/B/L/g) has 64-wide heads


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
