"""Several cameras and the robot state in the reward transformer (rayrm.train.model): each view
and the state reach the output, and the one-camera model is the one older checkpoints hold."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rayrm.config import ModelConfig
from rayrm.train.checkpoint import WEIGHTS, load_model, read_checkpoint_config, save_checkpoint
from rayrm.train.model import RewardTransformer

# Made by tests/data/single_camera_checkpoint/make.py with rayrm before several cameras.
OLD_CHECKPOINT = os.path.join(os.path.dirname(__file__), "data", "single_camera_checkpoint")
VIEW_DIMS, STATE_DIM, LANGUAGE_DIM, SEQ_LEN = [6, 5], 3, 4, 8


def tiny_config() -> ModelConfig:
    return ModelConfig(
        d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=SEQ_LEN
    )


def views_model(view_dims=VIEW_DIMS, state_dim=STATE_DIM) -> RewardTransformer:
    torch.manual_seed(0)
    dim = sum(view_dims) + state_dim
    model = RewardTransformer(tiny_config(), dim, LANGUAGE_DIM, view_dims, state_dim)
    return model.eval()


def inputs(dim: int, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, SEQ_LEN, dim, generator=g), torch.randn(
        batch, LANGUAGE_DIM, generator=g
    )


def test_an_old_single_camera_checkpoint_loads_strictly_and_scores_the_same():
    model, config = load_model(OLD_CHECKPOINT)  # strict: every key present, none extra
    assert "view_dims" not in config and model.view_dims == [6] and model.state_dim == 0
    expected = np.load(os.path.join(OLD_CHECKPOINT, "expected.npz"))
    with torch.no_grad():
        progress = model(
            torch.from_numpy(expected["visual"]), torch.from_numpy(expected["language"])
        )
    np.testing.assert_allclose(progress.numpy(), expected["progress"], rtol=0, atol=1e-6)


def test_one_view_without_state_has_exactly_the_old_parameters():
    old_keys = set(load_file(os.path.join(OLD_CHECKPOINT, WEIGHTS)))
    torch.manual_seed(0)
    # the old checkpoint predates the success head too: compare like with like
    cfg = dataclasses.replace(tiny_config(), success_head=False)
    model = RewardTransformer(cfg, 6, LANGUAGE_DIM)
    assert set(model.state_dict()) == old_keys
    assert "visual_proj.weight" in old_keys


@pytest.mark.parametrize("part", ["view 0", "view 1", "state"])
def test_the_output_depends_on_each_view_and_on_the_state(part):
    model = views_model()
    visual, language = inputs(sum(VIEW_DIMS) + STATE_DIM)
    start = {"view 0": 0, "view 1": VIEW_DIMS[0], "state": sum(VIEW_DIMS)}[part]
    width = {"view 0": VIEW_DIMS[0], "view 1": VIEW_DIMS[1], "state": STATE_DIM}[part]
    changed = visual.clone()
    changed[:, :, start : start + width] += 3.0 * torch.randn_like(
        changed[:, :, start : start + width]
    )
    with torch.no_grad():
        before, after = model(visual, language), model(changed, language)
    assert (before - after).abs().max() > 1e-4, f"{part} does not reach the output"


def test_each_view_and_the_state_have_their_own_projection():
    model = views_model()
    keys = set(model.state_dict())
    assert "visual_proj.weight" not in keys
    assert model.view_projs[0].weight.shape == (32, VIEW_DIMS[0])
    assert model.view_projs[1].weight.shape == (32, VIEW_DIMS[1])
    assert model.state_proj[0].weight.shape == (32, STATE_DIM)
    one_view_and_state = views_model([6], STATE_DIM)
    assert {"visual_proj.weight", "state_proj.0.weight"} <= set(one_view_and_state.state_dict())


def test_a_layout_that_does_not_add_up_is_refused():
    with pytest.raises(ValueError, match="do not make up"):
        RewardTransformer(tiny_config(), 10, LANGUAGE_DIM, [6, 5], 0)


def test_a_views_checkpoint_records_the_layout_and_round_trips(tmp_path):
    model = views_model()
    save_checkpoint(str(tmp_path), model, {"step": 1})
    config = read_checkpoint_config(str(tmp_path))
    assert (config["view_dims"], config["state_dim"]) == (VIEW_DIMS, STATE_DIM)
    loaded, _ = load_model(str(tmp_path))
    visual, language = inputs(sum(VIEW_DIMS) + STATE_DIM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(visual, language), model(visual, language))
