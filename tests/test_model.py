"""The reward transformer (rayrm.train.model) and its checkpoints (rayrm.train.checkpoint)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rayrm.config import ModelConfig
from rayrm.train.checkpoint import (
    CONFIG,
    TRAIN_STATE,
    WEIGHTS,
    load_model,
    load_train_state,
    read_checkpoint_config,
    save_checkpoint,
)
from rayrm.train.model import RewardTransformer

VISUAL_DIM, LANGUAGE_DIM, SEQ_LEN = 6, 4, 8


def tiny_config(**changes) -> ModelConfig:
    settings = dict(
        d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=SEQ_LEN
    )
    return ModelConfig(**{**settings, **changes})


def tiny_model(language_dim: int = LANGUAGE_DIM, seed: int = 0) -> RewardTransformer:
    torch.manual_seed(seed)
    return RewardTransformer(tiny_config(), VISUAL_DIM, language_dim).eval()


def inputs(batch: int = 3, language_dim: int = LANGUAGE_DIM, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, SEQ_LEN, VISUAL_DIM, generator=g)
    language = torch.randn(batch, language_dim, generator=g) if language_dim else None
    return visual, language


def test_output_shape_and_range():
    model = tiny_model()
    visual, language = inputs(batch=5)
    out = model(visual, language)
    assert out.shape == (5, SEQ_LEN)
    assert torch.all((out > 0) & (out < 1))
    model.train()  # dropout on: still a probability per frame
    out = model(visual, language)
    assert out.shape == (5, SEQ_LEN) and torch.all((out > 0) & (out < 1))


@pytest.mark.parametrize("language_dim", [LANGUAGE_DIM, 0])
@pytest.mark.parametrize("grad", [True, False])  # no_grad takes PyTorch's fused fast path
def test_causal(language_dim, grad):
    model = tiny_model(language_dim)
    visual, language = inputs(language_dim=language_dim)
    with torch.set_grad_enabled(grad):
        before = model(visual, language)
        for k in range(SEQ_LEN):
            changed = visual.clone()
            changed[:, k] += 3.0
            after = model(changed, language)
            torch.testing.assert_close(after[:, :k], before[:, :k], rtol=0, atol=1e-6)
            assert (after[:, k] - before[:, k]).abs().max() > 1e-4  # frame k is seen at k


def _encoder_lengths(model, visual, language) -> list[int]:
    lengths = []
    hook = model.encoder.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        model(visual, language)
    finally:
        hook.remove()
    return lengths


def test_language_token_used():
    model = tiny_model(LANGUAGE_DIM)
    visual, language = inputs()
    assert _encoder_lengths(model, visual, language) == [SEQ_LEN + 1]  # [language] + L frames
    other = model(visual, language + 1.0)
    assert (other - model(visual, language)).abs().min() > 1e-5  # every frame sees it
    with pytest.raises(TypeError):
        model(visual)  # a language model needs its language embedding


def test_no_language_token_without_language():
    model = tiny_model(0)
    visual, _ = inputs(language_dim=0)
    assert model.language_proj is None
    assert _encoder_lengths(model, visual, None) == [SEQ_LEN]
    assert not any(k.startswith("language_proj") for k in model.state_dict())
    torch.testing.assert_close(model(visual), model(visual, None))


def test_input_standardisation_is_stored_as_buffers():
    model = tiny_model()
    buffers = dict(model.named_buffers())
    for name in ("visual_mean", "visual_std", "language_mean", "language_std"):
        assert name in buffers and name in model.state_dict()
    assert not any("mean" in n or "std" in n for n, _ in model.named_parameters())

    visual, language = inputs()
    plain = model(visual, language)
    g = torch.Generator().manual_seed(9)
    v_mean, v_std = torch.randn(VISUAL_DIM, generator=g), torch.rand(VISUAL_DIM, generator=g) + 0.5
    l_mean, l_std = torch.randn(LANGUAGE_DIM, generator=g), torch.rand(LANGUAGE_DIM) + 0.5
    model.set_input_stats(v_mean, v_std, l_mean, l_std)
    torch.testing.assert_close(model.visual_mean, v_mean)
    torch.testing.assert_close(model.language_std, l_std)
    standardised = model(visual, language)
    assert (standardised - plain).abs().max() > 1e-3  # the output depends on the stats
    # exactly: model with stats (m, s) on x == model without stats on (x - m) / s
    fresh = tiny_model()
    expected = fresh((visual - v_mean) / v_std, (language - l_mean) / l_std)
    torch.testing.assert_close(standardised, expected)


def test_constant_features_keep_unit_scale():
    """The blind control's zeros (std 0) must not be divided by zero."""
    model = tiny_model()
    zeros_v, zeros_l = torch.zeros(VISUAL_DIM), torch.zeros(LANGUAGE_DIM)
    model.set_input_stats(zeros_v, zeros_v, zeros_l, zeros_l)
    assert torch.equal(model.visual_std, torch.ones(VISUAL_DIM))
    assert torch.equal(model.language_std, torch.ones(LANGUAGE_DIM))
    out = model(torch.zeros(2, SEQ_LEN, VISUAL_DIM), torch.zeros(2, LANGUAGE_DIM))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("language_dim", [LANGUAGE_DIM, 0])
@pytest.mark.parametrize("num_frames", [5, SEQ_LEN, 21])  # T < L, T = L, T > L
def test_prefix_curve_matches_prefixes_built_by_hand(num_frames, language_dim):
    model = tiny_model(language_dim)
    g = torch.Generator().manual_seed(num_frames)
    frames = torch.randn(num_frames, VISUAL_DIM, generator=g)
    language = torch.randn(language_dim, generator=g) if language_dim else None
    curve = model.prefix_curve(frames, language, batch_size=4)  # several batches
    assert curve.shape == (num_frames,) and curve.dtype == torch.float32
    expected = []
    for i in range(num_frames):
        n = i + 1  # prefix emb[:i+1], brought to L like a training window
        if n <= SEQ_LEN:
            index = list(range(n)) + [n - 1] * (SEQ_LEN - n)
        else:
            index = np.linspace(0, n - 1, SEQ_LEN).astype(int).tolist()
        lang = None if language is None else language[None]
        with torch.no_grad():
            out = model(frames[index][None], lang)[0]
        expected.append(out[min(i, SEQ_LEN - 1)].item())
    np.testing.assert_allclose(curve.numpy(), expected, rtol=1e-5, atol=1e-6)


# --- checkpoints -------------------------------------------------------------------------


def _trained_model_and_optimizer():
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    model.set_input_stats(
        torch.randn(VISUAL_DIM, generator=g),
        torch.rand(VISUAL_DIM, generator=g) + 0.5,
        torch.randn(LANGUAGE_DIM, generator=g),
        torch.rand(LANGUAGE_DIM, generator=g) + 0.5,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-5)
    model.train()
    visual, language = inputs()
    for _ in range(2):
        loss = model(visual, language).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval(), optimizer, scheduler


def test_checkpoint_round_trip(tmp_path):
    model, optimizer, scheduler = _trained_model_and_optimizer()
    path = str(tmp_path / "ckpt")
    meta = {"train": {"blind": False, "lr": 1e-3}, "step": 2, "metrics": {"val_loss": 0.1}}
    save_checkpoint(path, model, meta, optimizer, scheduler)
    assert sorted(os.listdir(path)) == sorted([WEIGHTS, CONFIG, TRAIN_STATE])
    assert (WEIGHTS, CONFIG) == ("model.safetensors", "config.json")

    loaded, config = load_model(path)
    assert not loaded.training
    assert config["visual_dim"] == VISUAL_DIM and config["language_dim"] == LANGUAGE_DIM
    assert config["model"] == vars(model.cfg) and config["step"] == 2
    assert config["train"] == meta["train"] and config["metrics"] == meta["metrics"]
    assert read_checkpoint_config(path) == config
    with open(os.path.join(path, CONFIG)) as f:
        assert json.load(f) == config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    visual, language = inputs(batch=4, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(visual, language), model(visual, language))
    frames = torch.randn(13, VISUAL_DIM)
    assert torch.equal(
        loaded.prefix_curve(frames, language[0]), model.prefix_curve(frames, language[0])
    )

    # train state: tensors and numbers only, loadable without unpickling code
    raw = torch.load(os.path.join(path, TRAIN_STATE), map_location="cpu", weights_only=True)
    state = load_train_state(path)
    assert state["step"] == raw["step"] == 2
    fresh_opt = torch.optim.Adam(loaded.parameters(), lr=1e-3, weight_decay=1e-4)
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh_opt, T_max=10, eta_min=1e-5)
    fresh_sched.load_state_dict(state["scheduler"])
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    for saved, original in zip(fresh_opt.state.values(), optimizer.state.values()):
        assert torch.equal(saved["exp_avg"], original["exp_avg"])


def test_checkpoint_without_optimizer_and_without_language(tmp_path):
    model = tiny_model(language_dim=0)
    save_checkpoint(str(tmp_path), model, {"step": 0})
    assert not os.path.exists(tmp_path / TRAIN_STATE)
    assert load_train_state(str(tmp_path)) is None
    loaded, config = load_model(str(tmp_path))
    assert config["language_dim"] == 0 and loaded.language_proj is None
    visual, _ = inputs(language_dim=0)
    with torch.no_grad():
        assert torch.equal(loaded(visual), model(visual))


def test_checkpoint_meta_cannot_replace_the_model_description(tmp_path):
    with pytest.raises(ValueError, match="model"):
        save_checkpoint(str(tmp_path), tiny_model(), {"model": {"d_model": 64}})


def test_loading_a_folder_without_config_is_a_clear_error(tmp_path):
    model = tiny_model()
    save_checkpoint(str(tmp_path), model, {"step": 1})
    os.remove(tmp_path / CONFIG)
    with pytest.raises(FileNotFoundError, match="not a rayrm checkpoint.*config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- SARM heads


def sarm_model() -> RewardTransformer:
    torch.manual_seed(0)
    model = RewardTransformer(tiny_config(num_stages=4, dropout=0.0), VISUAL_DIM, LANGUAGE_DIM)
    model.set_stage_priors(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    return model.eval()


def test_sarm_progress_is_cumulative_prior_plus_prior_times_subtask():
    model = sarm_model()
    assert model.cumulative_prior.tolist() == pytest.approx([0.0, 0.1, 0.3, 0.6])  # exclusive
    out = model(*inputs(), return_all=True)
    stage = out.stage
    by_hand = (
        torch.tensor([0.0, 0.1, 0.3, 0.6])[stage]
        + torch.tensor([0.1, 0.2, 0.3, 0.4])[stage] * out.subtask
    )
    torch.testing.assert_close(out.progress, by_hand)
    # A given stage conditions the subtask head, and the formula uses that stage.
    given = torch.full_like(stage, 2)
    forced = model(
        *inputs(), stage=given, use_given_stage=torch.ones(3, dtype=torch.bool), return_all=True
    )
    assert (forced.stage == 2).all()
    torch.testing.assert_close(forced.progress, 0.3 + 0.3 * forced.subtask)


def test_stage_logits_are_raw_and_the_loss_is_cross_entropy_plus_mse():
    from rayrm.train.loop import Inputs, window_loss

    model = sarm_model()
    visual, language = inputs()
    out = model(visual, language, return_all=True)
    # Logits, not probabilities: rows do not sum to 1 and take negative values.
    sums = out.stage_logits.sum(-1)
    assert not torch.allclose(sums, torch.ones_like(sums))
    assert (out.stage_logits < 0).any()
    g = torch.Generator().manual_seed(3)
    stage = torch.randint(0, 4, (3, SEQ_LEN), generator=g)
    subtask = torch.rand(3, SEQ_LEN, generator=g)
    batch = Inputs(
        visual=visual,
        language=language,
        progress=torch.zeros(3, SEQ_LEN),
        known=torch.ones(3, dtype=torch.bool),
        done=torch.zeros(3, SEQ_LEN),
        stage=stage,
        subtask=subtask,
    )
    loss, _, got = window_loss(model, batch, gt_stage_prob=1.0)  # every row on the true stage
    expected = torch.nn.functional.cross_entropy(
        got.stage_logits.flatten(0, 1), stage.flatten()
    ) + torch.nn.functional.mse_loss(got.subtask, subtask)
    torch.testing.assert_close(loss, expected)
    assert (got.stage == stage).all()  # the subtask head saw the true stages
