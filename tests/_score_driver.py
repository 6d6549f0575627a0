"""``run_score`` in a process of its own, for the test that kills the scoring driver::

    python -m tests._score_driver CONFIG_JSON --address ADDR [--slow]

``CONFIG_JSON`` holds ``rayrm.config.to_dict(cfg)``; the driver joins the test session's
running Ray (a killed driver leaves the cluster up, as on a real one). ``--slow`` scores
with ``tests._score_writers.SlowPartWriter``. The result is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import ray

from rayrm.config import Config, from_dict
from rayrm.score.run import run_score


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--address", required=True)
    parser.add_argument("--slow", action="store_true")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = from_dict(Config, json.load(f))
    ray.init(address=args.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    writer = None
    if args.slow:
        from tests._score_writers import SlowPartWriter

        writer = SlowPartWriter
    try:
        result = run_score(cfg, writer=writer)
    finally:
        ray.shutdown()
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
