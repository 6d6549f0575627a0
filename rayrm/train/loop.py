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

import dataclasses
import hashlib
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
from rayrm.train.windows import (
    PrefixBatch,
    RankTable,
    WindowBatch,
    rank_table,
    sample_rank_pairs,
    sample_windows,
)

logger = logging.getLogger(__name__)

VOC_EPISODES = 64  # held-out expert episodes whose prefix curves are scored while training
PLAN_KEY = "plan"  # the WorkerPlan's key in train_loop_config (Ray Train wants a dict there)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a rank needs, built once on the driver (``rayrm.train.trainer``), after
    every check, and handed to each worker inside ``train_loop_config``."""

    train: TrainConfig
    model: ModelConfig
    total_steps: int
    val_every: int  # steps between reports (validation and checkpoint)
    log_level: str
    embeddings: str  # the embedding folder (path or URL)
    manifest: dict[str, Any]  # the embeddings' manifest
    columns: list[str]  # shard columns read for training
    rank_episodes: list[list[str]]  # training episodes of each rank
    val_episodes: list[str]  # held out; rank 0 reads them
    tasks: list[str]  # distinct prompts, the task table's order
    task_language: np.ndarray  # float32 [len(tasks), D_lang]
    run_dir: str
    stage_prior: list[float] | None  # SARM: stage priors of the annotated training episodes
    meta: dict[str, Any]  # stored in every checkpoint's JSON


@dataclass
class DeviceEpisodes:
    """A worker's episodes on its device: flat frames plus per-episode offsets."""

    visual: torch.Tensor  # [sum T, D]
    language: torch.Tensor  # [N, D_lang]
    task: torch.Tensor  # int64 [N], index of the episode's prompt in the task table
    lengths: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [N + 1]
    success: torch.Tensor  # bool [N]: not a failure (progress targets hold)
    host: EpisodeBatch
    stage: torch.Tensor | None = None  # int64 [sum T] (SARM)
    subtask: torch.Tensor | None = None  # float32 [sum T] (SARM)
    ranks: RankTable | None = None  # (success, failure) pairs of a task; None without any

    @classmethod
    def from_batch(cls, batch: EpisodeBatch, device, blind: bool, tasks: list[str]):
        # Arrow hands out read-only buffers; torch wants writable ones (one copy, once).
        visual = torch.from_numpy(np.array(batch.visual)).to(device)
        language = torch.from_numpy(np.array(batch.language)).to(device)
        if blind:  # the blind control sees only zeros
            visual, language = torch.zeros_like(visual), torch.zeros_like(language)
        task_index = {prompt: i for i, prompt in enumerate(tasks)}
        task = torch.tensor([task_index[p] for p in batch.prompts], device=device)
        success = torch.tensor([s is not False for s in batch.success], device=device)
        return cls(
            visual=visual,
            language=language,
            task=task,
            lengths=torch.from_numpy(batch.lengths).to(device),
            offsets=torch.from_numpy(batch.offsets).to(device),
            success=success,
            ranks=rank_table(task, success),
            host=batch,
            stage=None if batch.stage is None else torch.from_numpy(batch.stage).to(device),
            subtask=None if batch.subtask is None else torch.from_numpy(batch.subtask).to(device),
        )


def load_episodes(plan: WorkerPlan, ids: list[str], what: str) -> tuple[EpisodeBatch, int]:
    """The episodes ``ids``, read straight from the embedding folder: only their chunks'
    row groups are fetched, so the ranks together read the training set once. Returns them
    sorted by id, and the Parquet bytes read.

    Ray Data's ``get_dataset_shard`` would stream every episode to every rank (its split is by
    blocks, not by the deterministic, frame-balanced assignment training needs), so each rank
    reads its own episodes with the shards' reader instead."""
    if not ids:
        raise RuntimeError(f"worker was assigned no '{what}' episodes")
    reader = EpisodeReader(plan.embeddings, plan.manifest)
    where = f"{plan.embeddings} ({what})"
    batch = episodes_from_table(reader.read(ids, plan.columns), where=where)
    layout = FrameLayout.from_manifest(plan.manifest)
    if batch.visual.shape[1] != layout.dim:
        raise ShardError(
            f"{where}: frame vectors of size {batch.visual.shape[1]}, the manifest says "
            f"{layout.dim} (visual_dim={plan.manifest['visual_dim']}, frame layout "
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


def parameter_hash(model: torch.nn.Module) -> int:
    """The first 48 bits of a SHA-256 of the model's weights and buffers: equal on every rank
    while DDP keeps the replicas in step, and exact as a float64, so ranks can gather it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return int(digest.hexdigest()[:12], 16)


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
    progress: torch.Tensor  # [B, L] ReWiND targets
    known: torch.Tensor  # bool [B]: the progress/stage targets hold (not a failure's window)
    done: torch.Tensor  # float32 [B, L] success-head labels: 1 = the task is done here
    stage: torch.Tensor | None = None  # [B, L] SARM stage targets
    subtask: torch.Tensor | None = None  # [B, L] SARM subtask-progress targets


def done_labels(
    episodes: DeviceEpisodes, episode: torch.Tensor, local_frame: torch.Tensor, success_from: float
) -> torch.Tensor:
    """Success-head labels [B, L]: 1 on a successful episode's frames from ``success_from`` of
    it on, 0 on every other frame (all of a failure's)."""
    length = episodes.lengths[episode].unsqueeze(1).to(torch.float32)
    late = (local_frame + 1).to(torch.float32) / length >= success_from
    return (late & episodes.success[episode].unsqueeze(1)).to(torch.float32)


def window_inputs(
    episodes: DeviceEpisodes,
    windows: WindowBatch,
    task_language: torch.Tensor | None = None,
    mismatch_prob: float = 0.0,
    generator: torch.Generator | None = None,
    success_from: float = 0.9,
) -> Inputs:
    """Gather a batch of windows from the episode buffer.

    Labels: progress (and SARM stage) targets hold for successful episodes only (``known``);
    the success head's label is :func:`done_labels`.

    With ``mismatch_prob`` > 0, that share of windows gets another task's instruction (drawn
    from ``task_language``, never its own) and a target of 0: progress toward a task that is
    not being done (ReWiND's mismatched-instruction negatives; in SARM mode stage 0, subtask 0;
    the success label 0), known for failures' windows too.
    """
    known = episodes.success[windows.episode]
    inputs = Inputs(
        visual=episodes.visual[windows.frame_index],
        language=episodes.language[windows.episode],
        progress=windows.target,
        known=known,
        done=done_labels(episodes, windows.episode, windows.local_frame, success_from),
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
        for name in ("progress", "stage", "subtask", "done"):
            value = getattr(inputs, name)
            if value is not None:
                setattr(inputs, name, torch.where(swap[:, None], torch.zeros_like(value), value))
        inputs.known = known | swap
    return inputs


@dataclass
class RankInputs:
    """(success, failure) prefix pairs of one task at one relative time tau, and the success
    head's labels of their frames (success rows, then failure rows)."""

    success: PrefixBatch
    failure: PrefixBatch
    tau: torch.Tensor  # float32 [P]
    done: torch.Tensor  # float32 [2P, L]

    def visual(self, episodes: DeviceEpisodes) -> torch.Tensor:
        frames = torch.cat([self.success.frame_index, self.failure.frame_index])
        return episodes.visual[frames]

    def language(self, episodes: DeviceEpisodes) -> torch.Tensor:
        return episodes.language[torch.cat([self.success.episode, self.failure.episode])]


@dataclass
class LossWeights:
    """Weights of the failure-aware terms (``train.success_weight``, ``train.rank_weight``)."""

    success: float = 0.0
    rank: float = 0.0
    rank_scale: float = 10.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> LossWeights:
        return cls(cfg.success_weight, cfg.rank_weight, cfg.rank_scale)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries where ``mask`` holds; 0 (still in the graph) when none does."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def progress_terms(out: ModelOutput, inputs: Inputs) -> dict[str, torch.Tensor]:
    """ReWiND: MSE on progress. SARM: MSE on subtask progress + cross-entropy on the stage
    logits. Only where targets hold (``known``, and for SARM an annotated frame)."""
    rows = inputs.known.unsqueeze(1).expand_as(inputs.progress)
    if inputs.stage is None:
        error = (out.progress.float() - inputs.progress) ** 2
        return {"progress": masked_mean(error, rows)}
    labelled = rows & (inputs.stage >= 0)
    subtask_target = torch.where(labelled, inputs.subtask, torch.zeros_like(inputs.subtask))
    error = (out.subtask.float() - subtask_target) ** 2
    stage_target = torch.where(labelled, inputs.stage, torch.full_like(inputs.stage, -100))
    logits = out.stage_logits.float().flatten(0, 1)
    stage = F.cross_entropy(logits, stage_target.flatten(), ignore_index=-100, reduction="sum")
    return {
        "progress": masked_mean(error, labelled),
        "stage": stage / labelled.sum().clamp_min(1),
    }


def rank_loss(progress: torch.Tensor, pairs: RankInputs, scale: float) -> torch.Tensor:
    """Bradley-Terry preference of the success's prefix over the failure's (Robometer's
    trajectory comparison), read where the plain prefix curve reads: -log sigmoid(scale *
    (p_s - p_f)), weighted by tau so late prefixes, where the outcome shows, count most.
    ``progress`` [2P, L]: the success rows, then the failure rows."""
    n = len(pairs.tau)
    p_success = progress[:n].gather(1, pairs.success.read.unsqueeze(1)).squeeze(1)
    p_failure = progress[n:].gather(1, pairs.failure.read.unsqueeze(1)).squeeze(1)
    losses = F.softplus(-scale * (p_success.float() - p_failure.float()))
    return (pairs.tau * losses).sum() / pairs.tau.sum()


def window_loss(
    model,
    inputs: Inputs,
    gt_stage_prob: float,
    generator: torch.Generator | None = None,
    weights: LossWeights | None = None,
    pairs: RankInputs | None = None,
    episodes: DeviceEpisodes | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], ModelOutput]:
    """The training loss, its terms, and the windows' outputs. One forward pass holds the
    windows and, when given, the rank ``pairs``' prefixes (gathered from ``episodes``):

    * progress terms (:func:`progress_terms`; the subtask head sees the true stage in
      ``gt_stage_prob`` of the windows);
    * ``success``: binary cross-entropy of the success head against ``inputs.done``;
    * ``rank``: :func:`rank_loss` on the pairs.
    """
    weights = weights or LossWeights()
    batch = len(inputs.visual)
    visual, language = inputs.visual, inputs.language
    if pairs is not None:
        visual = torch.cat([visual, pairs.visual(episodes)])
        language = torch.cat([language, pairs.language(episodes)])
    stage = use_true = None
    if inputs.stage is not None:
        use_true = torch.rand(batch, generator=generator, device=visual.device) < gt_stage_prob
        stage = inputs.stage.clamp_min(0)  # unlabelled frames: masked out of the loss
        if pairs is not None:  # prefixes see their predicted stage, as at inference
            extra = len(visual) - batch
            stage = torch.cat([stage, stage.new_zeros(extra, stage.shape[1])])
            use_true = torch.cat([use_true, use_true.new_zeros(extra)])
    out = model(visual, language, stage, use_true, return_all=True)
    windows = _rows(out, slice(0, batch))
    terms = progress_terms(windows, inputs)
    total = sum(terms.values())
    if out.success_logit is not None:  # always in the graph, so DDP sees every parameter
        logits, done = windows.success_logit, inputs.done
        if pairs is not None:  # the prefixes' frames too: the failures' frames come in here
            logits, done = out.success_logit, torch.cat([inputs.done, pairs.done])
        terms["success"] = F.binary_cross_entropy_with_logits(logits.float(), done)
        total = total + weights.success * terms["success"]
    if pairs is not None:
        terms["rank"] = rank_loss(out.progress[batch:], pairs, weights.rank_scale)
        total = total + weights.rank * terms["rank"]
    return total, terms, windows


def _rows(out: ModelOutput, rows: slice) -> ModelOutput:
    values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return ModelOutput(**{k: None if v is None else v[rows] for k, v in values.items()})


@torch.no_grad()
def validate(
    model: RewardTransformer,
    val: DeviceEpisodes,
    windows: WindowBatch,
    autocast,
    success_from: float = 0.9,
) -> dict[str, float]:
    """Progress loss on fixed held-out expert windows (stages as predicted, like inference),
    the success head's loss on them, stage accuracy for SARM models, and VOC of the plain
    prefix curves of expert episodes."""
    model.eval()
    with autocast():
        inputs = window_inputs(val, windows, success_from=success_from)
        _, terms, out = window_loss(model, inputs, gt_stage_prob=0.0)
        scores = {"val_loss": sum(v.item() for k, v in terms.items() if k != "success")}
        if "success" in terms:
            scores["val_success_loss"] = terms["success"].item()
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


# Ray Train's record of the checkpoints it has registered, in the run folder.
_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"


def _crash_drill(cfg: TrainConfig, step: int, rank: int, run_dir: str, val_every: int) -> None:
    """``train.crash_at_step``: rank 0 dies once at that step, to prove the restart works.

    It first waits (up to 30 s) until Ray Train has registered the last checkpoint: Ray picks
    up a report some time after the worker made it, and a crash a few steps later would
    otherwise restart from the one before, or from scratch, instead of testing the resume."""
    marker = storage.join(run_dir, f".crashed_at_step_{step}")
    if cfg.crash_at_step != step or rank != 0 or storage.exists(marker):
        return
    last = (step - 1) - (step - 1) % val_every
    record = storage.join(run_dir, _CHECKPOINT_RECORD)
    deadline = time.monotonic() + 30.0
    while last > 0 and time.monotonic() < deadline:
        if storage.exists(record) and f"checkpoint_step{last:08d}" in storage.read_text(record):
            break
        time.sleep(0.1)
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
        return validate(
            self.raw_model, self.val, self.val_windows, self.autocast, self.cfg.success_from
        )


def build_worker(plan: WorkerPlan) -> Worker:
    cfg, model_cfg = plan.train, plan.model
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    tasks = plan.tasks
    train_batch, bytes_read = load_episodes(plan, plan.rank_episodes[rank], "train")
    train = DeviceEpisodes.from_batch(train_batch, device, cfg.blind, tasks)
    input_bytes = gather_per_rank(bytes_read, world, rank, device)
    logger.info(
        "rank %d: %d training episodes, %d frames, %.1f MB read",
        rank,
        len(train_batch),
        int(train_batch.offsets[-1]),
        bytes_read / 1e6,
    )
    task_language = torch.from_numpy(np.array(plan.task_language)).to(device)
    if cfg.blind:
        task_language = torch.zeros_like(task_language)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    layout = FrameLayout.from_manifest(plan.manifest)  # the cameras and state per frame
    raw_model = RewardTransformer(
        model_cfg,
        train.visual.shape[1],
        train.language.shape[1],
        view_dims=list(layout.view_dims),
        state_dim=layout.state_dim,
    )
    raw_model.set_input_stats(*global_input_stats(train))
    if model_cfg.num_stages > 0:
        raw_model.set_stage_priors(torch.tensor(plan.stage_prior))
    raw_model.to(device)
    model = ray.train.torch.prepare_model(raw_model, move_to_device=False)
    if cfg.compile:  # the DDP wrapper is compiled, so DDP's bucketing sees the graph
        model = torch.compile(model)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs between ranks
    optimizer, schedule = optimizer_and_schedule(model, cfg, plan.total_steps)
    val = val_windows = None
    if rank == 0:
        val_batch, _ = load_episodes(plan, plan.val_episodes, "val")
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


def pairs_per_step(cfg: TrainConfig, train: DeviceEpisodes, world: int) -> int:
    """This rank's (success, failure) pairs per step: ``train.rank_pairs`` split over the
    ranks, or (null) this rank's batch times the share of its frames that pairable failures
    hold, at least 1: failures weigh as much as they would as windows of the batch."""
    if train.ranks is None or cfg.rank_weight + cfg.success_weight == 0:
        return 0
    if cfg.rank_pairs is not None:
        return max(1, cfg.rank_pairs // world) if cfg.rank_pairs else 0
    share = float(train.lengths[train.ranks.failures].sum() / train.lengths.sum())
    return max(1, round(max(1, cfg.batch_size // world) * share))


def rank_inputs(worker: Worker, generator: torch.Generator, seq_len: int) -> RankInputs | None:
    """This step's (success, failure) prefix pairs (:func:`pairs_per_step`), or None."""
    cfg, train = worker.cfg, worker.train
    num_pairs = pairs_per_step(cfg, train, worker.world)
    if num_pairs == 0:
        return None
    success, failure, tau = sample_rank_pairs(
        train.ranks, train.lengths, train.offsets, num_pairs, seq_len, cfg.rank_min_tau, generator
    )
    done = torch.cat(
        [done_labels(train, p.episode, p.local_frame, cfg.success_from) for p in (success, failure)]
    )
    return RankInputs(success, failure, tau, done)


def train_step(worker: Worker, generator: torch.Generator, seq_len: int) -> dict[str, torch.Tensor]:
    """One optimizer step; returns the loss and each of its terms (detached).

    With (success, failure) pairs, the failures come in through them, and the windows, which
    carry the progress targets, are drawn from the successes alone: failed episodes add
    objectives without thinning out the progress supervision of a step."""
    cfg = worker.cfg
    pairs = rank_inputs(worker, generator, seq_len)
    windows = sample_windows(
        worker.train.lengths,
        worker.train.offsets,
        max(1, cfg.batch_size // worker.world),
        seq_len,
        cfg.rewind_prob if cfg.rewind else 0.0,
        generator,
        eligible=None if pairs is None else worker.train.success,
    )
    inputs = window_inputs(
        worker.train, windows, worker.task_language, cfg.mismatch_prob, generator, cfg.success_from
    )
    with worker.autocast():
        loss, terms, _ = window_loss(
            worker.model,
            inputs,
            cfg.gt_stage_prob,
            generator,
            LossWeights.of(cfg),
            pairs,
            worker.train,
        )
    worker.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(worker.model.parameters(), cfg.grad_clip)
    worker.optimizer.step()
    worker.schedule.step()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def mean_losses(steps: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each loss term over the steps: ``train_loss``, ``train_<term>_loss``."""
    names = {"loss": "train_loss"}
    return {
        names.get(k, f"train_{k}_loss"): torch.stack([s[k] for s in steps]).mean().item()
        for k in steps[0]
    }


def worker_frames(worker: Worker) -> list[int]:
    """The training frames each rank holds (every rank calls this: a barrier)."""
    frames = int(worker.train.host.offsets[-1])
    return [int(n) for n in gather_per_rank(frames, worker.world, worker.rank, worker.device)]


def final_hashes(worker: Worker, step: int) -> list[int]:
    """Every rank's :func:`parameter_hash` (a barrier); they differ if DDP lost step."""
    own = parameter_hash(worker.raw_model)
    hashes = gather_per_rank(own, worker.world, worker.rank, worker.device)
    hashes = [int(h) for h in hashes]
    if worker.rank == 0:
        logger.info("step %d: parameter hash per rank %s", step, [f"{h:012x}" for h in hashes])
    return hashes


def train_loop_per_worker(config: dict[str, WorkerPlan]) -> None:
    plan = config[PLAN_KEY]
    setup_logging(plan.log_level)
    cfg = plan.train
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    worker = build_worker(plan)
    start = _resume(worker.raw_model, worker.optimizer, worker.schedule)
    total_steps, val_every = plan.total_steps, plan.val_every
    seq_len = plan.model.max_seq_len
    meta = {
        "train": to_dict(cfg),
        **plan.meta,
        "input_bytes_per_rank": worker.input_bytes,
        "train_frames_per_rank": worker_frames(worker),
        "resumed_from_step": start,
    }
    if start == 0 and worker.rank == 0:  # the untrained model's scores: the baseline to beat
        meta["val_at_start"] = worker.validate()
    trackers = Trackers(cfg.loggers if worker.rank == 0 else [], plan.run_dir, meta)
    generator = torch.Generator(device=worker.device)
    generator.manual_seed(cfg.seed * 1000 + worker.rank + 7919 * start)
    losses, tick = [], time.perf_counter()
    for step in range(start + 1, total_steps + 1):
        _crash_drill(cfg, step, worker.rank, plan.run_dir, val_every)
        losses.append(train_step(worker, generator, seq_len))
        if step % val_every == 0 or step == total_steps:
            seconds = time.perf_counter() - tick
            scalars = {
                "step": step,
                **mean_losses(losses),
                "lr": worker.schedule.get_last_lr()[0],
                "windows_per_s": len(losses) * cfg.batch_size / max(seconds, 1e-9),
            }
            if step == total_steps:
                meta = {**meta, "param_hash_per_rank": final_hashes(worker, step)}
            _report(worker, step, scalars, meta, trackers)
            losses, tick = [], time.perf_counter()
    trackers.close()
    if start >= total_steps:
        logger.info("nothing to do: the run already reached step %d", total_steps)
