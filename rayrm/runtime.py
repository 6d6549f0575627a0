"""Process-level setup shared by the CLI and the jobs: logging and connecting to Ray."""

from __future__ import annotations

import logging
import os

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
