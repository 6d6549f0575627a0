"""Test-only scoring actors for the resume tests (``rayrm.score.run.run_score(writer=...)``).

Importable as ``tests._score_writers`` by Ray's workers for the reason given in
``tests/_failing_backbone.py`` (the driver runs from the repository root). Their values are
those of :class:`rayrm.score.pipeline.PartWriter`; only their timing or failure differs.
"""

from __future__ import annotations

import time

import pyarrow as pa

from rayrm.score.pipeline import PartWriter


class SlowPartWriter(PartWriter):
    """Sleeps before each call, so that a test can kill the run half-way."""

    delay_s = 0.4

    def __call__(self, episodes: pa.Table) -> pa.Table:
        time.sleep(self.delay_s)
        return super().__call__(episodes)


class FailingPartWriter(PartWriter):
    """Commits its first two calls' parts, then raises: a run that dies half-way."""

    calls_before_failure = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, episodes: pa.Table) -> pa.Table:
        self.calls += 1
        if self.calls > self.calls_before_failure:
            raise RuntimeError("scoring failed on purpose (test)")
        return super().__call__(episodes)
