"""The command line (rayrm.cli): config file plus overrides, one function per command.

``cli.main`` calls ``init_ray``, which joins the Ray that the ``ray_session`` fixture started.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py
import pytest

from rayrm.cli import main
from rayrm.data import schema
from rayrm.data.shards import read_episodes

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
workdir: {workdir}
synth:
  num_episodes: 12
  image_size: 48
  min_stage_frames: 3
  max_stage_frames: 5
  seed: 2
backbone:
  name: tiny
  visual_dim: 12
  language_dim: 6
embed:
  batch_size: 16
  frames_per_block: 8
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(CONFIG.format(workdir=tmp_path / "from_yaml"))
    return str(path)


def test_synth_then_embed(ray_session, tmp_path, config_file):
    workdir = tmp_path / "work"  # the override wins over the YAML's workdir
    common = ["--config", config_file, "--workdir", str(workdir)]
    assert main(["synth", *common, "--synth.num_episodes", "6", "--synth.image_size=32"]) == 0
    raw = workdir / "raw" / "episodes.h5"
    with h5py.File(raw, "r") as f:
        assert len(f) == 6
        assert {f[name]["side_cam"].shape[1:] for name in f} == {(32, 32, 3)}

    assert main(["embed", *common]) == 0
    output = workdir / "embeddings"
    with open(output / schema.MANIFEST_NAME) as f:
        manifest = json.load(f)
    assert manifest["num_episodes"] == 6
    assert (manifest["visual_dim"], manifest["language_dim"]) == (12, 6)  # from the YAML
    assert manifest["input_files"] == [str(raw)]
    assert read_episodes(str(output)).num_rows == 6
    assert not (tmp_path / "from_yaml").exists()

    # A second run refuses to replace the output unless told to.
    files = sorted(os.listdir(output / schema.CHUNKS_DIR)) + sorted(os.listdir(output))
    assert main(["embed", *common]) == 2
    assert sorted(os.listdir(output / schema.CHUNKS_DIR)) + sorted(os.listdir(output)) == files


@pytest.mark.parametrize(
    "override, named",
    [
        (["--embed.bogus", "3"], "embed.bogus"),
        (["--nosuch.key", "3"], "nosuch"),
        (["--synth.num_episodes", "many"], "synth.num_episodes"),
        (["--embed.overwrite", "maybe"], "embed.overwrite"),
        (["--embed.batch_size", "[1, 2"], "embed.batch_size"),  # not valid YAML
        (["--synth.seed"], "--synth.seed"),  # no value
    ],
)
def test_bad_override_exits_2_naming_it(tmp_path, config_file, caplog, override, named):
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert main(["synth", "--config", config_file, *override]) == 2
    assert named in caplog.text
    assert not (tmp_path / "from_yaml").exists()  # nothing ran


def test_bad_config_file_exits_2(tmp_path, caplog):
    missing = tmp_path / "missing.yaml"
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("embed:\n  batchsize: 3\n")
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert main(["synth", "--config", str(missing)]) == 2
        assert main(["synth", "--config", str(bad_key)]) == 2
    assert str(missing) in caplog.text
    assert "embed.batchsize" in caplog.text and str(bad_key) in caplog.text


@pytest.mark.parametrize("error, exits", [("user", 2), ("bug", None)])
def test_a_user_error_exits_2_and_a_bug_keeps_its_traceback(monkeypatch, error, exits):
    import rayrm.cli as cli
    from rayrm.errors import UserError

    def run(command, cfg):
        if error == "user":
            raise UserError("train.lr must be > 0")
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.setattr(cli, "init_ray", lambda _: None)
    if exits is None:
        with pytest.raises(ValueError, match="internal bug"):
            main(["synth"])
    else:
        assert main(["synth"]) == exits


@pytest.mark.parametrize(
    "override, named",
    [
        (["--backbone.name", "dinov2", "--backbone.options.normalise", "imagenet"], "normalise"),
        (["--backbone.name", "dinov2", "--backbone.options.resolution", "squash"], "resolution"),
        (["--backbone.name", "dinov2", "--backbone.options.pos_interpolation", "x"], "pos_interp"),
        (["--backbone.name", "dinov2_minilm", "--backbone.options.text", "/m"], "text"),
        (["--backbone.name", "qwen3_vl", "--backbone.options.pool", "max"], "options.pool"),
        (["--backbone.options.layers", "2"], "layers"),  # tiny reads no options
        (["--backbone.name", "nosuch"], "nosuch"),
    ],
)
def test_a_bad_backbone_option_exits_2_before_ray_starts(monkeypatch, caplog, override, named):
    import rayrm.cli as cli

    def no_ray(_):
        raise AssertionError("Ray started before the backbone options were checked")

    monkeypatch.setattr(cli, "init_ray", no_ray)
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert main(["embed", *override]) == 2
    assert named in caplog.text


@pytest.mark.parametrize(
    "name", ["cluster_1gpu", "cluster_8gpu", "cluster_64gpu", "dinov2_minilm", "qwen3_vl"]
)
def test_the_shipped_configs_backbone_options_pass_the_check(name):
    from rayrm.backbones import check_backbone
    from rayrm.config import load_config

    check_backbone(load_config(f"{REPO}/configs/{name}.yaml").backbone)
