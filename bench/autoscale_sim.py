"""Autoscaling in simulation: cluster.yaml's node types on Ray's fake_multinode provider.

What a cloud cluster from ``cluster.yaml`` does when a job needs GPUs, on this machine:

1. the head starts alone (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``,
   private temp folder and free ports, see ``tests/_local_ray.py``);
2. an embedding job is submitted with ``ray job submit`` and asks for ``--actors`` backbone
   actors of one GPU each (``embed.num_gpus_per_actor: 1``); rayrm comes from this checkout
   through ``PYTHONPATH``, not ``--working-dir`` (fake nodes share the head's session folder,
   where every node's agent would unpack the working dir again: see ``tests/_local_ray.py``);
3. the autoscaler sees the pending GPU demand and launches worker nodes of cluster.yaml's
   types (fake nodes: extra raylets on this machine that declare the same GPUs and custom
   resources), the job runs on them and finishes;
4. after ``--idle-timeout-minutes`` without work the autoscaler removes them: back to 0.

Every ``--every`` seconds the alive worker nodes per type are recorded; at the end a CSV, a
plot and a summary (node counts, time to first node, to the peak, back to zero) are written
to ``--out``. The simulation mirrors cluster.yaml's node types with two changes that keep a
2-core machine alive: each type's CPUs are capped at ``--cpus-per-node`` (logical CPUs make
Ray start that many idle workers per node) and its max_workers at ``--max-workers``.

Run (about 4 minutes; not part of the test suite)::

    python bench/autoscale_sim.py --out outputs/autoscale_sim
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("autoscale_sim")


def _load_local_ray():
    """tests/_local_ray.py, loaded by path (the bench is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("_local_ray", REPO / "tests" / "_local_ray.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_types(args) -> tuple[dict, int]:
    """cluster.yaml's worker node types, capped (see the module docstring); head CPUs."""
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = real["available_node_types"][real["head_node_type"]]
    types = {}
    for name, node_type in real["available_node_types"].items():
        if name == real["head_node_type"]:
            continue
        resources = dict(node_type["resources"])
        resources["CPU"] = min(resources["CPU"], args.cpus_per_node)
        types[name] = {
            "resources": resources,
            "max_workers": min(node_type["max_workers"], args.max_workers),
        }
    return types, min(head["resources"].get("CPU", 2), args.cpus_per_node)


def tiny_embed_config(out: Path, actors: int) -> Path:
    """Synthetic episodes and a config whose embedding asks for ``actors`` GPUs."""
    from rayrm.config import Config, to_dict
    from rayrm.data.synthetic import write_synthetic_dataset

    cfg = to_dict(Config(workdir=str(out / "work")))
    cfg["synth"].update(num_episodes=24, image_size=32, min_stage_frames=3, max_stage_frames=5)
    cfg["backbone"].update(name="tiny", visual_dim=16, language_dim=8)
    cfg["embed"].update(
        batch_size=16, frames_per_block=8, num_actors=actors, num_gpus_per_actor=1.0
    )
    path = out / "embed_gpus.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    from rayrm.config import load_config, resolve_paths

    write_synthetic_dataset(resolve_paths(load_config(path)).synth)
    return path


class NodeSampler(threading.Thread):
    """Alive worker nodes per type, every ``every`` seconds, read from the dashboard."""

    def __init__(self, dashboard: str, gpu_types: dict[float, str], every: float):
        super().__init__(daemon=True)
        self.dashboard, self.gpu_types, self.every = dashboard, gpu_types, every
        self.samples: list[dict] = []
        self.events: list[tuple[float, str]] = []
        self.start_time = time.monotonic()
        self._done = threading.Event()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start_time, 1)

    def mark(self, event: str) -> None:
        self.events.append((self.elapsed(), event))
        logger.info("t=%.0fs %s", self.elapsed(), event)

    def run(self) -> None:
        while not self._done.wait(self.every):
            counts = self.count_nodes()
            if counts is not None:
                self.samples.append({"t": self.elapsed(), **counts})

    def count_nodes(self) -> dict[str, int] | None:
        import urllib.request

        try:
            url = f"{self.dashboard}/nodes?view=summary"
            nodes = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["summary"]
        except (OSError, KeyError, ValueError):
            return None
        counts = dict.fromkeys(self.gpu_types.values(), 0)
        for node in nodes:
            raylet = node.get("raylet", {})
            if raylet.get("state") != "ALIVE" or raylet.get("isHeadNode"):
                continue
            gpus = raylet.get("resourcesTotal", {}).get("GPU", 0)
            counts[self.gpu_types.get(gpus, f"GPU={gpus:g}")] = (
                counts.get(self.gpu_types.get(gpus, f"GPU={gpus:g}"), 0) + 1
            )
        return counts

    def workers(self) -> int:
        return sum(v for k, v in self.samples[-1].items() if k != "t") if self.samples else 0

    def stop(self) -> None:
        self._done.set()
        self.join()


def wait_until(predicate, timeout: float, every: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def summarize(sampler: NodeSampler, job_rc: int) -> dict:
    totals = [(s["t"], sum(v for k, v in s.items() if k != "t")) for s in sampler.samples]
    peak = max((n for _, n in totals), default=0)
    first_up = next((t for t, n in totals if n > 0), None)
    at_peak = next((t for t, n in totals if n == peak and peak > 0), None)
    last_up = max((t for t, n in totals if n > 0), default=None)
    back_to_zero = next((t for t, n in totals if last_up is not None and t > last_up), None)
    return {
        "job_exit_code": job_rc,
        "peak_workers": peak,
        "peak_by_type": {
            k: max(s.get(k, 0) for s in sampler.samples) for k in sampler.samples[0] if k != "t"
        }
        if sampler.samples
        else {},
        "first_worker_s": first_up,
        "peak_reached_s": at_peak,
        "back_to_zero_s": back_to_zero,
        "events": sampler.events,
    }


def write_outputs(out: Path, sampler: NodeSampler, summary: dict) -> None:
    keys = ["t", *sorted({k for s in sampler.samples for k in s if k != "t"})]
    with open(out / "node_counts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval=0)
        writer.writeheader()
        writer.writerows(sampler.samples)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(out / "node_counts.png", sampler, keys[1:])


def plot(path: Path, sampler: NodeSampler, types: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    times = [s["t"] for s in sampler.samples]
    for name in types:
        ax.step(times, [s.get(name, 0) for s in sampler.samples], where="post", label=name)
    for t, event in sampler.events:
        ax.axvline(t, color="grey", lw=0.8, ls=":")
        ax.text(t, ax.get_ylim()[1] * 0.95, event, rotation=90, va="top", fontsize=7)
    ax.set_xlabel("seconds since the head started")
    ax.set_ylabel("alive worker nodes")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/autoscale_sim", help="results folder")
    parser.add_argument("--actors", type=int, default=4, help="GPU embedding actors")
    parser.add_argument("--max-workers", type=int, default=4, help="cap per node type")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="cap of logical CPUs")
    parser.add_argument("--idle-timeout-minutes", type=float, default=1.0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    local_ray = _load_local_ray()
    config_path = tiny_embed_config(out, args.actors)
    types, head_cpus = worker_types(args)
    cluster = local_ray.fake_autoscaling_cluster(head_cpus, types, args.idle_timeout_minutes)
    gpu_types = {
        t["resources"]["GPU"]: name for name, t in types.items() if t["resources"].get("GPU")
    }
    job_rc = None
    with cluster.running():
        sampler = NodeSampler(cluster.dashboard, gpu_types, args.every)
        sampler.start()
        try:
            sampler.mark("head up")
            embed_job = str(REPO / "jobs" / "embed.py")
            done = cluster.submit(
                "embed-sim", "python", embed_job, "--config", str(config_path), working_dir=None
            )
            job_rc = done.returncode
            (out / "job.log").write_text(done.stdout + done.stderr)
            sampler.mark(f"job done (exit {job_rc})")
            idle_wait = args.idle_timeout_minutes * 60 + 120
            if wait_until(lambda: sampler.workers() == 0, idle_wait):
                sampler.mark("0 workers")
            time.sleep(2 * args.every)
        finally:
            sampler.stop()
    summary = summarize(sampler, job_rc)
    write_outputs(out, sampler, summary)
    logger.info("summary: %s", json.dumps(summary))
    logger.info("wrote %s/{node_counts.csv,node_counts.png,summary.json,job.log}", out)


if __name__ == "__main__":
    main()
