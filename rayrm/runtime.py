"""Process-level setup shared by the CLI and the jobs: logging and connecting to Ray."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from rayrm.config import RayConfig


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by ``ray.address`` / ``RAY_ADDRESS`` (``ray job submit`` sets it),
    or start a local Ray when there is none."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Datasets created inside run without progress bars.

    For small side datasets (training's episode feeds, evaluation) whose bars would only
    drown the training log; a Dataset keeps the DataContext it was created under.
    """
    ctx = ray.data.DataContext.get_current()
    previous = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = previous
