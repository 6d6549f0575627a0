"""Four nodes compute what one node computes, and the data path scales out (slow).

Two layouts of ``ray.cluster_utils.Cluster``, each in its own process (a Cluster cannot share
a process with the session's ``ray.init``), with the same rayrm config (one embedding actor
per GPU, 2-worker DDP training):

* ``one``: a single node, 4 CPUs and 3 fake GPUs;
* ``multi``: a 1-CPU head plus three nodes of 2 CPUs and 1 fake GPU. Resources force the
  spread: the three embedding actors (1 GPU each) land on three nodes, and the two Train
  workers (1.5 CPUs each) on two different nodes.

What the four-node run must show, and is checked:

* the work spread over all actors: every actor, one on each GPU node, embedded frames
  (the test backbone records each batch's node and process);
* the driver received only metadata: chunk records, far fewer bytes than the embeddings, a
  few hundred bytes per chunk whatever the embedding size;
* each training rank read only its share: the Parquet bytes each rank read equal what
  reading its assigned episodes alone costs, and together one copy of the training set.

What must be equal, and is checked:

* embeddings: the same episodes, equal up to float32 rounding. Not bit for bit: which frames
  share a backbone batch depends on how Ray Data's blocks reach the actors, and a CPU matmul
  over a different batch rounds differently (measured: at most 2.2e-8);
* training on the same embeddings: bit-identical weights. The driver assigns whole episodes
  to ranks (not Ray Data's streaming split), seeds are fixed, and the thread count per worker
  is the same in both layouts, so nothing depends on where the ranks run;
* training each layout on its own embeddings: equal weights up to that rounding.

Run: ``pytest -m slow tests/test_cluster_multinode.py`` (2-4 minutes on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np
import pytest
from _failing_backbone import REPO_ROOT
from _local_ray import clean_env, processes_with_env_value
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

LAYOUTS = {
    "one": [{"num_cpus": 4, "num_gpus": 3}],
    "multi": [{"num_cpus": 1}] + [{"num_cpus": 2, "num_gpus": 1}] * 3,
}
BACKBONE = "tests._failing_backbone:FailingBackbone"  # tiny's embeddings, batches recorded
DIM = 256  # embeddings large enough that records vs embeddings is a clear difference


def layout_config(workdir: str):
    from conftest import make_config

    # A pause per batch keeps the first actor up from taking every batch before the others
    # have started (each imports torch on its node).
    options = {"record_dir": os.path.join(workdir, "records"), "delay_s": 0.3}
    return make_config(
        workdir,
        backbone=dict(name=BACKBONE, options=options, visual_dim=DIM),
        embed=dict(num_actors=0, num_gpus_per_actor=1.0, batch_size=8),
        train=dict(num_workers=2, cpus_per_worker=1.5, steps=20, val_every=10),
    )


def run_layout(layout: str, workdir: str, reference_embeddings: str) -> None:
    """In this process: start the layout, embed, train on the reference embeddings (and on
    this layout's own, when they are not the reference), stop the layout."""
    import ray
    from ray.cluster_utils import Cluster

    from rayrm.data.synthetic import write_synthetic_dataset
    from rayrm.embed import run_embed
    from rayrm.runtime import setup_logging
    from rayrm.train.trainer import run_train

    setup_logging("INFO")
    cluster = Cluster()
    try:
        for node in LAYOUTS[layout]:
            cluster.add_node(**node)
        cluster.connect()
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = layout_config(workdir)
        if not os.path.exists(cfg.synth.output):
            write_synthetic_dataset(cfg.synth)
        os.makedirs(cfg.backbone.options["record_dir"], exist_ok=True)
        embedded = run_embed(cfg)
        with open(os.path.join(workdir, "embed_result.json"), "w") as f:
            json.dump(dataclasses.asdict(embedded), f)
        runs = {"on_reference": reference_embeddings}
        if os.path.abspath(reference_embeddings) != os.path.abspath(cfg.embed.output):
            runs["own"] = cfg.embed.output
        for run_name, embeddings in runs.items():
            train = dataclasses.replace(cfg.train, run_name=run_name, embeddings=embeddings)
            run_train(dataclasses.replace(cfg, train=train))
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_layout_in_subprocess(layout: str, workdir: str, reference_embeddings: str) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="rrm")  # ray_current_cluster goes here, not /tmp/ray
    command = [sys.executable, __file__, layout, workdir, reference_embeddings]
    try:
        done = subprocess.run(
            command,
            # From the repository root: the test backbone imports in the driver and, through
            # Ray's driver sys.path, in the actors.
            cwd=REPO_ROOT,
            env=clean_env(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO_ROOT)),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    finally:
        for pid in processes_with_env_value(ray_tmp):  # what Cluster.shutdown left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def embeddings(workdir: str) -> dict[str, np.ndarray]:
    from rayrm.data.shards import read_episodes

    table = read_episodes(os.path.join(workdir, "embeddings"))
    ids, rows = table["episode_id"].to_pylist(), table["visual_embedding"].to_pylist()
    return {e: np.asarray(v, dtype=np.float32) for e, v in zip(ids, rows)}


def frames_by_actor(workdir: str) -> Counter:
    """(node, pid) -> frames embedded there, from the test backbone's records."""
    counts: Counter = Counter()
    for path in glob.glob(os.path.join(workdir, "records", "*.txt")):
        for line in open(path).read().splitlines():
            node, pid, n_frames = line.split()
            counts[(node, pid)] += int(n_frames)
    return counts


def check_rank_reads(workdir: str, run_name: str) -> None:
    """Each rank read exactly its assigned episodes' chunk bytes: one copy in total."""
    from conftest import make_config

    from rayrm.data.shards import EpisodeReader
    from rayrm.train.trainer import assign_episodes, make_split

    pattern = os.path.join(workdir, "train", run_name, "checkpoint_step*20", "config.json")
    (path,) = glob.glob(pattern)
    read = json.load(open(path))["input_bytes_per_rank"]
    embeddings = os.path.join(workdir, "embeddings")
    cfg = make_config(workdir, train=dict(num_workers=2))
    split = make_split(cfg, EpisodeReader(embeddings).index())
    expected = []
    for ids in assign_episodes(split.train, split.frames, 2):
        reader = EpisodeReader(embeddings)
        reader.read(ids)
        expected.append(reader.bytes_read)
    everything = EpisodeReader(embeddings)
    everything.read(split.train)
    assert read == expected and sum(read) == everything.bytes_read, (read, expected)


def final_weights(workdir: str, run_name: str) -> dict[str, np.ndarray]:
    pattern = os.path.join(workdir, "train", run_name, "checkpoint_step*20", "model.safetensors")
    (path,) = glob.glob(pattern)
    return load_file(path)


def read_chunk_count(workdir: str) -> int:
    from rayrm.data.shards import EpisodeReader

    index = EpisodeReader(os.path.join(workdir, "embeddings")).index()
    return sum(len(files) for files in index.column("chunk_file").to_pylist())


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_multi_node_matches_one_node(tmp_path):
    one, multi = str(tmp_path / "one"), str(tmp_path / "multi")
    reference = os.path.join(one, "embeddings")
    run_layout_in_subprocess("one", one, reference)
    run_layout_in_subprocess("multi", multi, reference)

    embedded = embeddings(one), embeddings(multi)
    same_input = final_weights(one, "on_reference"), final_weights(multi, "on_reference")
    own_input = final_weights(one, "on_reference"), final_weights(multi, "own")
    differences = {
        "embeddings": max_difference(*embedded),
        "weights, same embeddings": max_difference(*same_input),
        "weights, own embeddings": max_difference(*own_input),
    }
    logger.info("largest |one node - multi node|: %s", differences)
    assert len(embedded[0]) == 12

    actors = frames_by_actor(multi)
    assert len(actors) == 3 and len({node for node, _ in actors}) == 3, actors
    result = json.load(open(os.path.join(multi, "embed_result.json")))
    assert (
        sum(actors.values())
        == result["embedded_frames"]
        == sum(len(v) // DIM for v in embedded[1].values())
    )
    chunks = read_chunk_count(multi)
    embedding_bytes = sum(v.nbytes for v in embedded[1].values())
    logger.info("driver received %d bytes for %d chunks", result["driver_bytes"], chunks)
    assert result["driver_bytes"] <= 300 * chunks and result["driver_bytes"] * 10 < embedding_bytes
    check_rank_reads(multi, "own")
    assert differences["embeddings"] < 1e-6, differences
    assert differences["weights, same embeddings"] == 0.0, differences
    assert differences["weights, own embeddings"] < 1e-4, differences


if __name__ == "__main__":
    run_layout(*sys.argv[1:4])
