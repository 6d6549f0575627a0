"""Ray Train: DDP on two workers, determinism, checkpoints, crash/resume, bad input."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.autoscaler.sdk
import torch
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get
from safetensors.torch import load_file

import rayrm.train.trainer
from rayrm.config import ModelConfig, TrainConfig
from rayrm.data import schema
from rayrm.data.shards import EpisodeBatch, EpisodeReader, ShardError
from rayrm.evaluate.run import run_evaluate
from rayrm.train.checkpoint import load_model
from rayrm.train.loop import (
    DeviceEpisodes,
    global_input_stats,
    optimizer_and_schedule,
    parameter_hash,
    window_inputs,
)
from rayrm.train.model import RewardTransformer
from rayrm.train.trainer import assign_episodes, make_split, run_train
from rayrm.train.windows import sample_windows


def with_train(cfg, out, **changes):
    train = dataclasses.replace(cfg.train, output=str(out / "train"), **changes)
    evaluate = dataclasses.replace(cfg.evaluate, output=str(out / "eval"))
    return dataclasses.replace(cfg, train=train, evaluate=evaluate)


def checkpoint_metrics(run_dir: str) -> list[dict]:
    configs = sorted(glob.glob(os.path.join(run_dir, "checkpoint_step*", "config.json")))
    return [json.load(open(path))["metrics"] for path in configs]


DDP = dict(num_workers=2, cpus_per_worker=0.5, steps=60, val_every=20, num_to_keep=0)


@pytest.fixture(scope="module")
def ddp_run(tiny_run, tmp_path_factory):
    cfg = with_train(tiny_run, tmp_path_factory.mktemp("ddp"), **DDP)
    return cfg, run_train(cfg)


def test_two_worker_ddp_validation_loss_falls(ddp_run):
    _, result = ddp_run
    history = checkpoint_metrics(result.run_dir)
    assert [m["step"] for m in history] == [20, 40, 60]
    at_start = json.load(open(os.path.join(result.latest_checkpoint, "config.json")))
    at_start = at_start["val_at_start"]["val_loss"]
    losses = [m["val_loss"] for m in history]
    assert losses[-1] < 0.7 * at_start, (at_start, losses)
    assert losses == sorted(losses, reverse=True), losses  # falls at every report
    model, config = load_model(result.best_checkpoint)  # safetensors + JSON, no pickle
    assert config["split"]["val_episodes"]
    weights = load_file(os.path.join(result.best_checkpoint, "model.safetensors"))
    assert {"visual_mean", "visual_std"} <= set(weights)


def test_ddp_ranks_end_equal_and_each_trained_on_its_share(ddp_run):
    cfg, result = ddp_run
    config = json.load(open(os.path.join(result.latest_checkpoint, "config.json")))
    hashes = config["param_hash_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], hashes  # the all-reduce kept them equal
    model, _ = load_model(result.latest_checkpoint)
    assert hashes[0] == parameter_hash(model)  # the hash of the weights the checkpoint holds
    split = make_split(cfg, EpisodeReader(cfg.train.embeddings).index())
    ranks = assign_episodes(split.train, split.frames, 2)
    assert all(ranks) and sorted(sum(ranks, [])) == sorted(split.train)
    shares = [sum(split.frames[e] for e in episodes) for episodes in ranks]
    assert config["train_frames_per_rank"] == shares


def test_same_seed_and_workers_give_the_same_weights(ddp_run, tmp_path):
    cfg, first = ddp_run
    second = run_train(with_train(cfg, tmp_path, **DDP))
    a = load_file(os.path.join(first.latest_checkpoint, "model.safetensors"))
    b = load_file(os.path.join(second.latest_checkpoint, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_evaluate_writes_metrics_and_plot(ddp_run):
    cfg, trained = ddp_run
    evaluated = run_evaluate(cfg, checkpoint=trained.best_checkpoint)
    metrics = json.load(open(evaluated.metrics_path))
    for kind in ("prefix", "chained"):
        assert set(metrics["curves"][kind]) >= {"voc_expert", "auroc_success_vs_failure"}
    curves = json.load(open(os.path.join(cfg.evaluate.output, "curves.json")))
    val_ids = json.load(open(os.path.join(trained.best_checkpoint, "config.json")))["split"]
    assert sorted(curves["episode_id"]) == sorted(val_ids["val_episodes"])
    assert all(len(c) == n for c, n in zip(curves["prefix"], curves["num_frames"]))
    assert os.path.getsize(evaluated.plot_path) > 10_000


def test_worker_crash_restarts_from_checkpoint(tiny_run, tmp_path):
    cfg = with_train(
        tiny_run,
        tmp_path,
        steps=30,
        val_every=10,
        num_to_keep=0,
        crash_at_step=15,
        max_failures=1,
    )
    result = run_train(cfg)
    marker = os.path.join(result.run_dir, ".crashed_at_step_15")
    assert os.path.exists(marker)
    history = checkpoint_metrics(result.run_dir)
    assert [m["step"] for m in history] == [10, 20, 30]  # resumed at 10, went past 15
    assert all(np.isfinite(m["val_loss"]) and m["val_loss"] < 0.2 for m in history)
    assert resumed_from(result.run_dir) == {10: 0, 20: 10, 30: 10}
    # written before the crash and never again: a restart from step 0 would rewrite it
    before_crash = os.path.join(result.run_dir, "checkpoint_step00000010")
    assert all(
        os.path.getmtime(os.path.join(before_crash, name)) < os.path.getmtime(marker)
        for name in os.listdir(before_crash)
    )


def resumed_from(run_dir: str) -> dict[int, int]:
    """Per checkpoint step: the step its run started from (0 = fresh), and a check that only
    a fresh run's checkpoints carry the untrained model's scores (``val_at_start``)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "checkpoint_step*", "config.json"))):
        config = json.load(open(path))
        found[config["step"]] = config["resumed_from_step"]
        assert ("val_at_start" in config) == (config["resumed_from_step"] == 0), path
    return found


def checkpoint_bytes(path: str) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}


def test_manual_restart_resumes_a_failed_run(tiny_run, tmp_path):
    cfg = with_train(
        tiny_run,
        tmp_path,
        steps=20,
        val_every=10,
        num_to_keep=0,
        crash_at_step=15,
        max_failures=0,
    )
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death
        run_train(cfg)
    before_crash = os.path.join(cfg.train.output, cfg.train.run_name, "checkpoint_step00000010")
    saved = checkpoint_bytes(before_crash)
    result = run_train(cfg)  # same output and run name: resume from step 10
    assert [m["step"] for m in checkpoint_metrics(result.run_dir)] == [10, 20]
    assert resumed_from(result.run_dir) == {10: 0, 20: 10}
    assert checkpoint_bytes(before_crash) == saved  # the restart left it as it was
    state = torch.load(os.path.join(result.latest_checkpoint, "train_state.pt"), weights_only=True)
    assert state["step"] == 20


def test_too_many_workers_fails_before_training(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, num_workers=64, cpus_per_worker=0.5)
    with pytest.raises(ValueError, match="num_workers=64"):
        run_train(cfg)


def test_too_few_cpus_fail_at_once_on_a_fixed_cluster(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, num_workers=2, cpus_per_worker=64)
    with pytest.raises(ValueError, match=r"needs 128 CPU but the cluster has 4 CPU.*wait_for"):
        run_train(cfg)


def test_waiting_for_the_autoscaler_asks_for_the_workers_then_withdraws(
    tiny_run, tmp_path, monkeypatch
):
    """This Ray has no autoscaler: the wait times out, and the request does not outlive it
    (a request left behind would keep an autoscaling cluster's nodes up forever)."""
    requests = []
    real_request = ray.autoscaler.sdk.request_resources
    monkeypatch.setattr(
        ray.autoscaler.sdk,
        "request_resources",
        lambda bundles: (requests.append(bundles), real_request(bundles=bundles)),
    )
    monkeypatch.setattr(rayrm.train.trainer, "_RESOURCE_POLL_S", 0.1)
    cfg = with_train(tiny_run, tmp_path, num_workers=2, cpus_per_worker=64, wait_for_resources_s=1)
    with pytest.raises(TimeoutError, match=r"needs 128 CPU; after 1 s the cluster has 4 CPU"):
        run_train(cfg)
    assert requests == [[{"CPU": 64.0}, {"CPU": 64.0}], []]
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == []


def test_missing_embeddings_is_a_clear_error(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, embeddings=str(tmp_path / "nowhere"))
    with pytest.raises(ShardError, match="manifest.json"):
        run_train(cfg)


def test_empty_validation_split_is_a_clear_error(tiny_run, tmp_path):
    cfg = with_train(tiny_run, tmp_path, val_ratio=0.0)
    with pytest.raises(ShardError, match="validation split"):
        run_train(cfg)


def _copy_embeddings(cfg, dest, rewrite, files=None):
    """A copy of the run's embeddings whose episodes table (or, with ``files`` a glob, those
    files: chunk files, say) passes through ``rewrite(table)``."""
    shutil.copytree(cfg.embed.output, dest)
    episodes = json.load(open(os.path.join(dest, schema.MANIFEST_NAME)))["episodes"]
    for path in glob.glob(os.path.join(dest, files or episodes)):
        table = pq.read_table(path)
        pq.write_table(rewrite(table), path, row_group_size=1)  # one chunk per row group
    return str(dest)


def test_shards_missing_a_column_fail_before_training(tiny_run, tmp_path):
    path = _copy_embeddings(tiny_run, tmp_path / "emb", lambda t: t.drop_columns(["prompt"]))
    with pytest.raises(ShardError, match="prompt"):
        run_train(with_train(tiny_run, tmp_path, embeddings=path))


def test_inconsistent_embedding_dims_fail_before_training(tiny_run, tmp_path):
    def halve(table):  # every chunk holds half the values its frames need
        column = [v[: len(v) // 2] for v in table.column("visual_embedding").to_pylist()]
        index = table.schema.get_field_index("visual_embedding")
        field = table.schema.field(index)
        return table.set_column(index, field, pa.array(column, type=field.type))

    path = _copy_embeddings(tiny_run, tmp_path / "emb", halve, files="chunks/*.parquet")
    with pytest.raises(ShardError, match="visual_dim"):
        run_train(with_train(tiny_run, tmp_path, embeddings=path))


def test_mismatch_needs_two_tasks(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="2 distinct prompts"):
        run_train(with_train(tiny_run, tmp_path, mismatch_prob=0.2))


# ---- pieces of the loop that need no Ray ------------------------------------------------


def _episodes(lengths, prompts, dim=4, lang_dim=3):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(0)
    return EpisodeBatch(
        episode_ids=[f"e{i}" for i in range(len(lengths))],
        visual=rng.normal(size=(offsets[-1], dim)).astype(np.float32),
        language=rng.normal(size=(len(lengths), lang_dim)).astype(np.float32),
        offsets=offsets,
        success=[True] * len(lengths),
        stage_boundaries=[[] for _ in lengths],
        prompts=prompts,
    )


def test_mismatched_instructions_get_another_task_and_zero_target():
    tasks = ["a", "b", "c"]
    batch = _episodes([10, 12, 9], ["a", "b", "c"])
    episodes = DeviceEpisodes.from_batch(batch, torch.device("cpu"), False, tasks)
    table = torch.from_numpy(batch.language)  # each episode is its own task here
    g = torch.Generator().manual_seed(0)
    windows = sample_windows(episodes.lengths, episodes.offsets, 2000, 8, 0.0, g)
    inputs = window_inputs(episodes, windows, table, 0.3, g)
    language, target = inputs.language, inputs.progress
    own = table[windows.episode]
    swapped = ~torch.all(language == own, dim=1)
    assert 0.25 < swapped.float().mean() < 0.35
    assert torch.all(target[swapped] == 0)
    assert torch.equal(target[~swapped], windows.target[~swapped])
    # a swapped instruction is always one of the *other* tasks
    for row in torch.nonzero(swapped).flatten()[:50]:
        matches = torch.all(table == language[row], dim=1)
        assert matches.sum() == 1 and not matches[episodes.task[windows.episode[row]]]


def test_blind_control_trains_on_zeros_with_unit_scale():
    batch = _episodes([6, 7], ["a", "a"])
    blind = DeviceEpisodes.from_batch(batch, torch.device("cpu"), True, ["a"])
    assert torch.all(blind.visual == 0) and torch.all(blind.language == 0)
    model = RewardTransformer(ModelConfig(d_model=8, num_heads=2, ffn_dim=8, head_hidden=4), 4, 3)
    model.set_input_stats(*global_input_stats(blind))
    assert torch.all(model.visual_mean == 0) and torch.all(model.visual_std == 1)


def test_warmup_then_cosine_to_the_floor():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=1e-3, lr_min=1e-5, warmup_steps=10)
    optimizer, schedule = optimizer_and_schedule(model, cfg, total_steps=100)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-5)  # lr / 100
    assert lrs[10] == pytest.approx(1e-3)  # warmed up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then only decays
    assert schedule.get_last_lr()[0] == pytest.approx(1e-5)


def test_episodes_are_assigned_to_ranks_by_frames():
    frames = {f"e{i}": n for i, n in enumerate([50, 40, 30, 20, 10, 10])}
    ranks = assign_episodes(list(frames), frames, 2)
    assert sorted(sum(ranks, [])) == sorted(frames)
    loads = [sum(frames[e] for e in r) for r in ranks]
    assert abs(loads[0] - loads[1]) <= 10
    assert ranks == assign_episodes(list(reversed(frames)), frames, 2)  # order-independent


def test_learned_positions_for_every_token():
    cfg = ModelConfig(d_model=8, num_heads=2, ffn_dim=8, head_hidden=4, max_seq_len=5)
    model = RewardTransformer(dataclasses.replace(cfg, positional="all"), 4, 0).eval()
    assert model.positions.shape == (5, 8) and not hasattr(model, "first_frame")
    # Identical frames: only the position embeddings can make the outputs differ.
    out = model(torch.ones(1, 5, 4))
    assert out[0].unique().numel() == 5
    with pytest.raises(ValueError, match="positional"):
        RewardTransformer(dataclasses.replace(cfg, positional="sinusoid"), 4, 0)


def test_tensorboard_tracker_writes_events(tmp_path):
    from rayrm.train.tracking import Trackers, check_trackers

    check_trackers(["tensorboard"])
    with pytest.raises(ValueError, match="unknown logger"):
        check_trackers(["neptune"])
    trackers = Trackers(["tensorboard"], str(tmp_path), {})
    trackers.log({"val_loss": 0.5}, step=1)
    trackers.close()
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


# A learning rate high enough that the validation loss rises and falls between reports, so
# "keep the best" and "keep the latest" keep different checkpoints.
BOUNCY = dict(num_workers=1, steps=40, val_every=5, lr=3e-2, warmup_steps=0)


def test_checkpoint_retention_keeps_the_best_by_validation_loss(tiny_run, tmp_path):
    """Same seed twice: every checkpoint (num_to_keep 0), then num_to_keep 2. The second run
    keeps the two lowest validation losses of the first's history (Ray also keeps the
    latest, to resume from), and its best checkpoint is the first's lowest."""
    every = run_train(with_train(tiny_run, tmp_path / "all", **BOUNCY, num_to_keep=0))
    history = {m["step"]: m["val_loss"] for m in checkpoint_metrics(every.run_dir)}
    assert sorted(history) == list(range(5, 41, 5))
    by_loss = sorted(history, key=history.get)
    assert by_loss[:2] != [35, 40] and by_loss[0] != 40, history  # the test can tell them apart
    kept = run_train(with_train(tiny_run, tmp_path / "two", **BOUNCY, num_to_keep=2))
    steps = [m["step"] for m in checkpoint_metrics(kept.run_dir)]
    assert set(by_loss[:2]) <= set(steps) <= set(by_loss[:2]) | {40}, (steps, history)
    assert json.load(open(os.path.join(kept.best_checkpoint, "config.json")))["step"] == by_loss[0]
