"""The config tree (rayrm.config): YAML files, command-line overrides, checks, derived paths."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rayrm.config import (
    BACKBONE_DTYPES,
    TRAIN_LOGGERS,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    parse_overrides,
    resolve_paths,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
workdir: /tmp/somewhere
model:
  d_model: 64
  num_layers: 3
train:
  lr: 1          # an int is fine for a float field
  weight_decay: 5e-5   # YAML 1.1 would read this as a string
  steps: 10
""",
    )
    cfg = load_config(
        path,
        [
            "--train.lr",
            "3e-4",
            "--model.num_layers=2",
            "--train.use_gpu",
            "true",
            "--ray.num_cpus",
            "null",
            "--train.grad_clip",
            "2",
            "--embed.prompt=",
        ],
    )
    assert cfg.workdir == "/tmp/somewhere"
    assert cfg.model.d_model == 64  # from the file
    assert cfg.model.num_layers == 2  # the override wins
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 5e-5 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.steps == 10
    assert cfg.train.use_gpu is True
    assert cfg.ray.num_cpus is None
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.embed.prompt is None  # empty value = None for an optional field
    # untouched fields keep their defaults
    assert cfg.model.num_heads == ModelConfig().num_heads
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_int_in_yaml_becomes_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n  lr_min: 0\n"))
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.lr_min, float)


@pytest.mark.parametrize("text", ["3e-4", "3E-4", "+3e-4", "3.0e-4", "3e+2", "1_0e-1"])
def test_exponent_floats(text):
    expected = float(text.replace("_", ""))
    assert load_config(None, ["--train.lr", text]).train.lr == expected
    assert parse_overrides(["--train.lr", text]) == {"train": {"lr": expected}}


def test_string_fields_take_the_text_as_written():
    cfg = load_config(
        None,
        [
            "--train.run_name",
            "001",  # not the int 1
            "--synth.prompt",
            "Task: put the cube in the pot # carefully",  # not a mapping, no comment
            "--embed.camera",
            "no",  # not YAML 1.1's False
            "--embed.prompt",
            "null",  # optional string: null is None
        ],
    )
    assert cfg.train.run_name == "001"
    assert cfg.synth.prompt == "Task: put the cube in the pot # carefully"
    assert cfg.embed.camera == "no"
    assert cfg.embed.prompt is None


def test_mapping_fields_from_overrides():
    cfg = load_config(None, ["--backbone.options", "{attn: sdpa, layers: 2}"])
    assert cfg.backbone.options == {"attn": "sdpa", "layers": 2}
    cfg = load_config(None, ["--backbone.options.attn", "sdpa"])
    assert cfg.backbone.options == {"attn": "sdpa"}


def test_parse_overrides():
    assert parse_overrides(["--train.lr", "0.5", "--model.num-layers=3", "--workdir", "x"]) == {
        "train": {"lr": 0.5},
        "model": {"num_layers": 3},
        "workdir": "x",
    }
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="expected --section.key"):
        parse_overrides(["train.lr", "1"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--train.lrr", "1"], "train.lrr"),
        (["--nosuch.key", "1"], "nosuch"),
        (["--model.d_model.x", "1"], "model.d_model"),
    ],
)
def test_unknown_key_is_named(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'|{key}:"):
        load_config(None, overrides)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0\n  epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epocs" in str(err.value) and str(path) in str(err.value)
    assert "epochs" in str(err.value)  # the known keys are listed


@pytest.mark.parametrize(
    "overrides",
    [
        ["--train.steps", "abc"],
        ["--train.steps", "1.5"],  # float for an int
        ["--train.steps", "true"],  # bool for an int
        ["--train.lr", "fast"],
        ["--train.lr", "true"],  # bool for a float
        ["--train.use_gpu", "1"],  # int for a bool
        ["--train.lr", "null"],  # None for a non-optional field
        ["--train", "5"],  # a scalar for a section
        ["--backbone.options", "[1, 2]"],  # a list for a mapping
        ["--ray.num_cpus", "two"],
        ["--train.steps", "[unclosed"],  # not YAML at all
    ],
)
def test_wrong_type_is_a_config_error(overrides):
    with pytest.raises(ConfigError, match=overrides[0][2:]):
        load_config(None, overrides)


def test_wrong_type_in_file(tmp_path):
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(write(tmp_path, "model:\n  num_layers: four\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


def test_resolve_paths_derives_from_workdir():
    cfg = resolve_paths(Config(workdir="/data/run/"))
    assert cfg.synth.output == "/data/run/raw/episodes.h5"
    assert cfg.embed.input == "/data/run/raw/episodes.h5"
    assert cfg.embed.output == "/data/run/embeddings"
    assert cfg.train.embeddings == "/data/run/embeddings"
    assert cfg.train.output == "/data/run/train"
    assert cfg.evaluate.embeddings == "/data/run/embeddings"
    assert cfg.evaluate.output == "/data/run/eval"


def test_resolve_paths_keeps_explicit_paths():
    cfg = load_config(
        None,
        [
            "--workdir",
            "/w",
            "--embed.input",
            "/raw/*.h5",
            "--embed.output",
            "s3://bucket/emb",
            "--evaluate.output",
            "/reports",
        ],
    )
    resolved = resolve_paths(cfg)
    assert resolved.synth.output == "/w/raw/episodes.h5"
    assert resolved.embed.input == "/raw/*.h5"
    assert resolved.embed.output == "s3://bucket/emb"
    # later stages follow an explicit embedding location
    assert resolved.train.embeddings == "s3://bucket/emb"
    assert resolved.evaluate.embeddings == "s3://bucket/emb"
    assert resolved.train.output == "/w/train"
    assert resolved.evaluate.output == "/reports"
    # the input config is not modified
    assert cfg.train.embeddings is None and cfg.synth.output is None
    # an explicit train.embeddings wins over embed.output
    cfg.train.embeddings = "/other"
    assert resolve_paths(cfg).train.embeddings == "/other"


def test_from_dict_round_trip():
    model = ModelConfig(d_model=64, num_layers=3)
    assert from_dict(ModelConfig, to_dict(model)) == model
    with pytest.raises(ConfigError, match="bogus"):
        from_dict(ModelConfig, {"bogus": 1})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = resolve_paths(load_config(path))
    assert isinstance(cfg, Config)
    for section in dataclasses.fields(cfg):
        assert getattr(cfg, section.name) is not None


def test_there_are_shipped_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize(
    "override, named",
    [
        (["--model.positional", "sinusoid"], "model.positional"),
        (["--model.d_model", "30", "--model.num_heads", "4"], "model.d_model"),
        (["--model.num_layers", "0"], "model.num_layers"),
        (["--model.dropout", "1.0"], "model.dropout"),
        (["--train.stage_prior", "uniform"], "train.stage_prior"),
        (["--train.val_ratio", "1.0"], "train.val_ratio"),
        (["--train.batch_size", "0"], "train.batch_size"),
        (["--train.num_workers", "0"], "train.num_workers"),
        (["--train.lr", "-1"], "train.lr"),
        (["--evaluate.split", "test"], "evaluate.split"),
        (["--log_level", "LOUD"], "log_level"),
        (["--synth.format", "zarr"], "synth.format"),
        (["--synth.num_episodes", "0"], "synth.num_episodes"),
        (["--synth.failure_fraction", "1.5"], "synth.failure_fraction"),
        (["--synth.failure_modes", "teleport"], "synth.failure_modes"),
        (["--synth.failure_modes", "stop_short"], "synth.failure_modes"),
        (["--synth.destinations", "shelf"], "synth.destinations"),
        (["--synth.destinations", "pot,tray"], "synth.destinations"),
        (["--synth.tasks", "red,red"], "synth.tasks"),
        (["--synth.image_size", "8"], "synth.image_size"),
        (["--synth.format", "lerobot", "--synth.image_size", "65"], "synth.image_size"),
        (["--synth.fps", "0"], "synth.fps"),
        (["--synth.noise", "-1"], "synth.noise"),
        (["--synth.max_stage_frames", "4"], "synth.max_stage_frames"),
        (["--backbone.dtype", "float64"], "backbone.dtype"),
        (["--backbone.visual_dim", "0"], "backbone.visual_dim"),
        (["--embed.batch_size", "0"], "embed.batch_size"),
        (["--embed.frames_per_block", "0"], "embed.frames_per_block"),
        (["--embed.num_actors", "-1"], "embed.num_actors"),
        (["--embed.num_gpus_per_actor", "-0.5"], "embed.num_gpus_per_actor"),
        (["--embed.calls_per_actor", "-1"], "embed.calls_per_actor"),
        (["--embed.max_failed_episodes", "-2"], "embed.max_failed_episodes"),
        (["--embed.max_actor_restarts", "-2"], "embed.max_actor_restarts"),
        (["--embed.progress_every_s", "0"], "embed.progress_every_s"),
        (["--train.cpus_per_worker", "0"], "train.cpus_per_worker"),
        (["--train.wait_for_resources_s", "-1"], "train.wait_for_resources_s"),
        (["--train.num_to_keep", "-1"], "train.num_to_keep"),
        (["--train.max_failures", "-2"], "train.max_failures"),
        (["--train.crash_at_step", "-1"], "train.crash_at_step"),
        (["--train.loggers", "tensorboard,comet"], "train.loggers[1]"),
        (["--annotate.num_stages", "-1"], "annotate.num_stages"),
        (["--annotate.fps", "0"], "annotate.fps"),
        (["--annotate.contact_every", "0"], "annotate.contact_every"),
        (["--evaluate.batch_size", "0"], "evaluate.batch_size"),
        (["--evaluate.plot_episodes", "-1"], "evaluate.plot_episodes"),
        (["--evaluate.videos", "-2"], "evaluate.videos"),
        (["--evaluate.hacking_progress", "1.5"], "evaluate.hacking_progress"),
        (["--evaluate.rewind_turn", "-0.1"], "evaluate.rewind_turn"),
        (["--evaluate.embed_videos_mb", "-1"], "evaluate.embed_videos_mb"),
        (["--score.batch_size", "0"], "score.batch_size"),
        (["--score.episodes_per_part", "0"], "score.episodes_per_part"),
        (["--score.rabc_chunk", "-1"], "score.rabc_chunk"),
        (["--score.rabc_kappa", "-0.1"], "score.rabc_kappa"),
        (["--score.num_gpus_per_actor", "-1"], "score.num_gpus_per_actor"),
        (["--score.max_actor_restarts", "-2"], "score.max_actor_restarts"),
        (["--score.progress_every_s", "0"], "score.progress_every_s"),
        (["--serve.target_ongoing_requests", "0"], "serve.target_ongoing_requests"),
        (["--serve.max_frame_side", "0"], "serve.max_frame_side"),
        (["--serve.gpus_per_replica", "-1"], "serve.gpus_per_replica"),
        (["--ray.num_cpus", "0"], "ray.num_cpus"),
    ],
)
def test_values_out_of_range_are_refused_when_the_config_is_built(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(overrides=override)


def test_the_configs_logger_names_are_the_trackers():
    from rayrm.train.tracking import TRACKER_MODULES

    assert set(TRACKER_MODULES) == set(TRAIN_LOGGERS)


def test_every_backbone_dtype_name_resolves():
    torch = pytest.importorskip("torch")
    from rayrm.devices import resolve_dtype

    for name in BACKBONE_DTYPES:
        assert isinstance(resolve_dtype(name, torch.device("cpu")), torch.dtype)
