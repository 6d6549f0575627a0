"""A test-only backbone that fails on purpose inside the Ray embedding actors.

Tests name it ``tests._failing_backbone:FailingBackbone`` (``backbone_class`` imports
``package.module:ClassName`` names). Registering a backbone in the test process with
``register_backbone`` would not reach the actors: they are separate worker processes with
their own, empty registry. An importable module does reach them: when the driver calls
``ray.init``, Ray puts the driver's working directory on every worker's ``sys.path``
(``JobConfig._py_driver_sys_path``). Run from the repository root, as the project does, the
workers import ``tests._failing_backbone`` (``tests/`` is a namespace package there). The
driver needs the repository root on its own ``sys.path`` too, which ``python -m pytest`` gives
and :func:`importable_everywhere` adds for a bare ``pytest``. Pytest's own ``sys.path``
insertion (``tests/``) happens only in the driver and does not help the workers.

``options["fail"]`` picks the failure:

* ``"raise"``: ``embed_frames`` raises (the embedding stage fails before anything is written);
* ``"nan"``: frames whose prompt contains ``"poison"`` embed to NaN, so that one episode fails
  (a row of the failures table) while the other episodes reach the Parquet writer.

Other options, for the resume and scale tests (embeddings stay those of ``tiny``):

* ``"delay_s"``: sleep this long per batch, so a test can kill a run half-way;
* ``"exit_on_batch": k`` with ``"exit_marker": path``: the k-th batch of an actor process
  exits that process (``os._exit``, as a crash would), once: the marker file makes the
  restarted actor carry on;
* ``"record_dir": path``: each batch appends ``node_id pid frames`` to ``<path>/<pid>.txt``,
  so a test sees which actors on which nodes did the work.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from rayrm.backbones.tiny import TinyBackbone

NAME = "tests._failing_backbone:FailingBackbone"
REPO_ROOT = Path(__file__).resolve().parents[1]


class FailingBackbone(TinyBackbone):
    batches = 0  # embed_frames calls of this instance (one instance per actor)

    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        options = self.cfg.options
        self.batches += 1
        time.sleep(options.get("delay_s", 0.0))
        if self.batches == options.get("exit_on_batch"):
            exit_once(options["exit_marker"])
        if options.get("record_dir"):
            record(options["record_dir"], len(frames))
        mode = options.get("fail")
        if mode == "raise":
            raise RuntimeError("FailingBackbone: embed_frames failed on purpose")
        visual = super().embed_frames(frames, prompts)
        if mode == "nan":
            poisoned = np.array(["poison" in p for p in prompts])
            visual[poisoned] = np.nan
        return visual


def exit_once(marker: str) -> None:
    """Exit this process at once (no cleanup, like a crash) unless ``marker`` exists."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def record(folder: str, n_frames: int) -> None:
    node = ray.get_runtime_context().get_node_id()
    with open(os.path.join(folder, f"{os.getpid()}.txt"), "a") as f:
        f.write(f"{node} {os.getpid()} {n_frames}\n")


def importable_everywhere(monkeypatch) -> None:
    """Make this module importable as ``tests._failing_backbone`` in the driver and check
    that Ray's workers can import it too, failing with the reason when they can't."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    module = NAME.partition(":")[0]
    importlib.import_module(module)

    # Defined here, not at module level: cloudpickle then ships the function by value instead
    # of by reference to a module the workers may not find.
    @ray.remote(num_cpus=0)
    def find_spec(name: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(name) is not None

    if not ray.get(find_spec.remote(module)):
        raise AssertionError(
            f"Ray workers cannot import {module}: run pytest from {REPO_ROOT} (Ray puts the "
            "driver's working directory at ray.init time on the workers' sys.path)"
        )
