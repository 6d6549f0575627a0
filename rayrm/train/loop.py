"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (one copy per DDP rank).

Data: the driver assigns whole episodes to ranks (balanced by frames, deterministic); each
worker reads only its own episodes' chunks from the embedding folder (local path or URL, see
:func:`load_episodes`), so N ranks read one copy of the training set between them, and packs
them into one flat frame buffer on its device. Rank 0 also reads the held-out episodes.
Windows are sampled for the whole batch at once (``rayrm.train.windows``) as index tensors
and gathered from the buffer, so no per-sample Python or file work sits between optimizer
steps, and the same seed and worker count give the same weights.

All ranks run the same number of steps (computed by the driver from the global frame count)
and report at the same steps; rank 0 validates, logs and writes the checkpoint. After a worker
failure Ray Train restarts the workers and ``ray.train.get_checkpoint()`` resumes the run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn import functional as F

from rayrm import metrics
from rayrm.config import ModelConfig, TrainConfig, to_dict
from rayrm.data import storage
from rayrm.data.schema import FrameLayout
from rayrm.data.shards import (
    EpisodeBatch,
    EpisodeReader,
    ShardError,
    episodes_from_table,
    select_episodes,
)
from rayrm.runtime import setup_logging
from rayrm.train.checkpoint import WEIGHTS, load_train_state, save_checkpoint
from rayrm.train.model import ModelOutput, RewardTransformer
from rayrm.train.tracking import Trackers
from rayrm.train.windows import WindowBatch, sample_windows

logger = logging.getLogger(__name__)

VOC_EPISODES = 64  # held-out expert episodes whose prefix curves are scored while training


@dataclass
class DeviceEpisodes:
    """A worker's episodes on its device: flat frames plus per-episode offsets."""

    visual: torch.Tensor  # [sum T, D]
    language: torch.Tensor  # [N, D_lang]
    task: torch.Tensor  # int64 [N], index of the episode's prompt in the task table
    lengths: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [N + 1]
    host: EpisodeBatch
    stage: torch.Tensor | None = None  # int64 [sum T] (SARM)
    subtask: torch.Tensor | None = None  # float32 [sum T] (SARM)

    @classmethod
    def from_batch(cls, batch: EpisodeBatch, device, blind: bool, tasks: list[str]):
        # Arrow hands out read-only buffers; torch wants writable ones (one copy, once).
        visual = torch.from_numpy(np.array(batch.visual)).to(device)
        language = torch.from_numpy(np.array(batch.language)).to(device)
        if blind:  # the blind control sees only zeros
            visual, language = torch.zeros_like(visual), torch.zeros_like(language)
        task_index = {prompt: i for i, prompt in enumerate(tasks)}
        return cls(
            visual=visual,
            language=language,
            task=torch.tensor([task_index[p] for p in batch.prompts], device=device),
            lengths=torch.from_numpy(batch.lengths).to(device),
            offsets=torch.from_numpy(batch.offsets).to(device),
            host=batch,
            stage=None if batch.stage is None else torch.from_numpy(batch.stage).to(device),
            subtask=None if batch.subtask is None else torch.from_numpy(batch.subtask).to(device),
        )


def load_episodes(config: dict[str, Any], ids: list[str], what: str) -> tuple[EpisodeBatch, int]:
    """The episodes ``ids``, read straight from the embedding folder: only their chunks'
    row groups are fetched, so the ranks together read the training set once. Returns them
    sorted by id, and the Parquet bytes read.

    Ray Data's ``get_dataset_shard`` would stream every episode to every rank (its split is by
    blocks, not by the deterministic, frame-balanced assignment training needs), so each rank
    reads its own episodes with the shards' reader instead."""
    if not ids:
        raise RuntimeError(f"worker was assigned no '{what}' episodes")
    reader = EpisodeReader(config["embeddings"], config["manifest"])
    where = f"{config['embeddings']} ({what})"
    batch = episodes_from_table(reader.read(ids, config["columns"]), where=where)
    layout = FrameLayout.from_manifest(config["manifest"])
    if batch.visual.shape[1] != layout.dim:
        raise ShardError(
            f"{where}: frame vectors of size {batch.visual.shape[1]}, the manifest says "
            f"{layout.dim} (visual_dim={config['manifest']['visual_dim']}, frame layout "
            f"{layout.to_dict()})"
        )
    return batch, reader.bytes_read


def gather_per_rank(value: float, world: int, rank: int, device) -> list[float]:
    """``value`` of every rank, on every rank (a barrier)."""
    slots = torch.zeros(world, dtype=torch.float64, device=device)
    slots[rank] = value
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(slots)
    return slots.tolist()


def global_input_stats(episodes: DeviceEpisodes) -> list[torch.Tensor]:
    """Per-dimension mean/std over every worker's frames (and episodes, for language)."""
    parts = []
    for x in (episodes.visual.double(), episodes.language.double()):
        parts += [x.sum(0), (x * x).sum(0), torch.tensor([len(x)], dtype=torch.float64)]
    flat = torch.cat([p.to(episodes.visual.device) for p in parts])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)
    d_vis, d_lang = episodes.visual.shape[1], episodes.language.shape[1]
    v_sum, v_sq, v_n, l_sum, l_sq, l_n = torch.split(flat, [d_vis, d_vis, 1, d_lang, d_lang, 1])
    stats = []
    for total, squares, count in ((v_sum, v_sq, v_n), (l_sum, l_sq, l_n)):
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        stats += [mean.float(), std.float()]
    return stats


@dataclass
class Inputs:
    """One batch of windows, gathered on the device."""

    visual: torch.Tensor  # [B, L, D]
    language: torch.Tensor  # [B, D_lang]
    progress: torch.Tensor  # [B, L] ReWIND targets
    stage: torch.Tensor | None = None  # [B, L] SARM stage targets
    subtask: torch.Tensor | None = None  # [B, L] SARM subtask-progress targets


def window_inputs(
    episodes: DeviceEpisodes,
    windows: WindowBatch,
    task_language: torch.Tensor | None = None,
    mismatch_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> Inputs:
    """Gather a batch of windows from the episode buffer.

    With ``mismatch_prob`` > 0, that share of windows gets another task's instruction (drawn
    from ``task_language``, never its own) and a target of 0: progress toward a task that is
    not being done (ReWiND's mismatched-instruction negatives; in SARM mode stage 0, subtask 0).
    """
    inputs = Inputs(
        visual=episodes.visual[windows.frame_index],
        language=episodes.language[windows.episode],
        progress=windows.target,
    )
    if episodes.stage is not None:
        inputs.stage = episodes.stage[windows.frame_index]
        inputs.subtask = episodes.subtask[windows.frame_index]
    if mismatch_prob > 0:
        own = episodes.task[windows.episode]
        n_tasks, batch = len(task_language), len(own)
        swap = torch.rand(batch, generator=generator, device=own.device) < mismatch_prob
        other = torch.randint(n_tasks - 1, (batch,), generator=generator, device=own.device)
        other = other + (other >= own).long()  # any task but its own
        inputs.language = torch.where(swap[:, None], task_language[other], inputs.language)
        for name in ("progress", "stage", "subtask"):
            value = getattr(inputs, name)
            if value is not None:
                setattr(inputs, name, torch.where(swap[:, None], torch.zeros_like(value), value))
    return inputs


def window_loss(
    model, inputs: Inputs, gt_stage_prob: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ModelOutput]:
    """ReWIND: MSE on progress. SARM: MSE on subtask progress + cross-entropy on stage logits
    (the subtask head sees the true stage in ``gt_stage_prob`` of the windows)."""
    if inputs.stage is None:
        out = model(inputs.visual, inputs.language, return_all=True)
        return F.mse_loss(out.progress.float(), inputs.progress), out
    batch = len(inputs.stage)
    use_true = torch.rand(batch, generator=generator, device=inputs.stage.device) < gt_stage_prob
    out = model(inputs.visual, inputs.language, inputs.stage, use_true, return_all=True)
    subtask = F.mse_loss(out.subtask.float(), inputs.subtask)
    stage = F.cross_entropy(out.stage_logits.float().flatten(0, 1), inputs.stage.flatten())
    return subtask + stage, out


@torch.no_grad()
def validate(
    model: RewardTransformer, val: DeviceEpisodes, windows: WindowBatch, autocast
) -> dict[str, float]:
    """Loss on fixed held-out windows (stages as predicted, like inference), stage accuracy for
    SARM models, and VOC of the plain prefix curves of expert episodes."""
    model.eval()
    with autocast():
        inputs = window_inputs(val, windows)
        loss, out = window_loss(model, inputs, gt_stage_prob=0.0)
        scores = {"val_loss": loss.item()}
        if out.stage_logits is not None:
            correct = out.stage_logits.argmax(-1) == inputs.stage
            scores["val_stage_accuracy"] = correct.float().mean().item()
        curves = []
        for i in range(min(len(val.host), VOC_EPISODES)):
            frames = val.visual[val.offsets[i] : val.offsets[i + 1]]
            curves.append(model.prefix_curve(frames, val.language[i]).cpu().numpy())
    model.train()
    return {**scores, "val_voc": metrics.mean_voc(curves)}


def optimizer_and_schedule(model, cfg: TrainConfig, total_steps: int):
    """AdamW; linear warmup from lr/100, then cosine decay to ``lr_min``.

    On a GPU the fused AdamW kernel updates every parameter in one launch (the same update
    as the default: ``fused`` only changes the implementation)."""
    on_gpu = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=on_gpu or None
    )
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(total_steps - warmup, 1), eta_min=cfg.lr_min
    )
    if warmup == 0:
        return optimizer, cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], [warmup])
    return optimizer, schedule


def _resume(model, optimizer, schedule) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        model.load_state_dict(load_file(os.path.join(path, WEIGHTS)))
        state = load_train_state(path)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    logger.info("resumed from checkpoint at step %d", state["step"])
    return int(state["step"])


def _crash_drill(cfg: TrainConfig, step: int, rank: int, marker_dir: str) -> None:
    """``train.crash_at_step``: rank 0 dies once at that step, to prove the restart works."""
    marker = storage.join(marker_dir, f".crashed_at_step_{step}")
    if cfg.crash_at_step == step and rank == 0 and not storage.exists(marker):
        storage.write_bytes(marker, b"")
        logger.warning("crash drill: rank 0 exits at step %d", step)
        os._exit(1)


@dataclass
class Worker:
    """What one rank holds while training."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the DDP-wrapped model
    raw_model: RewardTransformer
    optimizer: torch.optim.Optimizer
    schedule: Any
    train: DeviceEpisodes
    task_language: torch.Tensor
    val: DeviceEpisodes | None
    val_windows: WindowBatch | None
    input_bytes: list[int]  # Parquet bytes of training chunks each rank read

    def autocast(self):
        bf16 = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def validate(self) -> dict[str, float]:
        return validate(self.raw_model, self.val, self.val_windows, self.autocast)


def build_worker(config: dict[str, Any]) -> Worker:
    cfg: TrainConfig = config["train"]
    model_cfg: ModelConfig = config["model"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    tasks = config["tasks"]
    train_batch, bytes_read = load_episodes(config, config["rank_episodes"][rank], "train")
    train = DeviceEpisodes.from_batch(train_batch, device, cfg.blind, tasks)
    input_bytes = gather_per_rank(bytes_read, world, rank, device)
    logger.info(
        "rank %d: %d training episodes, %d frames, %.1f MB read",
        rank,
        len(train_batch),
        int(train_batch.offsets[-1]),
        bytes_read / 1e6,
    )
    task_language = torch.from_numpy(np.array(config["task_language"])).to(device)
    if cfg.blind:
        task_language = torch.zeros_like(task_language)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    layout = FrameLayout.from_manifest(config["manifest"])  # the cameras and state per frame
    raw_model = RewardTransformer(
        model_cfg,
        train.visual.shape[1],
        train.language.shape[1],
        view_dims=list(layout.view_dims),
        state_dim=layout.state_dim,
    )
    raw_model.set_input_stats(*global_input_stats(train))
    if model_cfg.num_stages > 0:
        raw_model.set_stage_priors(torch.tensor(config["stage_prior"]))
    raw_model.to(device)
    model = ray.train.torch.prepare_model(raw_model, move_to_device=False)
    if cfg.compile:  # the DDP wrapper is compiled, so DDP's bucketing sees the graph
        model = torch.compile(model)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs between ranks
    optimizer, schedule = optimizer_and_schedule(model, cfg, config["total_steps"])
    val = val_windows = None
    if rank == 0:
        val_batch, _ = load_episodes(config, config["val_episodes"], "val")
        expert = np.array([s is not False for s in val_batch.success])  # targets assume success
        if model_cfg.num_stages > 0:  # stage targets exist only for annotated episodes
            first = val_batch.offsets[:-1]
            expert &= val_batch.stage[first] >= 0
        val = DeviceEpisodes.from_batch(
            select_episodes(val_batch, expert), device, cfg.blind, tasks
        )
        val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000)
        rewind_prob = cfg.rewind_prob if cfg.rewind else 0.0
        val_windows = sample_windows(
            val.lengths, val.offsets, cfg.val_windows, model_cfg.max_seq_len, rewind_prob, val_gen
        )
    return Worker(
        cfg,
        rank,
        world,
        device,
        model,
        raw_model,
        optimizer,
        schedule,
        train,
        task_language,
        val,
        val_windows,
        [int(b) for b in input_bytes],
    )


def _report(worker: Worker, step: int, scalars: dict, meta: dict, trackers: Trackers) -> None:
    """Every rank reports (it is a barrier); rank 0 adds validation and the checkpoint."""
    if worker.rank != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    scalars = {**scalars, **worker.validate()}
    logger.info("step %d: %s", step, {k: round(v, 5) for k, v in scalars.items()})
    trackers.log(scalars, step)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            tmp,
            worker.raw_model,
            {**meta, "step": step, "metrics": scalars},
            worker.optimizer,
            worker.schedule,
        )
        ray.train.report(
            scalars,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step{step:08d}",
        )


def train_step(worker: Worker, generator: torch.Generator, seq_len: int) -> torch.Tensor:
    cfg = worker.cfg
    windows = sample_windows(
        worker.train.lengths,
        worker.train.offsets,
        max(1, cfg.batch_size // worker.world),
        seq_len,
        cfg.rewind_prob if cfg.rewind else 0.0,
        generator,
    )
    inputs = window_inputs(
        worker.train, windows, worker.task_language, cfg.mismatch_prob, generator
    )
    with worker.autocast():
        loss, _ = window_loss(worker.model, inputs, cfg.gt_stage_prob, generator)
    worker.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(worker.model.parameters(), cfg.grad_clip)
    worker.optimizer.step()
    worker.schedule.step()
    return loss.detach()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    setup_logging(config.get("log_level", "INFO"))
    cfg: TrainConfig = config["train"]
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    worker = build_worker(config)
    start = _resume(worker.raw_model, worker.optimizer, worker.schedule)
    total_steps, val_every = config["total_steps"], config["val_every"]
    seq_len = config["model"].max_seq_len
    meta = {"train": to_dict(cfg), **config["meta"], "input_bytes_per_rank": worker.input_bytes}
    if start == 0 and worker.rank == 0:  # the untrained model's scores: the baseline to beat
        meta["val_at_start"] = worker.validate()
    trackers = Trackers(cfg.loggers if worker.rank == 0 else [], config["run_dir"], meta)
    generator = torch.Generator(device=worker.device)
    generator.manual_seed(cfg.seed * 1000 + worker.rank + 7919 * start)
    losses, tick = [], time.perf_counter()
    for step in range(start + 1, total_steps + 1):
        _crash_drill(cfg, step, worker.rank, config["run_dir"])
        losses.append(train_step(worker, generator, seq_len))
        if step % val_every == 0 or step == total_steps:
            seconds = time.perf_counter() - tick
            scalars = {
                "step": step,
                "train_loss": torch.stack(losses).mean().item(),
                "lr": worker.schedule.get_last_lr()[0],
                "windows_per_s": len(losses) * cfg.batch_size / max(seconds, 1e-9),
            }
            _report(worker, step, scalars, meta, trackers)
            losses, tick = [], time.perf_counter()
    trackers.close()
    if start >= total_steps:
        logger.info("nothing to do: the run already reached step %d", total_steps)
