"""A driver process to kill mid-run, and the files it commits: shared by the resume tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ray
from _failing_backbone import REPO_ROOT

from rayrm.config import to_dict


def start_driver(module: str, cfg, folder, *extra: str) -> subprocess.Popen:
    """``python -m <module> config.json --address <this session's Ray> [extra]``, logging to
    ``folder/driver.log``."""
    config = folder / "config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    address = ray.get_runtime_context().gcs_address
    with open(folder / "driver.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, str(config), "--address", address, *extra],
            cwd=REPO_ROOT,  # Ray puts it on the job's workers' sys.path: the tests' hooks import
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def count_files(folder: str) -> int:
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def wait_for_files(folder: str, count: int, driver: subprocess.Popen, timeout: float) -> None:
    """Until ``folder`` holds ``count`` files, while the driver still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_files(folder) >= count:
            return
        assert driver.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError(f"no {count} committed files in {folder} after {timeout} s")


def wait_until_no_new_files(folder: str, quiet_s: float, timeout: float) -> None:
    """Until no file has appeared in ``folder`` for ``quiet_s`` (calls in flight when the
    driver was killed may still commit theirs)."""
    deadline, seen, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = count_files(folder)
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError(f"files still appearing in {folder} {timeout} s after the kill")
