"""The reward transformer (docs/recipe.md#model): a continuous ReWiND head, or SARM stage heads.

Continuous (``model.num_stages == 0``, the default): progress = sigmoid head per frame.

SARM (``model.num_stages = K > 0``): a shared trunk feeds a stage head that outputs *logits*
(trained with cross-entropy; the reference pipeline applied softmax first and then
cross-entropy, i.e. softmax twice) and a subtask-progress head that is conditioned on a stage
(one-hot, concatenated to the trunk features): the ground-truth stage for a share of training
windows, the predicted stage otherwise and always at inference. Total progress = cumulative prior
of the stage + prior of the stage x subtask progress, with the stage priors stored as buffers.

Tokens: [language] + L video tokens. Visual (and language) embeddings are first standardised
with per-dimension statistics of the training set (stored as buffers, so they travel with the
checkpoint): random or frozen features barely change within an episode, and the model only
learns from them once each dimension is on a common scale
(docs/recipe.md#departures-from-the-reference-pipeline). Order is carried by the causal mask;
a learned vector marks the first video token (docs/recipe.md#model).

Success head (``model.success_head``, on by default): a per-frame logit of "the task is done
at this frame", on the same hidden states as the progress head. It is what a model learns from
failed episodes, which have no progress label: every frame of a failure is "not done", the last
frames of a success are "done" (``rayrm.train.loop``; Robometer's per-frame success head).
Progress says how far along the motion is; the success head says whether it reached the goal,
so a fluent motion to the wrong place can score high progress and low success.

Several cameras and the robot state (``embed.cameras``, ``embed.state``). A frame vector is
``[view_0 | view_1 | ... | state]`` (``view_dims``, ``state_dim``; the shards' frame layout,
``rayrm.data.schema.FrameLayout``), standardised as a whole like one camera's. Per timestep
the model makes one token from it:

    token_t = mean_v LayerNorm_v(W_v view_v,t + b_v)  +  MLP_state(state_t)

- One token per timestep, not one per view: the sequence keeps its L video tokens, so the
  causal mask, the windows, the prefix curves and the streaming scorer are the same for any
  number of cameras, and attention costs no more with more cameras.
- Each view its own projection: the cameras see different things (a wrist camera's features
  vary far more within an episode than a side camera's) and may come from different
  backbones and dims. Its own LayerNorm before fusing puts every view's token on one scale,
  so no view drowns the others whatever its dim or statistics; it is also what makes the
  per-view projections more than one Linear over the concatenation (without a non-linearity
  before the mean, ``mean_v W_v x_v`` *is* a single Linear of ``[x_0 | x_1 | ...]``).
- The mean, not the sum or a concatenation: the fused token's scale does not grow with the
  number of cameras, and a view that carries nothing (a blank or frozen camera: after the
  per-view norm, a constant) shifts every token alike instead of adding noise.
- No learned view embedding: with per-view projections the model already knows which view
  a part came from, and a per-view vector added before the mean would be one constant for
  every token (the biases do that already).
- The state through its own small MLP (Linear-GELU-Linear), added to the fused token: a
  pose is a few numbers whose meaning is non-linear (rotations), and in one Linear beside
  thousands of embedding dims it would barely count; its own projection gives it a full
  d_model contribution.

With one view and no state the model is the single-camera one: ``visual_proj`` alone, the
same parameters and state_dict keys as before, so older checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayrm.config import ModelConfig
from rayrm.train.windows import prefix_positions, prefix_read_position

STD_FLOOR = 1e-6  # below this a feature counts as constant (e.g. the blind control's zeros)


class RewardTransformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        visual_dim: int,
        language_dim: int,
        view_dims: list[int] | None = None,
        state_dim: int = 0,
    ):
        """``visual_dim``: values per frame, every view and the state; ``view_dims``: each
        camera's share, in order (default: one camera, all of ``visual_dim`` but the state);
        ``state_dim``: the robot state's, last (0: none)."""
        super().__init__()
        self.cfg = cfg
        self.visual_dim = visual_dim
        self.language_dim = language_dim
        self.view_dims = [int(v) for v in view_dims or [visual_dim - state_dim]]
        self.state_dim = int(state_dim)
        if sum(self.view_dims) + self.state_dim != visual_dim or min(self.view_dims) <= 0:
            raise ValueError(
                f"view dims {self.view_dims} + state dim {state_dim} do not make up the "
                f"frame vector's {visual_dim} values"
            )
        d = cfg.d_model
        if len(self.view_dims) == 1:  # one camera: the single-camera model's parameters
            self.visual_proj = nn.Linear(self.view_dims[0], d)
        else:
            self.view_projs = nn.ModuleList(nn.Linear(v, d) for v in self.view_dims)
            self.view_norms = nn.ModuleList(nn.LayerNorm(d) for _ in self.view_dims)
        self.state_proj = (
            nn.Sequential(nn.Linear(self.state_dim, d), nn.GELU(), nn.Linear(d, d))
            if self.state_dim
            else None
        )
        self.language_proj = nn.Linear(language_dim, d) if language_dim > 0 else None
        if cfg.positional == "first":  # order comes from the causal mask alone
            self.first_frame = nn.Parameter(torch.randn(d) * 0.02)
        elif cfg.positional == "all":
            self.positions = nn.Parameter(torch.randn(cfg.max_seq_len, d) * 0.02)
        else:
            raise ValueError(f"model.positional must be 'first' or 'all', got {cfg.positional!r}")
        layer = nn.TransformerEncoderLayer(
            d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        if cfg.num_stages > 0:
            self.trunk = _trunk(d, cfg.head_hidden, cfg.dropout)
            self.stage_head = nn.Linear(cfg.head_hidden, cfg.num_stages)
            self.subtask_head = nn.Sequential(
                nn.Linear(cfg.head_hidden + cfg.num_stages, cfg.head_hidden),
                nn.GELU(),
                nn.Linear(cfg.head_hidden, 1),
                nn.Sigmoid(),
            )
            uniform = torch.full((cfg.num_stages,), 1.0 / cfg.num_stages)
            self.register_buffer("stage_prior", uniform)
            self.register_buffer("cumulative_prior", torch.cumsum(uniform, 0) - uniform)
        else:
            self.head = nn.Sequential(
                _trunk(d, cfg.head_hidden, cfg.dropout), nn.Linear(cfg.head_hidden, 1), nn.Sigmoid()
            )
        self.success_head = None
        if cfg.success_head:
            self.success_head = nn.Sequential(
                _trunk(d, cfg.head_hidden, cfg.dropout), nn.Linear(cfg.head_hidden, 1)
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

    def set_stage_priors(self, prior: torch.Tensor) -> None:
        """Share of the task each stage takes (sums to 1); the cumulative prior is exclusive."""
        prior = torch.as_tensor(prior, dtype=torch.float32, device=self.stage_prior.device)
        self.stage_prior.copy_(prior)
        self.cumulative_prior.copy_(torch.cumsum(prior, 0) - prior)

    def frame_tokens(self, visual: torch.Tensor) -> torch.Tensor:
        """Standardised frame vectors [B, L, D] -> one token per timestep [B, L, d_model]:
        the views fused and the state added (see the module docstring for why so)."""
        if len(self.view_dims) == 1 and self.state_proj is None:
            return self.visual_proj(visual)
        views = visual[..., : sum(self.view_dims)].split(self.view_dims, dim=-1)
        if len(views) == 1:
            tokens = self.visual_proj(views[0])
        else:
            fused = [
                norm(proj(v)) for v, proj, norm in zip(views, self.view_projs, self.view_norms)
            ]
            tokens = torch.stack(fused).mean(0)
        if self.state_proj is not None:
            tokens = tokens + self.state_proj(visual[..., -self.state_dim :])
        return tokens

    def encode(self, visual: torch.Tensor, language: torch.Tensor | None) -> torch.Tensor:
        """visual [B, L, D], language [B, D_lang] -> hidden states of the video tokens."""
        x = self.frame_tokens((visual - self.visual_mean) / self.visual_std)
        if self.cfg.positional == "first":
            x = torch.cat([x[:, :1] + self.first_frame, x[:, 1:]], dim=1)
        else:
            x = x + self.positions[: x.shape[1]]
        if self.language_proj is not None:
            lang = (language - self.language_mean) / self.language_std
            x = torch.cat([self.language_proj(lang).unsqueeze(1), x], dim=1)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.encoder(x, mask=mask.to(x.dtype), is_causal=True)
        return h[:, 1:] if self.language_proj is not None else h

    def forward_all(
        self,
        visual: torch.Tensor,
        language: torch.Tensor | None = None,
        stage: torch.Tensor | None = None,
        use_given_stage: torch.Tensor | None = None,
    ) -> ModelOutput:
        """All heads. SARM training passes the ground-truth ``stage`` [B, L] and a mask
        ``use_given_stage`` [B]: those rows condition the subtask head on the given stage, the
        others on the predicted one (as at inference, where no stage is given)."""
        h = self.encode(visual, language)
        success = None if self.success_head is None else self.success_head(h).squeeze(-1)
        if self.cfg.num_stages == 0:
            return ModelOutput(progress=self.head(h).squeeze(-1), success_logit=success)
        features = self.trunk(h)
        logits = self.stage_head(features)
        predicted = logits.argmax(-1)
        if stage is None:
            stage = predicted
        elif use_given_stage is not None:
            stage = torch.where(use_given_stage[:, None], stage, predicted)
        one_hot = nn.functional.one_hot(stage, self.cfg.num_stages).to(features.dtype)
        subtask = self.subtask_head(torch.cat([features, one_hot], -1)).squeeze(-1)
        progress = self.cumulative_prior[stage] + self.stage_prior[stage] * subtask
        return ModelOutput(
            progress=progress,
            stage_logits=logits,
            subtask=subtask,
            stage=stage,
            success_logit=success,
        )

    def forward(
        self,
        visual: torch.Tensor,
        language: torch.Tensor | None = None,
        stage: torch.Tensor | None = None,
        use_given_stage: torch.Tensor | None = None,
        return_all: bool = False,
    ) -> torch.Tensor | ModelOutput:
        """visual [B, L, D], language [B, D_lang] -> total progress in [0, 1] per frame, [B, L];
        every head's output with ``return_all`` (training goes through here, so DDP sees it)."""
        out = self.forward_all(visual, language, stage, use_given_stage)
        return out if return_all else out.progress

    @torch.no_grad()
    def prefix_outputs(
        self, visual: torch.Tensor, language: torch.Tensor | None, batch_size: int = 256
    ) -> dict[str, torch.Tensor | None]:
        """Plain prefix curves of one episode (docs/recipe.md#curves, without chaining).

        Prefix i (frames 0..i) is padded/subsampled to L like a training window; its values are
        the outputs at position min(i, L-1), i.e. at the prefix's last frame. Returns
        ``progress`` float32 [T]; for SARM models ``stage`` int64 [T] (argmax) and
        ``subtask`` float32 [T]; with a success head ``success`` float32 [T], the probability
        that the task is done (None where the model has no such head).
        """
        num_frames, seq_len = visual.shape[0], self.cfg.max_seq_len
        positions = prefix_positions(num_frames, seq_len, device=visual.device)
        read = prefix_read_position(num_frames, seq_len, device=visual.device)
        parts: dict[str, list[torch.Tensor]] = {
            "progress": [],
            "stage": [],
            "subtask": [],
            "success": [],
        }
        for start in range(0, num_frames, batch_size):
            rows = slice(start, start + batch_size)
            seqs = visual[positions[rows]]
            lang = None if self.language_proj is None else language.expand(len(seqs), -1)
            out = self.forward_all(seqs, lang)
            at = read[rows].unsqueeze(1)
            parts["progress"].append(out.progress.gather(1, at).squeeze(1).float())
            if out.stage is not None:
                parts["stage"].append(out.stage.gather(1, at).squeeze(1))
                parts["subtask"].append(out.subtask.gather(1, at).squeeze(1).float())
            if out.success_logit is not None:
                success = out.success_logit.gather(1, at).squeeze(1).float()
                parts["success"].append(torch.sigmoid(success))
        return {k: torch.cat(v) if v else None for k, v in parts.items()}

    @torch.no_grad()
    def prefix_curve(
        self, visual: torch.Tensor, language: torch.Tensor | None, batch_size: int = 256
    ) -> torch.Tensor:
        """The total-progress prefix curve, float32 [T] (see ``prefix_outputs``)."""
        return self.prefix_outputs(visual, language, batch_size)["progress"]


@dataclass
class ModelOutput:
    progress: torch.Tensor  # [B, L] total progress
    stage_logits: torch.Tensor | None = None  # [B, L, K] (SARM)
    subtask: torch.Tensor | None = None  # [B, L] (SARM)
    stage: torch.Tensor | None = None  # [B, L] stage that conditioned the subtask head
    success_logit: torch.Tensor | None = None  # [B, L] "done at this frame" (success head)


def _trunk(d_model: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_model, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)
    )
