"""Load on ``rayrm serve``: N concurrent HTTP clients x M steps against 127.0.0.1.

    .venv/bin/python bench/serve_load.py [--clients 1 16 64] [--steps 50] [--frame 64]
        [--replicas 1] [--checkpoint PATH] [--encoding raw|json]

Starts a local Ray and the Serve application (``rayrm.serve.app.start_serve``, the code path
of ``rayrm serve``) over ``--checkpoint``, or a random tiny-backbone checkpoint
(``rayrm.testing.random_checkpoint``: speed does not depend on trained weights). For each N,
N threads each open a stream, send M raw uint8 frames one step at a time (a bounded loop:
exactly M steps, no retries) and close it. Reported per N: steps/s over the wall time of
the whole run, p50 and p99 latency of one step, errors (any exception or non-200; must be
0), and the mean batch the replicas formed (steps / model calls, from ``GET /streams/<id>``).
For scale, the p50 of an HTTP request to a Serve deployment that does nothing is printed:
Serve's own floor on the machine.

The same N streams are then stepped by one vectorised client (``RewardClient.step_many``,
one ``POST /steps`` of N frames per step), the way a vectorised simulator calls it.

The baseline is the in-process :class:`RewardScorer` stepping the same N environments in one
batch ([N, H, W, 3] frames per call, M calls), same checkpoint, same backbone, same threads.
The ratio served / in-process is printed last: what HTTP, Serve's routing and the batching
window cost against a simulator that owns the model itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time

import numpy as np
import ray
import requests
import torch
from ray import serve

from rayrm.config import Config, ServeConfig
from rayrm.evaluate.scorer import RewardScorer
from rayrm.serve import RewardClient
from rayrm.serve.app import start_serve
from rayrm.testing import random_checkpoint

logger = logging.getLogger("bench.serve_load")
PROMPT = "put the cube in the pot"


def run_clients(url: str, clients: int, steps: int, frames: np.ndarray, encoding: str) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    streams: list[str] = []
    client = RewardClient(url, encoding=encoding)  # one session per thread inside

    def one(i: int) -> None:
        try:
            stream = client.open(PROMPT)
            streams.append(stream)
            for t in range(steps):
                start = time.perf_counter()
                client.step(stream, frames[(i + t) % len(frames)])
                latencies[i].append(time.perf_counter() - start)
            client.close(stream)
        except Exception as err:  # counted: the load test reports, it does not stop
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    flat = np.concatenate([np.asarray(x) for x in latencies if x] or [np.zeros(1)])
    return {
        "steps_per_s": sum(len(x) for x in latencies) / wall,
        "p50_ms": 1000 * float(np.percentile(flat, 50)),
        "p99_ms": 1000 * float(np.percentile(flat, 99)),
        "errors": len(errors) + sum(steps - len(x) for x in latencies),
        "first_error": repr(errors[0]) if errors else "",
    }


def run_vectorised(url: str, clients: int, steps: int, frames: np.ndarray, encoding: str) -> dict:
    """One process stepping N streams together: M ``step_many`` calls of N frames each."""
    client = RewardClient(url, encoding=encoding)
    streams = [client.open(PROMPT) for _ in range(clients)]
    latencies, errors = [], 0
    start = time.perf_counter()
    for t in range(steps):
        batch = np.stack([frames[(i + t) % len(frames)] for i in range(clients)])
        began = time.perf_counter()
        results = client.step_many(streams, batch)
        latencies.append(time.perf_counter() - began)
        errors += sum(not hasattr(r, "reward") for r in results)
    wall = time.perf_counter() - start
    for stream in streams:
        client.close(stream)
    return {
        "steps_per_s": clients * steps / wall,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "errors": errors,
    }


def mean_batch(url: str, replica_stream: str, before: dict) -> float:
    after = RewardClient(url).stream_info(replica_stream)
    calls = after["model_calls"] - before["model_calls"]
    return (after["steps"] - before["steps"]) / max(1, calls)


@serve.deployment(name="Echo")
class Echo:
    async def __call__(self, request) -> str:
        return "ok"


def serve_floor(port: int, calls: int = 100) -> float:
    """p50 ms of an HTTP request to a Serve deployment that does nothing: what Serve's proxy
    and one replica hop cost on this machine, below which no served step can go."""
    serve.run(
        Echo.options(ray_actor_options={"num_cpus": 0}).bind(), name="echo", route_prefix="/echo"
    )
    session = requests.Session()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.get(f"http://127.0.0.1:{port}/echo", timeout=30).raise_for_status()
        times.append(time.perf_counter() - start)
    serve.delete("echo")
    return 1000 * float(np.percentile(times, 50))


def in_process(checkpoint: str, clients: int, steps: int, frames: np.ndarray) -> float:
    scorer = RewardScorer.from_checkpoint(checkpoint, "cpu")
    scorer.reset([PROMPT] * clients)
    batch = np.stack([frames[i % len(frames)] for i in range(clients)])
    scorer.step(batch)  # warm-up, as the served side has been warmed by its first requests
    scorer.reset([PROMPT] * clients)
    start = time.perf_counter()
    for _ in range(steps):
        scorer.step(batch)
    return clients * steps / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frame", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--checkpoint", help="default: a random tiny-backbone checkpoint")
    parser.add_argument("--encoding", default="raw", choices=["raw", "json"])
    parser.add_argument("--port", type=int, default=18765)
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    threads = torch.get_num_threads()
    work = tempfile.mkdtemp(prefix="serve_load_")
    checkpoint = args.checkpoint or random_checkpoint(os.path.join(work, "checkpoint"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = Config(
        serve=ServeConfig(
            checkpoint=checkpoint, port=args.port, replicas=args.replicas, cpus_per_replica=0
        )
    )
    url = start_serve(cfg)
    frames = np.random.default_rng(0).integers(0, 256, (16, args.frame, args.frame, 3), np.uint8)
    run_clients(url, 4, 5, frames, args.encoding)  # warm-up: connections, first batches
    floor = serve_floor(args.port)
    rows = []
    for n in args.clients:
        probe = RewardClient(url).open(PROMPT)
        before = RewardClient(url).stream_info(probe)
        served = run_clients(url, n, args.steps, frames, args.encoding)
        served["mean_batch"] = mean_batch(url, probe, before)  # the probe replica's batches
        served["in_process"] = in_process(checkpoint, n, args.steps, frames)
        served["vectorised"] = run_vectorised(url, n, args.steps, frames, args.encoding)
        rows.append((n, served))
        logger.info("N=%d: %s", n, served)
    print(
        f"\n{args.steps} steps per client, {args.frame}x{args.frame} frames, {args.encoding} "
        f"encoding, {args.replicas} replica(s), torch threads {threads}; an HTTP request to "
        f"a Serve deployment that does nothing: p50 {floor:.1f} ms\n"
    )
    print("| clients | steps/s | p50 ms | p99 ms | errors | mean batch | in-process steps/s |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows:
        print(
            f"| {n} | {r['steps_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['errors']} | {r['mean_batch']:.1f} | {r['in_process']:.0f} |"
        )
    print("\nOne vectorised client stepping N streams per call (POST /steps):\n")
    print("| streams | steps/s | p50 ms per call | p99 ms per call | errors |")
    print("|---|---|---|---|---|")
    for n, r in rows:
        v = r["vectorised"]
        print(
            f"| {n} | {v['steps_per_s']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
            f"{v['errors']} |"
        )
    print()
    for n, r in rows:
        vectorised = r["vectorised"]["steps_per_s"] / r["in_process"]
        print(
            f"ratio served / in-process, N={n}: {r['steps_per_s'] / r['in_process']:.3f} "
            f"(N clients), {vectorised:.3f} (one vectorised client)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
