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
* ``"nan"``: frames whose prompt contains ``"poison"`` embed to NaN, so assembling that one
  episode fails while the other episodes reach the Parquet writer.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from rayrm.backbones.tiny import TinyBackbone

NAME = "tests._failing_backbone:FailingBackbone"
REPO_ROOT = Path(__file__).resolve().parents[1]


class FailingBackbone(TinyBackbone):
    def embed_frames(self, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        mode = self.cfg.options.get("fail")
        if mode == "raise":
            raise RuntimeError("FailingBackbone: embed_frames failed on purpose")
        visual = super().embed_frames(frames, prompts)
        if mode == "nan":
            poisoned = np.array(["poison" in p for p in prompts])
            visual[poisoned] = np.nan
        return visual


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
