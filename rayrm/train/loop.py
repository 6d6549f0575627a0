"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (one copy per DDP rank).

Each worker pulls its share of the training episodes (whole episodes, one Parquet row each)
through ``ray.train.get_dataset_shard("train")`` into a flat frame buffer on its device, and
every held-out episode through ``get_dataset_shard("val")`` (not split). Windows are sampled
for the whole batch at once (``rayrm.train.windows``) and gathered from that buffer, so no
per-sample Python or file work sits between the optimizer steps.

All ranks run the same number of steps (computed by the driver from the global frame count),
report at the same steps, and rank 0 validates and writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn import functional as F

from rayrm import metrics
from rayrm.config import ModelConfig, TrainConfig, to_dict
from rayrm.data.shards import EpisodeBatch, episodes_from_table, select_episodes
from rayrm.runtime import setup_logging
from rayrm.train.checkpoint import load_train_state, save_checkpoint
from rayrm.train.model import RewardTransformer
from rayrm.train.windows import WindowBatch, sample_windows

logger = logging.getLogger(__name__)

VOC_EPISODES = 64  # held-out expert episodes whose prefix curves are scored while training


@dataclass
class DeviceEpisodes:
    """A worker's episodes on its device: flat frames plus per-episode offsets."""

    visual: torch.Tensor  # [sum T, D]
    language: torch.Tensor  # [N, D_lang]
    lengths: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [N + 1]
    host: EpisodeBatch

    @classmethod
    def from_batch(cls, batch: EpisodeBatch, device: torch.device, blind: bool):
        # Arrow hands out read-only buffers; torch wants writable ones (one copy, once).
        visual = torch.from_numpy(np.array(batch.visual)).to(device)
        language = torch.from_numpy(np.array(batch.language)).to(device)
        if blind:  # the blind control sees only zeros
            visual, language = torch.zeros_like(visual), torch.zeros_like(language)
        return cls(
            visual=visual,
            language=language,
            lengths=torch.from_numpy(batch.lengths).to(device),
            offsets=torch.from_numpy(batch.offsets).to(device),
            host=batch,
        )


def load_shard(name: str) -> EpisodeBatch:
    shard = ray.train.get_dataset_shard(name)
    tables = list(shard.iter_batches(batch_format="pyarrow", batch_size=64))
    if not tables:
        raise RuntimeError(f"worker received no '{name}' episodes")
    return episodes_from_table(pa.concat_tables(tables), where=f"'{name}' shard")


def global_input_stats(episodes: DeviceEpisodes) -> list[torch.Tensor]:
    """Per-dimension mean/std over every worker's frames (and episodes, for language)."""
    parts = []
    for x in (episodes.visual.double(), episodes.language.double()):
        parts += [x.sum(0), (x * x).sum(0), torch.tensor([len(x)], dtype=torch.float64)]
    flat = torch.cat(parts).to(episodes.visual.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)
    d_vis, d_lang = episodes.visual.shape[1], episodes.language.shape[1]
    sizes = [d_vis, d_vis, 1, d_lang, d_lang, 1]
    v_sum, v_sq, v_n, l_sum, l_sq, l_n = torch.split(flat, sizes)
    stats = []
    for total, squares, count in ((v_sum, v_sq, v_n), (l_sum, l_sq, l_n)):
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        stats += [mean.float(), std.float()]
    return stats


def window_inputs(episodes: DeviceEpisodes, windows: WindowBatch):
    return episodes.visual[windows.frame_index], episodes.language[windows.episode]


@torch.no_grad()
def validate(
    model: RewardTransformer, val: DeviceEpisodes, windows: WindowBatch, autocast
) -> dict[str, float]:
    """Loss on fixed held-out windows and VOC of plain prefix curves of expert episodes."""
    model.eval()
    with autocast():
        visual, language = window_inputs(val, windows)
        loss = F.mse_loss(model(visual, language).float(), windows.target).item()
        curves = []
        for i in range(min(len(val.host), VOC_EPISODES)):
            frames = val.visual[val.offsets[i] : val.offsets[i + 1]]
            curves.append(model.prefix_curve(frames, val.language[i]).cpu().numpy())
    model.train()
    return {"val_loss": loss, "val_voc": metrics.mean_voc(curves)}


def _optimizer_and_schedule(model, cfg: TrainConfig, total_steps: int):
    # Adam + cosine to lr_min over all steps: the seed's recipe (SEED-SPEC §5).
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(total_steps, 1), eta_min=cfg.lr_min
    )
    return optimizer, schedule


def _resume(model, optimizer, schedule) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        state = load_train_state(path)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    logger.info("resumed from checkpoint at step %d", state["step"])
    return int(state["step"])


def _report(model, optimizer, schedule, step: int, scalars: dict, meta: dict, val_fn) -> None:
    """Every rank reports (it is a barrier); rank 0 adds validation and the checkpoint."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    scalars = {**scalars, **val_fn()}
    logger.info("step %d: %s", step, {k: round(v, 5) for k, v in scalars.items()})
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, {**meta, "step": step, "metrics": scalars}, optimizer, schedule)
        ray.train.report(
            scalars,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step{step:08d}",
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    setup_logging(config.get("log_level", "INFO"))
    cfg: TrainConfig = config["train"]
    model_cfg: ModelConfig = config["model"]
    total_steps, val_every = config["total_steps"], config["val_every"]
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    train = DeviceEpisodes.from_batch(load_shard("train"), device, cfg.blind)
    val_batch = load_shard("val")
    expert = np.array([s is not False for s in val_batch.success])  # targets assume success
    val = DeviceEpisodes.from_batch(select_episodes(val_batch, expert), device, cfg.blind)

    raw_model = RewardTransformer(model_cfg, train.visual.shape[1], train.language.shape[1])
    raw_model.set_input_stats(*global_input_stats(train))
    raw_model.to(device)
    model = ray.train.torch.prepare_model(raw_model, move_to_device=False)
    optimizer, schedule = _optimizer_and_schedule(model, cfg, total_steps)
    start = _resume(raw_model, optimizer, schedule)

    seq_len, per_worker = model_cfg.max_seq_len, max(1, cfg.batch_size // world)
    rewind_prob = cfg.rewind_prob if cfg.rewind else 0.0
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000)
    val_windows = sample_windows(
        val.lengths, val.offsets, cfg.val_windows, seq_len, rewind_prob, val_gen
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 7919 * start)
    meta = {"train": to_dict(cfg), **config["meta"]}
    if start == 0 and rank == 0:  # the untrained model's scores: the baseline to beat
        meta["val_at_start"] = validate(raw_model, val, val_windows, autocast)
    losses, tick = [], time.perf_counter()
    for step in range(start + 1, total_steps + 1):
        windows = sample_windows(
            train.lengths, train.offsets, per_worker, seq_len, rewind_prob, generator
        )
        visual, language = window_inputs(train, windows)
        with autocast():
            loss = F.mse_loss(model(visual, language).float(), windows.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if step % val_every == 0 or step == total_steps:
            seconds = time.perf_counter() - tick
            scalars = {
                "step": step,
                "train_loss": torch.stack(losses).mean().item(),
                "lr": schedule.get_last_lr()[0],
                "windows_per_s": len(losses) * per_worker * world / max(seconds, 1e-9),
            }
            _report(
                raw_model,
                optimizer,
                schedule,
                step,
                scalars,
                meta,
                lambda: validate(raw_model, val, val_windows, autocast),
            )
            losses, tick = [], time.perf_counter()
    if start >= total_steps:
        logger.info("nothing to do: the run already reached step %d", total_steps)


def steps_for(cfg: TrainConfig, train_frames: int) -> tuple[int, int]:
    """(total steps, steps between validations). An epoch = as many windows as frames."""
    steps_per_epoch = max(1, math.ceil(train_frames / cfg.batch_size))
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
    val_every = cfg.val_every if cfg.val_every > 0 else 10 * steps_per_epoch
    return total, max(1, min(val_every, total))
