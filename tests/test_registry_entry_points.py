"""The backbone registry: built-in names, third-party entry points, one config per backbone.

Third-party backbones are found through the ``rayrm.backbones`` entry-point group. The tests
install a fake distribution by writing a ``*.dist-info`` folder (``METADATA`` and
``entry_points.txt``) next to its module in a temporary folder on ``sys.path``: exactly what
``pip install`` leaves in site-packages, so ``importlib.metadata`` finds it the real way.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rayrm.backbones import Backbone, UnknownBackboneError, available_backbones, build_backbone
from rayrm.backbones import base as backbones_base
from rayrm.backbones.base import ENTRY_POINT_GROUP, backbone_class
from rayrm.config import BackboneConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {
    "tiny": "TinyBackbone",
    "dinov2": "DinoV2Backbone",
    "dinov2_minilm": "DinoV2MiniLMBackbone",
    "qwen3_vl": "Qwen3VLBackbone",
}
PLUGIN_SOURCE = """
import numpy as np
from rayrm.backbones import Backbone

class ConstantBackbone(Backbone):
    visual_dim, language_dim = 5, 2

    def embed_frames(self, frames, prompts):
        return np.full((len(frames), 5), 3.0, np.float32)
"""


def install_fake_distribution(root: Path, module: str, source: str, entries: dict[str, str]):
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = root / f"{module}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture
def isolated_registry(monkeypatch):
    """Entry points loaded in a test must not stay registered for the other tests."""
    monkeypatch.setattr(backbones_base, "_REGISTRY", dict(backbones_base._REGISTRY))
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        if name.startswith("rayrm_plugin_"):
            del sys.modules[name]


def test_built_in_backbones_by_name():
    assert set(BUILT_IN) <= set(available_backbones())
    for name, class_name in BUILT_IN.items():
        cls = backbone_class(name)
        assert issubclass(cls, Backbone) and cls.__name__ == class_name


def test_entry_point_backbone_is_built_by_name(tmp_path, monkeypatch, isolated_registry):
    install_fake_distribution(
        tmp_path, "rayrm_plugin_ok", PLUGIN_SOURCE, {"constant": "rayrm_plugin_ok:ConstantBackbone"}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "constant" in available_backbones()
    backbone = build_backbone(BackboneConfig(name="constant"))
    assert type(backbone).__name__ == "ConstantBackbone"
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    np.testing.assert_array_equal(backbone.embed_frames(frames, ["a", "b"]), 3.0)
    with pytest.raises(UnknownBackboneError) as err:
        build_backbone(BackboneConfig(name="no-such-backbone"))
    listed = str(err.value).split("available: ")[1]
    assert "constant" in listed and all(name in listed for name in BUILT_IN)


def test_a_broken_plugin_is_logged_and_hides_nothing(
    tmp_path, monkeypatch, isolated_registry, caplog
):
    install_fake_distribution(
        tmp_path,
        "rayrm_plugin_mixed",
        PLUGIN_SOURCE,
        {
            "broken": "rayrm_plugin_no_such_module:Thing",
            "constant2": "rayrm_plugin_mixed:ConstantBackbone",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=backbones_base.__name__):
        names = available_backbones()
    assert "constant2" in names and "broken" not in names
    assert set(BUILT_IN) <= set(names)
    assert "backbone entry point 'broken'" in caplog.text
    assert type(build_backbone(BackboneConfig(name="constant2"))).__name__ == "ConstantBackbone"


@pytest.mark.parametrize("name", ["dinov2_minilm", "qwen3_vl"])
def test_each_backbone_has_a_complete_config(name):
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert cfg.backbone.name == name
    assert cfg.backbone.checkpoint is None  # the user gives --backbone.checkpoint
    assert cfg.backbone.dtype == "auto"
    backbone_class(cfg.backbone.name)
    override = load_config(
        REPO_ROOT / "configs" / f"{name}.yaml", ["--backbone.checkpoint", "/models/x"]
    )
    assert override.backbone.checkpoint == "/models/x"
