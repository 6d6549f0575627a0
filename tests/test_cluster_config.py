"""cluster.yaml and configs/cluster_*.yaml agree with each other and with pyproject.toml.

No cloud is touched: Ray's own launcher schema validates cluster.yaml (``prepare_config`` +
``validate_config``, what ``ray up`` runs before it calls AWS), and the rest are plain checks
of the numbers a user would otherwise find wrong only after paying for nodes.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from rayrm.backbones.base import backbone_class
from rayrm.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = {1: "configs/cluster_1gpu.yaml", 8: "configs/cluster_8gpu.yaml"}
CLUSTER_CONFIGS[64] = "configs/cluster_64gpu.yaml"
# What may differ between the cluster configs: the scaling numbers and the run folder.
SCALING = {
    "workdir": None,
    "embed": ("num_actors",),
    "train": ("num_workers", "batch_size"),
}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def configs() -> dict[int, Config]:
    return {gpus: load_config(REPO / path) for gpus, path in CLUSTER_CONFIGS.items()}


def worker_types(cluster: dict) -> dict[str, dict]:
    head = cluster["head_node_type"]
    return {k: v for k, v in cluster["available_node_types"].items() if k != head}


def test_ray_launcher_accepts_cluster_yaml(cluster):
    validate_config(prepare_config(cluster))


def test_workers_scale_from_zero_and_back(cluster):
    types = worker_types(cluster)
    assert {t["resources"].get("GPU", 0) for t in types.values()} >= {1, 8}
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert all(t["min_workers"] == 0 for t in types.values())
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0
    assert cluster["max_workers"] == sum(t["max_workers"] for t in types.values())
    assert 0 < cluster["idle_timeout_minutes"] <= 30


def setup_pip_installs(cluster: dict) -> list[str]:
    """Arguments of every ``pip install`` in the setup commands (flags and pip's own
    upgrade dropped)."""
    args = []
    for command in cluster["setup_commands"]:
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word.endswith("pip") and words[i + 1] == "install":
                args += [w for w in words[i + 2 :] if not w.startswith("-") and w != "pip"]
    return args


def test_setup_installs_pyprojects_dependencies(cluster):
    """The nodes install this repository (file-mounted), so pyproject's dependency list is
    the one installed; the only extra pin is Ray's, inside pyproject's range and equal to
    the Ray this laptop runs (the job CLI and the cluster must match)."""
    import tomllib  # Python >= 3.11, as pyproject requires

    installs = setup_pip_installs(cluster)
    mounted = {remote for remote, local in cluster["file_mounts"].items() if local == "."}
    assert mounted & set(installs), (cluster["file_mounts"], installs)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {Requirement(r).name: Requirement(r) for r in pyproject["project"]["dependencies"]}
    pins = [Requirement(a) for a in installs if a not in mounted]
    assert pins, "Ray is pinned in the setup commands"
    for pin in pins:
        assert pin.name in wanted, f"{pin} is not a pyproject dependency"
        assert pin.extras == wanted[pin.name].extras, (pin, wanted[pin.name])
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert wanted[pin.name].specifier.contains(version), (pin, wanted[pin.name])
        if pin.name == "ray":
            assert version == ray.__version__


def test_auth_token_reaches_every_node(cluster):
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key


def test_cluster_configs_are_valid_rayrm_configs(configs):
    for gpus, cfg in configs.items():
        backbone_class(cfg.backbone.name)
        assert cfg.embed.num_actors * cfg.embed.num_gpus_per_actor == gpus
        assert cfg.train.num_workers == gpus and cfg.train.use_gpu
        assert cfg.train.batch_size % cfg.train.num_workers == 0
        assert cfg.workdir.startswith("/mnt/rayrm/"), "outputs belong on the shared storage"


def _without_scaling(cfg: Config) -> dict:
    data = dataclasses.asdict(cfg)
    for section, keys in SCALING.items():
        if keys is None:
            data.pop(section)
        else:
            for key in keys:
                data[section].pop(key)
    return data


def test_cluster_configs_differ_only_in_scaling(configs):
    first, *rest = configs.values()
    for cfg in rest:
        assert _without_scaling(cfg) == _without_scaling(first)


def test_each_cluster_config_fits_one_node_type(cluster, configs):
    """Every size fits on the nodes of a single GPU type, within max_workers, with the CPUs
    each Train worker asks for next to its GPU."""
    types = worker_types(cluster).values()
    for gpus, cfg in configs.items():
        fitting = [
            t
            for t in types
            if t["resources"].get("GPU", 0) > 0
            and t["max_workers"] * t["resources"]["GPU"] >= gpus
            and t["resources"]["CPU"] / t["resources"]["GPU"] >= cfg.train.cpus_per_worker
        ]
        assert fitting, f"no node type holds {CLUSTER_CONFIGS[gpus]}"
