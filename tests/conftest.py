"""Shared fixtures: one local Ray for the whole run, tiny episodes and configs in tmp dirs."""

from __future__ import annotations

import dataclasses
import os

import pytest
import ray
from _s3 import s3_server, session_server  # noqa: F401  (s3_server: a fixture for every test)

from rayrm.config import (
    BackboneConfig,
    Config,
    EmbedConfig,
    ModelConfig,
    RayConfig,
    SynthConfig,
    TrainConfig,
    resolve_paths,
)


@pytest.fixture(scope="session")
def ray_session():
    # The test S3 server's address and keys go into the environment before Ray starts, so
    # that Ray's workers reach it too (tests that need it start it: the s3_server fixture).
    os.environ.update(session_server().env())
    # 4 logical CPUs on a 2-core machine: Train workers, the embedding actor and read tasks
    # must all fit at once, or Ray Data waits forever for a free CPU (ray#44687).
    # address="local": a new Ray of our own, never one that another run on this machine left
    # in /tmp/ray/ray_current_cluster (a killed multi-node test leaves a stale one there).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def make_config(workdir, **sections) -> Config:
    """A config small enough for tests: 12 tiny episodes, a 1-layer model, few steps."""
    cfg = Config(
        workdir=str(workdir),
        synth=SynthConfig(
            num_episodes=12, image_size=32, min_stage_frames=3, max_stage_frames=5, seed=1
        ),
        backbone=BackboneConfig(name="tiny", visual_dim=16, language_dim=8, seed=3),
        embed=EmbedConfig(batch_size=16, frames_per_block=8),
        model=ModelConfig(
            d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=8
        ),
        train=TrainConfig(
            batch_size=16, steps=20, val_every=10, lr=1e-3, val_ratio=0.3, val_windows=64
        ),
        ray=RayConfig(),
    )
    for name, changes in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **changes))
    return resolve_paths(cfg)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_session):
    """Synthetic episodes embedded once for every test that only reads them."""
    from rayrm.data.synthetic import write_synthetic_dataset
    from rayrm.embed import run_embed

    cfg = make_config(tmp_path_factory.mktemp("tiny_run"))
    write_synthetic_dataset(cfg.synth)
    run_embed(cfg)
    return cfg
