"""A cold autoscaling cluster: a job that needs nodes the autoscaler has not started yet.

Ray's ``fake_multinode`` provider (``tests/_local_ray.py``) stands in for cluster.yaml's
cloud: the head starts alone and worker nodes (extra raylets on this machine) appear on
demand, as GPU nodes do after they were scaled down to 0 when idle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import yaml
from _local_ray import REPO, fake_autoscaling_cluster

from rayrm.config import to_dict

TRAIN_JOB = str(REPO / "jobs" / "train.py")  # no --working-dir on a fake cluster


def train_job_config(tiny_run, out, **train) -> str:
    """tiny_run's embeddings, trained by one worker of 2 CPUs (the head has 1)."""
    changes = dict(num_workers=1, cpus_per_worker=2.0, output=str(out / "train"), **train)
    cfg = dataclasses.replace(tiny_run, train=dataclasses.replace(tiny_run.train, **changes))
    path = out / f"train-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return str(path)


def test_train_only_job_waits_for_the_autoscaler_to_add_a_node(tiny_run, tmp_path):
    workers = {"train_node": {"resources": {"CPU": 2}, "max_workers": 1}}
    cluster = fake_autoscaling_cluster(head_cpus=1, worker_types=workers)
    with cluster.running():
        # The control: without waiting, the job fails at once with what to do.
        config = train_job_config(tiny_run, tmp_path)
        done = cluster.submit("no-wait", "python", TRAIN_JOB, "--config", config, working_dir=None)
        log = done.stdout + done.stderr
        assert done.returncode != 0, log[-6000:]
        assert "needs 2 CPU but the cluster has 1 CPU" in log, log[-6000:]
        assert "train.wait_for_resources_s" in log

        config = train_job_config(tiny_run, tmp_path, wait_for_resources_s=180)
        done = cluster.submit("wait", "python", TRAIN_JOB, "--config", config, working_dir=None)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "asked the autoscaler for the rest" in log, log[-6000:]
    assert "the cluster now has 3 CPU" in log, log[-6000:]
    result_path = tmp_path / "train" / tiny_run.train.run_name / "rayrm_result.json"
    result = json.loads(result_path.read_text())
    assert os.path.exists(os.path.join(result["best_checkpoint"], "model.safetensors"))
