"""A private Ray cluster on this machine, started with ``ray start --head`` like a real one.

Used by the cluster tests and ``bench/autoscale_sim.py``. Other Ray clusters may run on the
same machine (other test sessions, other people), so everything here is private to one
cluster:

* every port is a free one picked here (nothing on Ray's fixed defaults 6379, 8265, 10001,
  52365), and the dashboard listens on 127.0.0.1 only;
* ``--temp-dir`` and ``RAY_TMPDIR`` point at a fresh folder, so ``ray_current_cluster`` is
  written there, not to ``/tmp/ray`` where another session's ``ray.init()`` would find it;
* it is stopped by signalling the ``ray start --block`` process this class started, then any
  process still carrying the cluster's folder in its environment (``ray::`` workers rename
  themselves, so the command line cannot identify them). Never ``ray stop``: that stops every
  Ray on the machine.

The ``python`` of a job entrypoint resolves through the PATH of ``ray start``, so the PATH
given to it starts with this interpreter's folder (the project's venv).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray setting it may carry (RAY_ADDRESS from a
    ``ray.init`` in the test process, a job id, ...), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Stop in seconds: the default drain waits up to 30 s for idle workers.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "3"
    env.update(extra)
    return env


class LocalRayCluster:
    """``ray start --head --block`` in a private temp folder; the job CLI pointed at it.

    ``env`` is added to the environment of ``ray start`` (and so of every Ray process and job
    on the cluster) and of the ``ray job`` commands; ``RAY_AUTH_MODE=disabled`` unless given.
    """

    def __init__(self, num_cpus: int = 4, env: dict[str, str] | None = None, head_args=()):
        self.temp_dir = tempfile.mkdtemp(prefix="rrm")  # short: Ray's socket paths must fit
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.num_cpus = num_cpus
        self.head_args = list(head_args)
        self.env = clean_env(RAY_TMPDIR=self.temp_dir, RAY_AUTH_MODE="disabled", **(env or {}))
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.gcs_address = f"127.0.0.1:{self.ports['port']}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        command = [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            *[f"--{flag}={port}" for flag, port in self.ports.items()],
            *self.head_args,
        ]
        log = open(os.path.join(self.temp_dir, "ray_start.log"), "w")
        # Started away from the repository: a job without a working dir runs in the cwd of
        # `ray start` and would otherwise import rayrm from there.
        self._process = subprocess.Popen(
            command,
            cwd=self.temp_dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_for_dashboard(timeout)
        logger.info("Ray head up: %s (temp dir %s)", self.dashboard, self.temp_dir)

    def _wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"ray start exited {self._process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).read()
                return
            time.sleep(0.5)
        raise TimeoutError(f"no dashboard at {self.dashboard} after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        path = os.path.join(self.temp_dir, "ray_start.log")
        return open(path).read()[-4000:] if os.path.exists(path) else ""

    def job(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job <args> --address <dashboard>`` from the repository root."""
        command = [RAY, "job", args[0], "--address", self.dashboard, *args[1:]]
        return subprocess.run(
            command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, submission_id: str, *entrypoint: str, working_dir: str | None = "."):
        """``ray job submit --working-dir .``: waits for the job and streams its log."""
        upload = ["--working-dir", working_dir] if working_dir else []
        return self.job("submit", "--submission-id", submission_id, *upload, "--", *entrypoint)

    def job_status(self, submission_id: str) -> str:
        """The job's status word (SUCCEEDED, FAILED, ...), from the job REST API."""
        url = f"{self.dashboard}/api/jobs/{submission_id}"
        return json.loads(urllib.request.urlopen(url, timeout=10).read())["status"]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # graceful: drains, then stops its nodes
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        for pid in processes_with_env_value(self.temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalRayCluster]:
        try:
            self.start()
            yield self
        finally:
            self.stop()


def processes_with_env_value(value: str) -> list[int]:
    """Ids of this user's processes whose environment mentions ``value`` (a temp folder)."""
    needle = value.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return found
