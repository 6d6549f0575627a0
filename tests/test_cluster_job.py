"""``ray job submit`` against a real cluster started with ``ray start --head`` (1½-2 minutes).

The way a user runs rayrm on a cluster, end to end on this machine::

    ray job submit --address http://127.0.0.1:<port> --working-dir . -- \\
        python jobs/pipeline.py --config <tiny.yaml>

rayrm reaches the job's driver and its Ray workers through ``--working-dir`` alone: Ray puts
the unpacked working dir first on ``PYTHONPATH`` of every process of the job. To prove that
(this venv has rayrm installed, which would hide a gap), the cluster runs with a *decoy*
``rayrm`` package on its own ``PYTHONPATH`` that refuses to import: any driver, read task,
embedding actor, Train worker or scorer that did not get the working dir would fail the job.

The cluster lives in a private temp folder with free ports (``tests/_local_ray.py``), so this
module does not care whether the session's ``ray.init`` (conftest) is running.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml
from _local_ray import LocalRayCluster
from conftest import make_config

from rayrm.config import to_dict
from rayrm.data.synthetic import write_synthetic_dataset

DECOY = (
    "raise ImportError('this rayrm is a decoy on the cluster PYTHONPATH: the job must import "
    "rayrm from its --working-dir')\n"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    decoy = tmp_path_factory.mktemp("decoy")
    (decoy / "rayrm").mkdir()
    (decoy / "rayrm" / "__init__.py").write_text(DECOY)
    local = LocalRayCluster(num_cpus=4, env={"PYTHONPATH": str(decoy)})
    with local.running():
        yield local


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> tuple[str, str]:
    """(config YAML path, workdir): 12 tiny synthetic episodes and a config that uses them."""
    workdir = tmp_path_factory.mktemp("cluster_job")
    cfg = make_config(workdir)
    write_synthetic_dataset(cfg.synth)
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return str(path), str(workdir)


def submission_id(name: str) -> str:
    return f"rayrm-test-{name}-{uuid.uuid4().hex[:6]}"


def test_decoy_stops_a_job_without_working_dir(cluster):
    """The control: without --working-dir, the cluster's decoy rayrm is what imports."""
    job_id = submission_id("no-working-dir")
    done = cluster.submit(job_id, "python", "-c", "import rayrm", working_dir=None)
    assert done.returncode == 1
    assert "this rayrm is a decoy" in done.stdout + done.stderr


def test_pipeline_job_runs_on_the_cluster(cluster, tiny_config):
    config, workdir = tiny_config
    job_id = submission_id("pipeline")
    done = cluster.submit(job_id, "python", "jobs/pipeline.py", "--config", config)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert cluster.job_status(job_id) == "SUCCEEDED"
    # The driver's and the workers' logs stream back to `ray job submit`.
    assert "wrote 12 episodes" in log, log[-6000:]
    assert "best checkpoint" in log
    assert "RayTrainWorker" in log
    result = json.load(open(os.path.join(workdir, "train", "reward_model", "rayrm_result.json")))
    assert os.path.exists(os.path.join(result["best_checkpoint"], "model.safetensors"))
    metrics = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
    assert metrics["checkpoint"] == result["best_checkpoint"]
    assert any(name.endswith(".png") for name in os.listdir(os.path.join(workdir, "eval")))


def test_failing_job_is_reported_failed(cluster, tiny_config, tmp_path):
    config, _ = tiny_config
    job_id = submission_id("missing-input")
    missing, output = str(tmp_path / "nowhere.h5"), str(tmp_path / "embeddings")
    overrides = ["--embed.input", missing, "--embed.output", output]
    done = cluster.submit(job_id, "python", "jobs/embed.py", "--config", config, *overrides)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-6000:]
    # rayrm's own message and exit status (2: bad input) reach the submitter.
    assert "ERROR rayrm" in log and missing in log, log[-6000:]
    assert "exit code 2" in log, log[-6000:]
    assert cluster.job_status(job_id) == "FAILED"
    assert not os.path.exists(output)
