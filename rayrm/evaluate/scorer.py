"""Streaming rewards for online use (RL): one progress value per environment per step.

::

    scorer = RewardScorer.from_checkpoint("outputs/demo/train/reward_model/checkpoint_...")
    scorer.reset(["Put the cube in the pot."] * 8)      # 8 environments, one prompt each
    for _ in range(horizon):
        frames = envs.render()                          # uint8 [8, H, W, 3] (or embeddings [8, D])
        reward = scorer.step(frames)                    # float32 [8], progress in [0, 1]
    scorer.reset(["Open the drawer."], env_ids=[3])     # a new episode in environment 3 only

Causal by construction: the value at step t is the model's output at the last frame of the
frames seen so far (0..t), brought to the window length L exactly like a training window (pad
by repeating the last frame while t < L, subsample at L evenly spaced indices afterwards). That
is the plain prefix curve of ``rayrm evaluate``, computed one step at a time, so the evaluation's
``causal`` curve and this scorer agree to float precision (tests check it). Each step embeds one
frame per environment (raw frames go through the checkpoint's backbone) and runs one forward
pass over L tokens per environment: O(L) compute per step whatever the episode length. The
embeddings seen so far are kept (O(t) memory, a few KB per frame) because the subsampled prefix
reaches back to frame 0.

Works inside a Ray actor (``ray.remote(RewardScorer)``): the model and backbone load in the
actor process, on its GPU when it has one; see ``jobs/score_rollouts.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayrm.config import BackboneConfig, from_dict
from rayrm.devices import default_device
from rayrm.errors import UserError
from rayrm.train.checkpoint import load_model
from rayrm.train.windows import sequence_positions


def raw_frames_refused(model, config: dict) -> str | None:
    """Why raw frames of one camera cannot be scored by this model (it fuses several cameras
    or the robot state: each step needs every camera's embedding and the state), or None."""
    if len(getattr(model, "view_dims", [0])) == 1 and not getattr(model, "state_dim", 0):
        return None
    layout = config.get("frame_layout") or {}
    cameras = ", ".join(layout.get("cameras") or []) or f"{len(model.view_dims)} cameras"
    state = f" and the state {layout.get('state_key')!r}" if model.state_dim else ""
    return (
        f"this checkpoint's model fuses {cameras}{state} per frame: raw frames of one camera "
        f"are not enough; send frame vectors [{model.visual_dim}] (each camera's embedding, "
        "then the state, concatenated in that order)"
    )


def window_outputs(model, visual: torch.Tensor, language: torch.Tensor | None) -> dict:
    """Every head's output for windows [B, L, D]: progress [B, L], stage [B, L] or None,
    success [B, L] ("done" probability) or None."""
    if hasattr(model, "forward_all"):
        out = model.forward_all(visual, language)
        logit = out.success_logit
        success = None if logit is None else torch.sigmoid(logit)
        return {
            "progress": out.progress,
            "stage": out.stage,
            "subtask": out.subtask,
            "success": success,
        }
    return {"progress": model(visual, language), "stage": None, "subtask": None, "success": None}


def causal_outputs(
    model, windows: torch.Tensor, language: torch.Tensor, count: torch.Tensor, blind: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The reward after frame ``count`` of each row: progress float32 [B], for SARM models the
    stage [B], for models with a success head its "done" probability float32 [B] (else None).
    ``windows`` [B, L, D] are each row's frames at
    ``sequence_positions(count, L)``; the value is read at the window slot of the last frame.
    Shared by :class:`RewardScorer` and the served streams (``rayrm.serve``) so both give
    the same numbers."""
    if blind:  # the blind control sees zeros, as in training
        windows, language = torch.zeros_like(windows), torch.zeros_like(language)
    lang = language if model.language_dim > 0 else None
    out = window_outputs(model, windows, lang)
    read = torch.clamp(count - 1, max=windows.shape[1] - 1).unsqueeze(1)
    progress = out["progress"].gather(1, read).squeeze(1).float()
    stage = None if out["stage"] is None else out["stage"].gather(1, read).squeeze(1)
    success = None if out["success"] is None else out["success"].gather(1, read).squeeze(1)
    return progress, stage, None if success is None else success.float()


class RewardScorer:
    """Causal progress for a batch of environments (see the module docstring)."""

    def __init__(self, model, config: dict, backbone=None, initial_capacity: int = 64):
        self.model = model.eval()
        self.config = config
        self.device = next(model.parameters()).device
        self.seq_len = int(model.cfg.max_seq_len)
        self.num_stages = int(getattr(model.cfg, "num_stages", 0))
        self.blind = bool(config.get("train", {}).get("blind", False))
        self._backbone = backbone
        self._capacity = initial_capacity
        self.num_envs = 0
        self.history = torch.zeros(0, initial_capacity, model.visual_dim, device=self.device)
        self.lengths = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.language = torch.zeros(0, model.language_dim, device=self.device)
        # Each environment's prompt: VLM backbones (language_dim 0) read it with every frame.
        self.prompts: list[str] = []
        self.last_stage: np.ndarray | None = None  # SARM: predicted stage at the last step
        # success head: "done" probability at the last step (None without the head)
        self.last_success: np.ndarray | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str, device: str | torch.device | None = None, backbone=None
    ) -> RewardScorer:
        """Load a checkpoint; the backbone named in it loads on first use (raw frames or
        prompts), or pass one (any ``rayrm.backbones.Backbone``)."""
        device = device or default_device()
        model, config = load_model(path, device)
        return cls(model, config, backbone=backbone)

    # ------------------------------------------------------------------ backbone

    @property
    def backbone(self):
        if self._backbone is None:
            from rayrm.backbones import build_backbone

            if "backbone" not in self.config:
                raise UserError("the checkpoint names no backbone; pass embeddings, or one")
            cfg = from_dict(BackboneConfig, self.config["backbone"])
            self._backbone = build_backbone(cfg, self.device)
        return self._backbone

    def _embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.model.language_dim == 0:
            return torch.zeros(len(prompts), 0, device=self.device)
        vectors = np.asarray(self.backbone.embed_prompts(list(prompts)), dtype=np.float32)
        return torch.from_numpy(vectors).to(self.device)

    # ------------------------------------------------------------------ episodes

    def reset(
        self,
        prompts: str | Sequence[str] | None = None,
        env_ids: Sequence[int] | None = None,
        num_envs: int | None = None,
        language: np.ndarray | None = None,
    ) -> None:
        """Start new episodes, in all environments (``env_ids`` None) or only in ``env_ids``.

        The task comes as ``prompts`` (one string for all, or one per environment) or as
        precomputed ``language`` embeddings [N, D_lang]. Resetting all environments sets their
        number: ``num_envs``, else the number of prompts / language rows."""
        if env_ids is None:
            count = num_envs or (
                len(language)
                if language is not None
                else 1
                if prompts is None or isinstance(prompts, str)
                else len(prompts)
            )
            self._resize(count)
            env_ids = list(range(count))
        ids = torch.as_tensor(list(env_ids), dtype=torch.int64, device=self.device)
        self.lengths[ids] = 0
        self.language[ids] = self._language_rows(prompts, language, len(ids))
        if prompts is not None:
            texts = [prompts] * len(ids) if isinstance(prompts, str) else list(prompts)
            for env, text in zip(ids.tolist(), texts):
                self.prompts[env] = text

    def _resize(self, num_envs: int) -> None:
        self.num_envs = num_envs
        dim = self.history.shape[-1]
        self.history = torch.zeros(num_envs, self._capacity, dim, device=self.device)
        self.lengths = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.language = torch.zeros(num_envs, self.model.language_dim, device=self.device)
        self.prompts = [""] * num_envs

    def _language_rows(self, prompts, language, count: int) -> torch.Tensor:
        if language is not None:
            rows = torch.as_tensor(np.asarray(language, np.float32), device=self.device)
        elif self.model.language_dim == 0:
            rows = torch.zeros(count, 0, device=self.device)
        elif prompts is None:
            raise ValueError("this model reads a task instruction: reset with prompts")
        else:
            prompts = [prompts] * count if isinstance(prompts, str) else list(prompts)
            rows = self._embed_prompts(prompts)
        if rows.shape != (count, self.model.language_dim):
            raise ValueError(
                f"expected {count} language rows of size {self.model.language_dim}, got "
                f"{tuple(rows.shape)}"
            )
        return rows

    # ------------------------------------------------------------------ stepping

    def _embeddings(self, observations, prompts: list[str]) -> torch.Tensor:
        """Raw uint8 frames [N, H, W, 3] through the backbone (with each environment's
        prompt), or embeddings [N, D] as given."""
        obs = observations
        if isinstance(obs, np.ndarray) and obs.ndim == 4:
            refused = raw_frames_refused(self.model, self.config)
            if refused:
                raise UserError(refused)
            obs = self.backbone.embed_frames(obs, prompts[: len(obs)])
        # A copy: Ray hands actors read-only arrays, which torch refuses to wrap.
        obs = obs if torch.is_tensor(obs) else torch.from_numpy(np.array(obs, np.float32))
        if obs.ndim != 2 or obs.shape[1] != self.model.visual_dim:
            raise ValueError(
                f"expected uint8 frames [N, H, W, 3] or embeddings [N, {self.model.visual_dim}], "
                f"got {tuple(obs.shape)}"
            )
        return obs.to(self.device, torch.float32)

    def _grow(self, needed: int) -> None:
        if needed <= self.history.shape[1]:
            return
        capacity = max(needed, 2 * self.history.shape[1])
        grown = torch.zeros(self.num_envs, capacity, self.history.shape[2], device=self.device)
        grown[:, : self.history.shape[1]] = self.history
        self.history = grown

    @torch.no_grad()
    def step(self, observations, env_ids: Sequence[int] | None = None) -> np.ndarray:
        """One frame per environment (all, or those in ``env_ids``, in that order) -> their
        progress after this frame, float32 [N]."""
        ids = torch.arange(self.num_envs, device=self.device)
        if env_ids is not None:
            ids = torch.as_tensor(list(env_ids), dtype=torch.int64, device=self.device)
        visual = self._embeddings(observations, [self.prompts[i] for i in ids.tolist()])
        if len(visual) != len(ids):
            raise ValueError(f"{len(visual)} observations for {len(ids)} environments")
        self._grow(int(self.lengths[ids].max()) + 1)
        self.history[ids, self.lengths[ids]] = visual
        self.lengths[ids] += 1
        count = self.lengths[ids]
        windows = self.history[ids.unsqueeze(1), sequence_positions(count, self.seq_len)]
        progress, stage, success = causal_outputs(
            self.model, windows, self.language[ids], count, blind=self.blind
        )
        if stage is not None:
            self.last_stage = stage.cpu().numpy()
        if success is not None:
            self.last_success = success.cpu().numpy()
        return progress.cpu().numpy()


class RewardScorerActor:
    """A :class:`RewardScorer` that loads inside a Ray actor from a checkpoint path:

    ``scorer = ray.remote(num_gpus=1)(RewardScorerActor).remote(path)``, then
    ``ray.get(scorer.step.remote(frames))``. The model and backbone never load on the driver."""

    def __init__(self, checkpoint: str, device: str | None = None):
        self.scorer = RewardScorer.from_checkpoint(checkpoint, device)

    def reset(self, prompts=None, env_ids=None, num_envs=None, language=None) -> None:
        self.scorer.reset(prompts, env_ids=env_ids, num_envs=num_envs, language=language)

    def step(self, observations, env_ids=None) -> np.ndarray:
        return self.scorer.step(observations, env_ids)

    def last_stage(self) -> np.ndarray | None:
        return self.scorer.last_stage
