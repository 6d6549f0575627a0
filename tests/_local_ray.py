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

``fake_autoscaling_cluster`` adds Ray's ``fake_multinode`` autoscaler: worker nodes of the
given types are extra raylets on this machine, launched on demand and removed when idle.
They share the head's session folder, so each node's runtime-env agent unpacks a job's
``--working-dir`` into the same place, under the feet of processes that run from it (seen: a
task whose working directory vanished while it imported torch). Jobs on it therefore run
rayrm from this checkout through ``PYTHONPATH``, without a working dir.

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
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 120
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
        """``ray job submit --working-dir .``: waits for the job and streams its log.

        The dashboard answers before its job agent has registered (slower with Ray Serve's
        dashboard modules installed, and on a loaded machine); Ray then refuses the submission
        with "No available agent", and nothing was submitted, so it is tried again."""
        upload = ["--working-dir", working_dir] if working_dir else []
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            done = self.job("submit", "--submission-id", submission_id, *upload, "--", *entrypoint)
            if NO_AGENT not in done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2)

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


FAKE_HEAD_TYPE = "ray.head.default"  # the name the fake provider gives the head node


def fake_autoscaling_config(
    gcs_address: str, worker_types: dict[str, dict], idle_timeout_minutes: float = 1.0
) -> dict:
    """An autoscaling config for Ray's ``fake_multinode`` provider.

    ``worker_types``: name -> ``{"resources": {...}, "min_workers": n, "max_workers": m}``,
    as in cluster.yaml's ``available_node_types`` (``node_config`` is not used)."""
    types = {FAKE_HEAD_TYPE: {"resources": {}, "node_config": {}, "max_workers": 0}}
    for name, node_type in worker_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **node_type}
    empty_lists = (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "initialization_commands",
        "cluster_synced_files",
        "rsync_exclude",
        "rsync_filter",
    )
    return {
        "cluster_name": "rayrm-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # else the fake nodes look for a GCS on port 6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        **{key: [] for key in empty_lists},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        "docker": {},
    }


def fake_autoscaling_cluster(
    head_cpus: int, worker_types: dict[str, dict], idle_timeout_minutes: float = 1.0
) -> LocalRayCluster:
    """A head of ``head_cpus`` CPUs whose autoscaler adds ``worker_types`` nodes on demand
    (started by ``.running()``, like any :class:`LocalRayCluster`). Submit jobs to it with
    ``working_dir=None`` and entrypoints by absolute path (see the module docstring)."""
    fake_env = {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PYTHONPATH": str(REPO),  # see the module docstring: no --working-dir here
    }
    cluster = LocalRayCluster(num_cpus=head_cpus, env=fake_env)
    config = fake_autoscaling_config(cluster.gcs_address, worker_types, idle_timeout_minutes)
    path = os.path.join(cluster.temp_dir, "autoscaling.json")
    with open(path, "w") as f:
        json.dump(config, f)
    cluster.head_args = [f"--autoscaling-config={path}"]
    return cluster


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
