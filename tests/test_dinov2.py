"""DINOv2 backbone (rayrm.backbones.dinov2): both checkpoint formats against independent code.

References, all offline with small random weights:

* the original facebookresearch model code from PyPI ``dinov2`` (0.0.1.dev2, installed with
  ``pip install --no-deps``: its pinned dependencies do not exist for this torch). It predates
  register tokens; :class:`ReferenceWithRegisters` adds them the way the original code does
  (right after CLS, after the position embedding). Its interpolation is the old one (+0.1
  offset, no antialias), so off the pretraining grid we compare with ``pos_interpolation:
  offset``;
* transformers' ``Dinov2WithRegistersModel`` (the original reg4 model's antialiased
  interpolation) and ``Dinov2Model`` (bicubic without antialias), saved with ``save_pretrained``.

Embeddings are compared in fp32 within 1e-4.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from rayrm.backbones import build_backbone
from rayrm.backbones.dinov2 import CheckpointError, hf_to_original
from rayrm.config import BackboneConfig

try:
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer
except ImportError as err:  # fail, do not skip: these are the reference checks
    raise ImportError(
        "tests need the original DINOv2 code: pip install --no-deps dinov2==0.0.1.dev2"
    ) from err

DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 14
PRETRAIN_SIZE = 56  # a 4x4 patch grid plays the role of the real 37x37
ATOL = 1e-4


class ReferenceWithRegisters(DinoVisionTransformer):
    """The reference ViT with register tokens inserted as the original code does."""

    def __init__(self, num_registers: int, **kwargs):
        super().__init__(**kwargs)
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, self.embed_dim))

    def prepare_tokens_with_masks(self, x, masks=None):
        x = super().prepare_tokens_with_masks(x, masks)  # CLS + patches + position embedding
        registers = self.register_tokens.expand(x.shape[0], -1, -1)
        return torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights big enough that every block changes the output (init layer scale is 1e-5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("gamma", "lambda1")) or "norm" in name and "weight" in name:
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def reference_vit(num_registers: int = 0, seed: int = 0) -> DinoVisionTransformer:
    kwargs = dict(
        img_size=PRETRAIN_SIZE,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        init_values=1e-5,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        block_chunks=0,  # the released checkpoints' layout: blocks.<i>.*
    )
    if num_registers:
        return randomize(ReferenceWithRegisters(num_registers, **kwargs), seed)
    return randomize(DinoVisionTransformer(**kwargs), seed)


def frames(n: int = 4, h: int = PRETRAIN_SIZE, w: int = PRETRAIN_SIZE, seed: int = 0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def seed_pixels(x: np.ndarray) -> torch.Tensor:
    """The recipe's preprocessing, written out independently: x/255, then (x-0.5)/0.5."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - 0.5) / 0.5


def reference_cls(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(seed_pixels(x))["x_norm_clstoken"].numpy()


def dinov2(checkpoint, name: str = "dinov2", **options):
    options.setdefault("num_heads", HEADS)  # a 32-wide toy ViT: heads are not 64 wide
    cfg = BackboneConfig(name=name, checkpoint=str(checkpoint), dtype="float32", options=options)
    return build_backbone(cfg)


@pytest.fixture(scope="module")
def original_checkpoints(tmp_path_factory):
    """Original-format .pth files (plain and reg4) and the reference models that wrote them."""
    folder = tmp_path_factory.mktemp("dinov2_original")
    out = {}
    for registers in (0, 4):
        model = reference_vit(registers, seed=registers)
        path = folder / f"vit_reg{registers}.pth"
        torch.save(model.state_dict(), path)
        out[registers] = (path, model)
    return out


# --------------------------------------------------------------------------- original format


@pytest.mark.parametrize("registers", [0, 4])
def test_original_checkpoint_matches_reference_at_the_pretraining_grid(
    original_checkpoints, registers
):
    path, reference = original_checkpoints[registers]
    x = frames(5)
    backbone = dinov2(path)
    assert backbone.visual_dim == DIM and backbone.language_dim == 0
    assert backbone.encoder.model.shape.num_registers == registers
    ours = backbone.embed_frames(x, ["p"] * len(x))
    expected = reference_cls(reference, x)
    assert ours.shape == (5, DIM) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # frames differ: not trivially equal


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(28, 42), (70, 56)])
def test_original_checkpoint_off_grid_matches_the_reference_interpolation(
    original_checkpoints, registers, size
):
    path, reference = original_checkpoints[registers]
    x = frames(3, *size, seed=1)
    ours = dinov2(path, pos_interpolation="offset").embed_frames(x, ["p"] * 3)
    np.testing.assert_allclose(ours, reference_cls(reference, x), atol=ATOL)
    # The default (antialiased) interpolation is a different table, so a different embedding.
    seed_way = dinov2(path).embed_frames(x, ["p"] * 3)
    assert np.abs(seed_way - ours).max() > 1e-3


def test_batches_do_not_change_embeddings(original_checkpoints):
    backbone = dinov2(original_checkpoints[4][0])
    x = frames(6, 42, 70, seed=2)
    batch = backbone.embed_frames(x, ["p"] * 6)
    alone = np.concatenate([backbone.embed_frames(x[i : i + 1], ["p"]) for i in range(6)])
    np.testing.assert_allclose(batch, alone, atol=1e-5)


def test_training_checkpoint_wrappers_load(original_checkpoints, tmp_path):
    path, reference = original_checkpoints[4]
    state = torch.load(path, weights_only=True)
    wrapped = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, wrapped)
    x = frames(2)
    np.testing.assert_allclose(
        dinov2(wrapped).embed_frames(x, ["p"] * 2), reference_cls(reference, x), atol=ATOL
    )


def test_safetensors_file_loads(original_checkpoints, tmp_path):
    from safetensors.torch import save_file

    path, reference = original_checkpoints[4]
    state = torch.load(path, weights_only=True)
    converted = tmp_path / "vit_reg4.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(converted))
    x = frames(2)
    np.testing.assert_allclose(
        dinov2(converted).embed_frames(x, ["p"] * 2), reference_cls(reference, x), atol=ATOL
    )


# --------------------------------------------------------------------------- HF folders


def hf_model(registers: int, seed: int = 0):
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common = dict(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        image_size=PRETRAIN_SIZE,
        layerscale_value=1e-5,
    )
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        return randomize(Dinov2WithRegistersModel(config), seed)
    return randomize(Dinov2Model(Dinov2Config(**common)), seed)


def hf_cls(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=seed_pixels(x)).pooler_output.numpy()


@pytest.mark.parametrize("size", [(PRETRAIN_SIZE, PRETRAIN_SIZE), (42, 70)])
def test_hf_folder_with_registers_matches_transformers(tmp_path, size):
    model = hf_model(registers=4)
    model.save_pretrained(tmp_path)
    x = frames(3, *size, seed=3)
    backbone = dinov2(tmp_path, num_heads=None)  # heads come from the folder's config
    np.testing.assert_allclose(backbone.embed_frames(x, ["p"] * 3), hf_cls(model, x), atol=ATOL)


def test_hf_folder_plain_matches_transformers_with_its_interpolation(tmp_path):
    model = hf_model(registers=0, seed=5)
    model.save_pretrained(tmp_path)
    x = frames(3, 42, 70, seed=4)
    ours = dinov2(tmp_path, pos_interpolation="bicubic").embed_frames(x, ["p"] * 3)
    np.testing.assert_allclose(ours, hf_cls(model, x), atol=ATOL)


def test_converted_hf_weights_run_in_the_original_code():
    """The HF -> original renaming, checked without our ViT: the reference code runs it."""
    model = hf_model(registers=4, seed=6)
    reference = ReferenceWithRegisters(
        4,
        img_size=PRETRAIN_SIZE,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        init_values=1e-5,
        block_chunks=0,
    ).eval()
    reference.load_state_dict(hf_to_original(model.state_dict()), strict=True)
    x = frames(3)
    np.testing.assert_allclose(reference_cls(reference, x), hf_cls(model, x), atol=ATOL)


# --------------------------------------------------------------------------- preprocessing


def test_native_resolution_center_crops_to_a_multiple_of_the_patch(original_checkpoints):
    path, reference = original_checkpoints[0]
    x = frames(2, 61, 60, seed=5)  # crops to 56x56: 2 rows above, 3 below; 2 columns each side
    ours = dinov2(path).embed_frames(x, ["p"] * 2)
    np.testing.assert_allclose(ours, reference_cls(reference, x[:, 2:58, 2:58]), atol=ATOL)


def test_resize_policy_and_imagenet_normalisation(original_checkpoints):
    path, reference = original_checkpoints[0]
    x = frames(2, 40, 90, seed=6)
    backbone = dinov2(path, resolution="resize", image_size=PRETRAIN_SIZE, normalize="imagenet")
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    t = torch.nn.functional.interpolate(t, size=(56, 56), mode="bicubic", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.forward_features((t.clamp(0, 1) - mean) / std)["x_norm_clstoken"]
    np.testing.assert_allclose(backbone.embed_frames(x, ["p"] * 2), expected.numpy(), atol=ATOL)


def test_concurrent_calls_match_sequential_calls(original_checkpoints):
    """rayrm.embed runs two calls per GPU actor at once (EmbedConfig.calls_per_actor)."""
    backbone = dinov2(original_checkpoints[4][0])
    assert backbone.thread_safe
    batches = [frames(5, 42, 56, seed=s) for s in range(8)]
    sequential = [backbone.embed_frames(x, ["p"] * 5) for x in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda x: backbone.embed_frames(x, ["p"] * 5), batches))
    for a, b in zip(sequential, concurrent):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_compiled_model_pads_odd_batches_to_one_shape(original_checkpoints):
    """options.compile: the first batch fixes the compiled size; shorter and longer batches
    run in padded chunks of it and give the eager model's embeddings."""
    eager = dinov2(original_checkpoints[4][0])
    compiled = dinov2(original_checkpoints[4][0], compile=True)
    for n, seed in ((6, 0), (4, 1), (9, 2)):
        x = frames(n, seed=seed)
        expected = eager.embed_frames(x, ["p"] * n)
        np.testing.assert_allclose(compiled.embed_frames(x, ["p"] * n), expected, atol=1e-4)
    assert compiled.encoder._chunk == 6


def test_read_only_frames_are_accepted(original_checkpoints):
    x = frames(2)
    x.setflags(write=False)  # what Ray Data hands over
    out = dinov2(original_checkpoints[0][0]).embed_frames(x, ["p"] * 2)
    assert out.shape == (2, DIM)


def test_bfloat16_is_close_to_float32(original_checkpoints):
    path = original_checkpoints[4][0]
    x = frames(2)
    fp32 = dinov2(path).embed_frames(x, ["p"] * 2)
    cfg = BackboneConfig(
        name="dinov2", checkpoint=str(path), dtype="bfloat16", options={"num_heads": HEADS}
    )
    backbone = build_backbone(cfg)
    assert backbone.encoder.model.cls_token.dtype == torch.bfloat16
    bf16 = backbone.embed_frames(x, ["p"] * 2)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.15)
    # auto = fp32 on a CPU
    auto = BackboneConfig(name="dinov2", checkpoint=str(path), options={"num_heads": HEADS})
    assert build_backbone(auto).encoder.model.cls_token.dtype == torch.float32


# --------------------------------------------------------------------------- bad input


def test_missing_checkpoint_says_how_to_give_one(tmp_path):
    with pytest.raises(CheckpointError, match="--backbone.checkpoint"):
        build_backbone(BackboneConfig(name="dinov2"))
    with pytest.raises(CheckpointError, match="does not exist"):
        dinov2(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="without config.json"):
        dinov2(tmp_path)


def test_unreadable_checkpoint_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8)))
    with pytest.raises(CheckpointError, match="not a PyTorch state dict"):
        dinov2(garbage)
    pickled = tmp_path / "object.pth"
    torch.save({"model": nn.Linear(2, 2)}, pickled)  # a pickled module, not tensors
    with pytest.raises(CheckpointError, match="weights_only"):
        dinov2(pickled)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a state dict"):
        dinov2(tensor)


def test_wrong_model_lists_what_is_missing(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(2, 4)}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['cls_token', 'pos_embed'"):
        dinov2(path)


def test_missing_and_unexpected_keys_are_listed(original_checkpoints, tmp_path):
    state = torch.load(original_checkpoints[4][0], weights_only=True)
    del state["blocks.1.mlp.fc2.weight"]
    state["blocks.0.mlp.w3.weight"] = torch.zeros(2)  # e.g. a SwiGLU ViT-g key
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        dinov2(path)
    message = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.weight" in message
    assert "unexpected keys (1): blocks.0.mlp.w3.weight" in message


def test_hf_folder_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="not a DINOv2 model"):
        dinov2(tmp_path)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (np.zeros((2, 56, 56), np.uint8), r"RGB \[B, H, W, 3\]"),  # grayscale
        (np.zeros((2, 56, 56, 1), np.uint8), r"RGB \[B, H, W, 3\]"),  # grayscale, channel axis
        (np.zeros((2, 56, 56, 4), np.uint8), r"RGB \[B, H, W, 3\]"),  # RGBA
        (np.zeros((2, 56, 56, 3), np.float32), "uint8"),
        (np.zeros((2, 10, 56, 3), np.uint8), "smaller than one 14x14 patch"),
    ],
)
def test_bad_frames_are_refused(original_checkpoints, bad, reason):
    with pytest.raises(ValueError, match=reason):
        dinov2(original_checkpoints[0][0]).embed_frames(bad, ["p"] * len(bad))


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"resolution": "resize", "image_size": 50}, "multiples of 14"),
        ({"resolution": "resize"}, "needs options.image_size"),
        ({"resolution": "fit"}, "resolution must be one of"),
        ({"normalize": "clip"}, "normalize must be one of"),
        ({"pos_interpolation": "nearest"}, "pos_interpolation must be one of"),
    ],
)
def test_bad_options_are_refused(original_checkpoints, options, reason):
    with pytest.raises(ValueError, match=reason):
        dinov2(original_checkpoints[0][0], **options)


def test_bad_dtype_is_refused(original_checkpoints):
    path = str(original_checkpoints[0][0])
    with pytest.raises(ValueError, match="backbone.dtype"):
        build_backbone(BackboneConfig(name="dinov2", checkpoint=path, dtype="int8"))


# --------------------------------------------------------------------------- end to end


def test_run_embed_with_dinov2_minilm_equals_a_direct_call(
    original_checkpoints, tmp_path, ray_session
):
    """HDF5 -> Ray Data (backbone actor) -> Parquet, with the real MiniLM and a reg4 file."""
    import h5py
    from conftest import make_config

    from rayrm.data.synthetic import write_synthetic_dataset
    from rayrm.embed import run_embed

    backbone_cfg = dict(
        name="dinov2_minilm",
        checkpoint=str(original_checkpoints[4][0]),
        dtype="float32",
        options={"num_heads": HEADS},
    )
    cfg = make_config(tmp_path, backbone=backbone_cfg, synth=dict(num_episodes=3, seed=2))
    write_synthetic_dataset(cfg.synth)  # 32x32 frames: center-cropped to 28x28 (2x2 patches)
    run_embed(cfg)

    backbone = build_backbone(cfg.backbone)
    assert (backbone.visual_dim, backbone.language_dim) == (DIM, 384)
    from rayrm.data.shards import read_episodes

    rows = read_episodes(cfg.embed.output).to_pylist()
    assert len(rows) == 3
    with h5py.File(cfg.embed.input, "r") as f:
        for row in rows:
            raw = f[row["episode_id"]]["side_cam"][()]
            stored = np.asarray(row["visual_embedding"], np.float32).reshape(len(raw), DIM)
            expected = backbone.embed_frames(raw, [row["prompt"]] * len(raw))
            np.testing.assert_allclose(stored, expected, atol=1e-5, err_msg=row["episode_id"])
            language = backbone.embed_prompts([row["prompt"]])[0]
            np.testing.assert_allclose(row["language_embedding"], language, atol=1e-5)
