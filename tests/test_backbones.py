"""The backbone registry (rayrm.backbones) and the tiny random-init backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _failing_backbone import NAME as FAILING_BACKBONE
from _failing_backbone import REPO_ROOT

from rayrm.backbones import (
    Backbone,
    UnknownBackboneError,
    available_backbones,
    build_backbone,
    register_backbone,
)
from rayrm.backbones import base as backbones_base
from rayrm.config import BackboneConfig


def tiny(seed: int = 0, **changes) -> Backbone:
    return build_backbone(
        BackboneConfig(name="tiny", seed=seed, visual_dim=16, language_dim=8, **changes)
    )


def frames(n: int = 6, size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- registry


def test_tiny_is_available():
    assert "tiny" in available_backbones()
    assert type(tiny()).__name__ == "TinyBackbone"


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(UnknownBackboneError) as err:
        build_backbone(BackboneConfig(name="no-such-backbone"))
    message = str(err.value)
    assert message.startswith("unknown backbone 'no-such-backbone'")  # no KeyError quoting
    for name in available_backbones():
        assert name in message.split("available: ")[1]


def test_registered_backbone_is_built_by_name(monkeypatch):
    monkeypatch.setattr(backbones_base, "_REGISTRY", dict(backbones_base._REGISTRY))

    @register_backbone("test-constant")
    class ConstantBackbone(Backbone):
        visual_dim, language_dim = 3, 0

        def embed_frames(self, frames, prompts):
            return np.full((len(frames), 3), 7.0, np.float32)

    assert "test-constant" in available_backbones()
    backbone = build_backbone(BackboneConfig(name="test-constant"))
    assert isinstance(backbone, ConstantBackbone)
    np.testing.assert_array_equal(backbone.embed_frames(frames(2), ["a", "b"]), 7.0)
    assert backbone.embed_prompts(["a", "b"]).shape == (2, 0)  # the default: no text encoder


def test_backbone_by_import_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    backbone = build_backbone(BackboneConfig(name=FAILING_BACKBONE, visual_dim=16))
    assert type(backbone).__name__ == "FailingBackbone"
    assert backbone.embed_frames(frames(2), ["a", "b"]).shape == (2, 16)
    with pytest.raises(UnknownBackboneError, match="cannot be imported"):
        build_backbone(BackboneConfig(name="no_such_module_xyz:Thing"))
    with pytest.raises(UnknownBackboneError, match="not a Backbone subclass"):
        build_backbone(BackboneConfig(name="os.path:join"))


# --------------------------------------------------------------------------- tiny backbone


def test_tiny_is_deterministic_from_its_seed():
    x = frames()
    torch.manual_seed(123)  # the global torch seed must not matter
    a = tiny(seed=5).embed_frames(x, ["p"] * len(x))
    torch.manual_seed(456)
    b = tiny(seed=5).embed_frames(x, ["p"] * len(x))
    c = tiny(seed=6).embed_frames(x, ["p"] * len(x))
    assert a.shape == (len(x), 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    pa_, pb, pc = (tiny(seed=s).embed_prompts(["put the cube in the pot"]) for s in (5, 5, 6))
    np.testing.assert_array_equal(pa_, pb)
    assert np.abs(pa_ - pc).max() > 1e-3


def test_building_tiny_leaves_the_global_torch_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    tiny(seed=1)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_tiny_is_batch_invariant():
    backbone = tiny(seed=2)
    x = frames(9, size=24)
    batch = backbone.embed_frames(x, ["p"] * len(x))
    alone = np.concatenate([backbone.embed_frames(x[i : i + 1], ["p"]) for i in range(len(x))])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    # Frames differ, so do their embeddings (the check above is not trivially true).
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_tiny_takes_read_only_frames_and_leaves_them_unchanged():
    x = frames(3)
    original = x.copy()
    x.setflags(write=False)  # what Ray Data hands over
    out = tiny().embed_frames(x, ["p"] * 3)
    np.testing.assert_array_equal(x, original)
    np.testing.assert_allclose(out, tiny().embed_frames(original, ["p"] * 3), atol=1e-6)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((2, 8, 8, 3), np.int64), "uint8"),
        (np.zeros((2, 8, 8), np.uint8), r"RGB \[B, H, W, 3\]"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"RGB \[B, H, W, 3\]"),
        (np.zeros((8, 8, 3), np.uint8), r"RGB \[B, H, W, 3\]"),
    ],
)
def test_tiny_rejects_frames_that_are_not_uint8_rgb(bad, reason):
    with pytest.raises(ValueError, match=reason):
        tiny().embed_frames(bad, ["p"] * len(bad))


def test_tiny_prompt_embeddings():
    backbone = tiny(seed=3)
    prompts = ["Put the cube in the pot.", "put the cube in the pot", "Open the drawer."]
    vectors = backbone.embed_prompts(prompts)
    assert vectors.shape == (3, 8) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[0], backbone.embed_prompts([prompts[0]])[0])
    np.testing.assert_array_equal(vectors[0], vectors[1])  # same words, same vector
    assert np.abs(vectors[0] - vectors[2]).max() > 1e-3
