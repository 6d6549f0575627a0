"""Optional experiment trackers for rank 0: ``train.loggers: [tensorboard, wandb, mlflow]``.

None is needed to train; each is imported only when named, and a named tracker that is not
installed fails on the driver (``check_trackers``) before any worker starts. Metrics always
reach Ray Train through ``ray.train.report`` and the checkpoints' ``config.json`` as well.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from rayrm.errors import UserError

TRACKER_MODULES = {
    "tensorboard": ("tensorboardX", "torch.utils.tensorboard"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}


def check_trackers(names: list[str]) -> None:
    for name in names:
        if name not in TRACKER_MODULES:
            raise UserError(f"unknown logger '{name}'; choose from {', '.join(TRACKER_MODULES)}")
        if not any(_installed(m) for m in TRACKER_MODULES[name]):
            raise UserError(f"train.loggers names '{name}' but it is not installed")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class Trackers:
    """Fan-out of ``log(metrics, step)`` to the configured trackers."""

    def __init__(self, names: list[str], run_dir: str, config: dict[str, Any]):
        self._sinks: list[tuple[str, Any]] = []
        for name in names:
            self._sinks.append((name, _open(name, run_dir, config)))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, sink in self._sinks:
            if name == "tensorboard":
                for key, value in scalars.items():
                    sink.add_scalar(key, value, step)
            elif name == "wandb":
                sink.log(scalars, step=step)
            elif name == "mlflow":
                sink.log_metrics(scalars, step=step)

    def close(self) -> None:
        for name, sink in self._sinks:
            if name == "tensorboard":
                sink.close()
            elif name == "wandb":
                sink.finish()
            elif name == "mlflow":
                sink.end_run()


def _open(name: str, run_dir: str, config: dict[str, Any]):
    if name == "tensorboard":
        if _installed("tensorboardX"):
            from tensorboardX import SummaryWriter
        else:
            from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(run_dir, "tensorboard"))
    if name == "wandb":
        import wandb

        return wandb.init(project="rayrm", dir=run_dir, config=config, resume="allow")
    import mlflow

    mlflow.start_run()
    return mlflow
