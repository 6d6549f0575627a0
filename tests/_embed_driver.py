"""``run_embed`` in a process of its own, for tests that kill the driver or need their own Ray.

A test that kills the driver must not kill the test session, and a multi-node
``ray.cluster_utils.Cluster`` cannot share the session's ``ray.init``; both run this module
with ``subprocess``, from the repository root, so that ``tests._failing_backbone`` imports in
this process and (through Ray's driver sys.path) in the actors::

    python -m tests._embed_driver CONFIG_JSON [--address ADDR]
    python -m tests._embed_driver CONFIG_JSON --nodes N [--gpus-per-node G --cpus-per-node C]

``CONFIG_JSON`` holds ``rayrm.config.to_dict(cfg)``. With ``--address`` the driver joins a
running Ray (the test session's: a killed driver then leaves the cluster up, as on a real
one); with ``--nodes`` it starts a ``Cluster`` of N nodes, each declaring its CPUs and (fake)
GPUs; with neither, a local Ray (4 logical CPUs). The result is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import ray
from ray.cluster_utils import Cluster

from rayrm.config import Config, from_dict
from rayrm.embed import run_embed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="JSON file with rayrm.config.to_dict(cfg)")
    parser.add_argument("--address", help="join this running Ray instead of starting one")
    parser.add_argument("--nodes", type=int, default=0, help="nodes of a Cluster (0: local Ray)")
    parser.add_argument("--gpus-per-node", type=float, default=0.0)
    parser.add_argument("--cpus-per-node", type=float, default=2.0)
    return parser.parse_args(argv)


def start_cluster(args) -> Cluster | None:
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
        return None
    if not args.nodes:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        return None
    node = {"num_cpus": args.cpus_per_node, "num_gpus": args.gpus_per_node}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    with open(args.config) as f:
        cfg = from_dict(Config, json.load(f))
    cluster = start_cluster(args)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        result = run_embed(cfg)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
