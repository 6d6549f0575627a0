"""Qwen3-VL backbone (rayrm.backbones.qwen3_vl) and GVL progress estimator (rayrm.zeroshot.gvl).

The model is the "tiny" debug flavour of ``rayrm.testing.write_debug_model``: random weights,
2 text layers of width 64 and a 2-block vision tower, written to a temporary folder with a
character-level tokenizer built with ``tokenizers``, a Qwen-style chat template and the PIL image
processor's config - the files a real model folder holds, and no download.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from rayrm.backbones import build_backbone
from rayrm.backbones.qwen3_vl import IMAGE_TOKEN, ChatInputs, frame_conversation
from rayrm.cli import main
from rayrm.config import BackboneConfig, ConfigError, load_config
from rayrm.testing import write_debug_model
from rayrm.zeroshot.gvl import ProgressEstimator, evenly_spaced, gvl_conversation, parse_progress

HIDDEN = 64  # the tiny flavour's text width


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return write_debug_model(str(tmp_path_factory.mktemp("qwen3_vl_tiny")), "tiny")


@pytest.fixture(scope="module")
def backbone(qwen_folder):
    return build_backbone(BackboneConfig(name="qwen3_vl", checkpoint=qwen_folder))


def frames(n: int = 4, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


PROMPTS = ["Put the cube in the pot.", "go", "Open the top drawer, then close it slowly.", "ab"]


# --------------------------------------------------------------------------- embedding


def test_dims_and_registry(backbone):
    assert type(backbone).__name__ == "Qwen3VLBackbone"
    assert backbone.visual_dim == HIDDEN and backbone.language_dim == 0
    assert backbone.embed_prompts(["a", "b"]).shape == (2, 0)
    assert backbone.dtype == torch.float32  # dtype auto on a CPU
    assert backbone.model.config._attn_implementation == "sdpa"


def test_batched_embedding_equals_per_frame(backbone):
    x = frames()
    batch = backbone.embed_frames(x, PROMPTS)
    alone = np.concatenate([backbone.embed_frames(x[i : i + 1], [PROMPTS[i]]) for i in range(4)])
    assert batch.shape == (4, HIDDEN) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, alone, atol=1e-4)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_the_batch_really_is_left_padded_and_an_unmasked_mean_would_leak(backbone):
    """The check above is not trivially true: prompts of unequal length pad, and the reference
    pipeline's unmasked mean changes with the batch."""
    x = frames()
    inputs = backbone.inputs([frame_conversation(p) for p in PROMPTS], list(x))
    mask = inputs["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # padding on the left
    with torch.no_grad():
        hidden = backbone.model(**inputs, use_cache=False).last_hidden_state
    shortest = int(mask.sum(1).argmin())
    alone = backbone.inputs([frame_conversation(PROMPTS[shortest])], [x[shortest]])
    with torch.no_grad():
        hidden_alone = backbone.model(**alone, use_cache=False).last_hidden_state
    seed_batch, seed_alone = hidden[shortest].mean(0), hidden_alone[0].mean(0)
    assert (seed_batch - seed_alone).abs().max() > 1e-3


def test_image_pooling_averages_the_image_tokens(qwen_folder, backbone):
    x = frames(2, seed=1)
    pooled = build_backbone(
        BackboneConfig(name="qwen3_vl", checkpoint=qwen_folder, options={"pool": "image"})
    ).embed_frames(x, PROMPTS[:2])
    inputs = backbone.inputs([frame_conversation(PROMPTS[0])], [x[0]])
    is_image = inputs["input_ids"][0] == backbone.inputs.image_token_id
    grid = inputs["image_grid_thw"][0]
    assert int(is_image.sum()) == int(grid.prod()) // 4  # one token per 2x2 merged patch
    with torch.no_grad():
        hidden = backbone.model(**inputs, use_cache=False).last_hidden_state[0]
    np.testing.assert_allclose(pooled[0], hidden[is_image].mean(0).numpy(), atol=1e-4)
    tokens_mean = backbone.embed_frames(x[:1], PROMPTS[:1])[0]
    assert np.abs(pooled[0] - tokens_mean).max() > 1e-3


def test_chat_template_and_image_tokens(backbone):
    inputs = backbone.inputs([frame_conversation("hi")], [frames(1, 48, 80)[0]])
    text = backbone.inputs.tokenizer.decode(inputs["input_ids"][0])
    n = int(inputs["image_grid_thw"][0].prod()) // 4
    assert text == (
        f"<|im_start|>user\n<|vision_start|>{IMAGE_TOKEN * n}<|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert inputs["mm_token_type_ids"][0].sum() == n


def test_bad_input(qwen_folder, backbone, tmp_path):
    for bad in (np.zeros((2, 64, 64), np.uint8), np.zeros((2, 64, 64, 4), np.uint8)):
        with pytest.raises(ValueError, match=r"RGB \[B, H, W, 3\]"):
            backbone.embed_frames(bad, ["p"] * 2)
    with pytest.raises(ValueError, match="2 frames but 1 prompts"):
        backbone.embed_frames(frames(2), ["p"])
    with pytest.raises(FileNotFoundError, match="--backbone.checkpoint"):
        build_backbone(BackboneConfig(name="qwen3_vl"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_backbone(BackboneConfig(name="qwen3_vl", checkpoint=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ValueError, match="not qwen3_vl"):
        build_backbone(BackboneConfig(name="qwen3_vl", checkpoint=str(tmp_path)))
    with pytest.raises(ValueError, match="pool must be one of"):
        cfg = BackboneConfig(name="qwen3_vl", checkpoint=qwen_folder, options={"pool": "max"})
        build_backbone(cfg)


def test_more_images_than_placeholders_is_an_error(backbone):
    with pytest.raises(ValueError, match="more images than image placeholders"):
        backbone.inputs([frame_conversation("a")], list(frames(2)))


# --------------------------------------------------------------------------- progress parser


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("0.1, 0.5, 1.0", [0.1, 0.5, 1.0]),
        ("0.1,0.5,1", [0.1, 0.5, 1.0]),
        ("<think>frame 1 looks like 20 percent, 2 is 0.9</think>0.2, 0.4, 0.6", [0.2, 0.4, 0.6]),
        ("<think>a</think> 0.3 <think>b 0.9</think> 0.6, 0.9", [0.3, 0.6, 0.9]),
        ("reasoning 5 0.7 ... </think>\n0.1, 0.2, 0.3", [0.1, 0.2, 0.3]),  # opened by prompt
        ("0.1, 0.2 <think>still thinking 0.5", [0.1, 0.2, np.nan]),  # unfinished block
        ("10%, 55%, 100%", [0.1, 0.55, 1.0]),
        ("10 %, 0.5%, 1", [0.1, 0.005, 1.0]),  # '%' always divides, even below 1
        ("20, 50, 90", [0.2, 0.5, 0.9]),  # above 1: a percentage without the sign
        ("150, 250%, -0.2", [1.0, 1.0, 0.0]),  # clipped to [0, 1]
        ("0.25, 0.5", [0.25, 0.5, np.nan]),  # too few -> NaN
        ("", [np.nan, np.nan, np.nan]),
        ("I cannot tell.", [np.nan, np.nan, np.nan]),
        ("0.1, 0.2, 0.3, 0.4, 0.5", [0.1, 0.2, 0.3]),  # too many -> dropped
        ("Frame 1: 0.1\nFrame 2: 0.35\nFrame 3: 0.8", [0.1, 0.35, 0.8]),  # labels are no values
        ("[.5, 0.75, 1.]", [0.5, 0.75, 1.0]),
        ("Progress: 0.2; 0.4; 0.6.", [0.2, 0.4, 0.6]),
        ("v2 model says 0.3, 0.6, 0.9", [0.3, 0.6, 0.9]),  # digits inside words are skipped
    ],
)
def test_parse_progress(answer, expected):
    out = parse_progress(answer, 3)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, np.array(expected, np.float32), atol=1e-6)


def test_parse_progress_for_zero_frames():
    assert parse_progress("0.5", 0).shape == (0,)


def test_evenly_spaced():
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(3, 8).tolist() == [0, 1, 2]


def test_gvl_message_shows_every_frame_once():
    conversation = gvl_conversation("stack the cups", [0.5, 1.0], 3)
    content = conversation[0]["content"]
    assert sum(item["type"] == "image" for item in content) == 5
    text = " ".join(item.get("text", "") for item in content)
    assert "stack the cups" in text and "progress 0.50" in text and "Frame 3:" in text
    assert "only with 3 comma-separated numbers in [0, 1]" in text


# --------------------------------------------------------------------------- progress estimator


@pytest.fixture(scope="module")
def estimator(qwen_folder):
    return ProgressEstimator(qwen_folder, max_new_tokens=12)


def test_estimator_runs_the_model_and_parses(estimator, monkeypatch):
    reference, target = frames(2, seed=3), frames(3, seed=4)
    estimate = estimator(reference, target, "Put the cube in the pot.")
    assert estimate.progress.shape == (3,) and estimate.progress.dtype == np.float32
    assert isinstance(estimate.answer, str)
    # The answer path, with a known answer instead of a random model's.
    seen = {}

    def fake_generate(batch, num_targets):
        seen["images"] = len(batch["image_grid_thw"])
        return "<think>0.9</think>0.1, 40%"

    monkeypatch.setattr(estimator, "_generate", fake_generate)
    estimate = estimator(reference, target, "Put the cube in the pot.")
    assert seen["images"] == 5
    np.testing.assert_allclose(estimate.progress, [0.1, 0.4, np.nan], atol=1e-6)


def write_episodes(path, count: int = 2) -> str:
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = "Put the cube in the pot."
        for i in range(count):
            f.create_group(f"episode_{i}").create_dataset("side_cam", data=frames(5, seed=i))
    return str(path)


def test_gvl_command_writes_progress_per_episode(qwen_folder, tmp_path, monkeypatch):
    path = write_episodes(tmp_path / "episodes.h5")
    monkeypatch.setattr(ProgressEstimator, "_generate", lambda self, batch, n: "0.2, 0.6, 1.0")
    output = tmp_path / "progress.json"
    argv = ["gvl", "--gvl.checkpoint", qwen_folder, "--gvl.input", path]
    argv += ["--gvl.reference", "episode_0", "--gvl.num_target", "3"]
    assert main([*argv, "--gvl.num_reference", "2", "--gvl.output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert list(results) == ["episode_1"]
    assert results["episode_1"]["frame_indices"] == [0, 2, 4]
    assert results["episode_1"]["progress"] == pytest.approx([0.2, 0.6, 1.0])


def test_gvl_command_names_what_is_missing(qwen_folder, tmp_path, caplog):
    path = write_episodes(tmp_path / "episodes.h5")
    argv = ["gvl", "--gvl.checkpoint", qwen_folder, "--gvl.input", path]
    assert main(argv) == 2
    assert "--gvl.reference" in caplog.text
    assert main([*argv, "--gvl.reference", "episode_9"]) == 2
    assert "no episode 'episode_9'" in caplog.text


def test_gvl_settings_are_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match="gvl.num_target"):
        load_config(None, ["--gvl.num_target", "0"])


def test_chat_inputs_need_a_chat_template(qwen_folder, tmp_path):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(qwen_folder, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        ChatInputs(str(folder))
