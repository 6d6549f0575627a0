"""The reward transformer (SEED-SPEC §5, continuous ReWIND head).

Tokens: [language] + L video tokens. Visual (and language) embeddings are first standardised
with per-dimension statistics of the training set (stored as buffers, so they travel with the
checkpoint): random or frozen features barely change within an episode, and the model only
learns from them once each dimension is on a common scale (SEED-SPEC, measured defects).
Order is carried by the causal mask; a learned vector marks the first video token (seed).
"""

from __future__ import annotations

import torch
from torch import nn

from rayrm.config import ModelConfig
from rayrm.train.windows import prefix_positions, prefix_read_position

STD_FLOOR = 1e-6  # below this a feature counts as constant (e.g. the blind control's zeros)


class RewardTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, visual_dim: int, language_dim: int):
        super().__init__()
        self.cfg = cfg
        self.visual_dim = visual_dim
        self.language_dim = language_dim
        d = cfg.d_model
        self.visual_proj = nn.Linear(visual_dim, d)
        self.language_proj = nn.Linear(language_dim, d) if language_dim > 0 else None
        if cfg.positional == "first":  # seed: order comes from the causal mask alone
            self.first_frame = nn.Parameter(torch.randn(d) * 0.02)
        elif cfg.positional == "all":
            self.positions = nn.Parameter(torch.randn(cfg.max_seq_len, d) * 0.02)
        else:
            raise ValueError(f"model.positional must be 'first' or 'all', got {cfg.positional!r}")
        layer = nn.TransformerEncoderLayer(
            d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.Linear(d, cfg.head_hidden),
            nn.LayerNorm(cfg.head_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, 1),
            nn.Sigmoid(),
        )
        self.register_buffer("visual_mean", torch.zeros(visual_dim))
        self.register_buffer("visual_std", torch.ones(visual_dim))
        self.register_buffer("language_mean", torch.zeros(language_dim))
        self.register_buffer("language_std", torch.ones(language_dim))

    def set_input_stats(self, visual_mean, visual_std, language_mean, language_std) -> None:
        """Store training-set feature statistics; constant dimensions keep a unit scale."""
        for name, value in [
            ("visual_mean", visual_mean),
            ("visual_std", torch.where(visual_std < STD_FLOOR, 1.0, visual_std)),
            ("language_mean", language_mean),
            ("language_std", torch.where(language_std < STD_FLOOR, 1.0, language_std)),
        ]:
            getattr(self, name).copy_(value)

    def forward(self, visual: torch.Tensor, language: torch.Tensor | None = None) -> torch.Tensor:
        """visual [B, L, D], language [B, D_lang] -> progress in (0, 1) per frame, [B, L]."""
        x = self.visual_proj((visual - self.visual_mean) / self.visual_std)
        if self.cfg.positional == "first":
            x = torch.cat([x[:, :1] + self.first_frame, x[:, 1:]], dim=1)
        else:
            x = x + self.positions[: x.shape[1]]
        if self.language_proj is not None:
            lang = (language - self.language_mean) / self.language_std
            x = torch.cat([self.language_proj(lang).unsqueeze(1), x], dim=1)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.encoder(x, mask=mask.to(x.dtype), is_causal=True)
        if self.language_proj is not None:
            h = h[:, 1:]
        return self.head(h).squeeze(-1)

    @torch.no_grad()
    def prefix_curve(
        self, visual: torch.Tensor, language: torch.Tensor | None, batch_size: int = 256
    ) -> torch.Tensor:
        """Plain prefix curve of one episode (SEED-SPEC §6 without chaining): float32 [T].

        Prefix i (frames 0..i) is padded/subsampled to L like a training window; its value is
        the prediction at position min(i, L-1), i.e. at the prefix's last frame.
        """
        num_frames, seq_len = visual.shape[0], self.cfg.max_seq_len
        positions = prefix_positions(num_frames, seq_len, device=visual.device)
        read = prefix_read_position(num_frames, seq_len, device=visual.device)
        out = torch.empty(num_frames, device=visual.device)
        for start in range(0, num_frames, batch_size):
            rows = slice(start, start + batch_size)
            seqs = visual[positions[rows]]
            lang = None if self.language_proj is None else language.expand(len(seqs), -1)
            pred = self(seqs, lang)
            out[rows] = pred.gather(1, read[rows].unsqueeze(1)).squeeze(1).float()
        return out
