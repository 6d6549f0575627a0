"""In-context progress estimation with Qwen3-VL (GVL, arXiv:2411.04549) and its answer parser.

One message holds: the task; reference frames of one successful demonstration, in order, each
labelled with its progress ((t+1)/T, rayrm's convention); the numbered target frames of a new
episode; and the instruction to answer only N comma-separated numbers in [0, 1]. The model
answers greedily and :func:`parse_progress` reads the answer as docs/recipe.md#embedding states:

* ``<think>...</think>`` blocks are removed (and, where the chat template opened the block in
  the prompt, everything before the last ``</think>``; an unfinished block yields nothing);
* numbers are extracted in order; a value written with ``%`` or above 1 is divided by 100; then
  clipped to [0, 1];
* too few values: the missing frames are NaN; too many: the extra values are dropped.

One deliberate addition: labels the model may echo ("Frame 3: 0.4") are removed before the
numbers are read, so a frame number is never taken for a progress value.

API: ``ProgressEstimator(checkpoint)(reference_frames, target_frames, task)`` (model loaded
once), or :func:`estimate_progress` for a single call. Command line, on the raw HDF5 layout
(settings: the ``gvl`` section of the config, :class:`rayrm.config.GvlConfig`)::

    rayrm gvl --config configs/qwen3_vl.yaml --gvl.checkpoint /models/Qwen3-VL-8B-Instruct \\
        --gvl.input episodes.h5 --gvl.reference episode_0 --gvl.num_target 16 \\
        --gvl.output progress.json
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rayrm.backbones.base import check_frames
from rayrm.backbones.qwen3_vl import ChatInputs, check_model_folder, load_qwen3_vl, model_inputs
from rayrm.config import ConfigError, GvlConfig
from rayrm.devices import default_device, resolve_dtype
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FRAME_LABEL = re.compile(r"\b(?:target\s+)?(?:frame|image)\s*#?\s*\d+\s*[:=)\-]?", re.IGNORECASE)
# A number not glued to a word or another number ("v2" is no progress value), with its sign
# (a negative value clips to 0) and an optional percent sign.
_NUMBER = re.compile(r"(?<![\w.])(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(%?)")


def strip_thinking(answer: str) -> str:
    answer = _THINK_BLOCK.sub(" ", answer)
    if "</think>" in answer:  # the block was opened by the prompt: keep what follows its end
        answer = answer.rsplit("</think>", 1)[1]
    if "<think>" in answer:  # thinking never finished: what follows is no answer
        answer = answer.split("<think>", 1)[0]
    return answer


def parse_progress(answer: str, num_frames: int) -> np.ndarray:
    """A model's answer -> float32 [num_frames] in [0, 1], NaN where no value was given."""
    text = _FRAME_LABEL.sub(" ", strip_thinking(answer))
    values = []
    for number, percent in _NUMBER.findall(text):
        value = float(number)
        if percent or value > 1:
            value /= 100.0
        values.append(min(max(value, 0.0), 1.0))
    out = np.full(num_frames, np.nan, dtype=np.float32)
    kept = values[:num_frames]
    out[: len(kept)] = kept
    return out


def evenly_spaced(num_frames: int, count: int) -> np.ndarray:
    """``count`` frame indices spread over [0, num_frames - 1] (all frames if fewer)."""
    if num_frames <= count:
        return np.arange(num_frames)
    return np.round(np.linspace(0, num_frames - 1, count)).astype(int)


def gvl_conversation(task: str, reference_progress: Sequence[float], num_targets: int) -> list:
    """The in-context message; one ``{"type": "image"}`` per reference, then per target frame."""
    content: list[dict] = [
        {
            "type": "text",
            "text": (
                f"You are an expert roboticist. The task is: {task}\n"
                "Here are frames of a successful demonstration of this task, in order, each "
                "with its task progress (0 = not started, 1 = complete).\n"
            ),
        }
    ]
    for i, progress in enumerate(reference_progress, start=1):
        content.append({"type": "text", "text": f"Reference frame {i}, progress {progress:.2f}:"})
        content.append({"type": "image"})
    content.append({"type": "text", "text": "\nNow the frames of a new episode, in order.\n"})
    for i in range(1, num_targets + 1):
        content.append({"type": "text", "text": f"Frame {i}:"})
        content.append({"type": "image"})
    content.append(
        {
            "type": "text",
            "text": (
                f"\nEstimate the task progress of each of the {num_targets} new frames. Answer "
                f"only with {num_targets} comma-separated numbers in [0, 1], one per frame in "
                "order, and nothing else."
            ),
        }
    )
    return [{"role": "user", "content": content}]


@dataclass
class ProgressEstimate:
    progress: np.ndarray  # float32 [num_targets], NaN where the answer gave no value
    answer: str  # the model's raw answer


class ProgressEstimator:
    """Loads ``Qwen3VLForConditionalGeneration`` once; each call asks about one episode."""

    def __init__(
        self,
        checkpoint: str,
        device: torch.device | None = None,
        dtype: str = "auto",
        options: dict | None = None,
        max_new_tokens: int | None = None,
    ):
        path = check_model_folder(checkpoint)
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.inputs = ChatInputs(path, options)
        self.model = load_qwen3_vl(path, self.device, self.dtype, generation=True)
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def __call__(
        self,
        reference_frames: np.ndarray,
        target_frames: np.ndarray,
        task: str,
        reference_progress: Sequence[float] | None = None,
    ) -> ProgressEstimate:
        """Frames uint8 [N, H, W, 3]; reference progress defaults to (i+1)/N."""
        check_frames(reference_frames)
        check_frames(target_frames)
        if reference_progress is None:
            reference_progress = (np.arange(len(reference_frames)) + 1) / len(reference_frames)
        conversation = gvl_conversation(task, reference_progress, len(target_frames))
        images = [*reference_frames, *target_frames]
        batch = {k: v.to(self.device) for k, v in self.inputs([conversation], images).items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        answer = self._generate(batch, len(target_frames))
        return ProgressEstimate(parse_progress(answer, len(target_frames)), answer)

    def _generate(self, batch: dict, num_targets: int) -> str:
        # Room for "0.00, " per frame, plus a short thinking block for thinking variants.
        budget = self.max_new_tokens or 64 + 8 * num_targets
        inputs = model_inputs(self.model, batch)
        out = self.model.generate(**inputs, max_new_tokens=budget, do_sample=False)
        new_tokens = out[0, batch["input_ids"].shape[1] :]
        # Special tokens kept: <think> must survive decoding for the parser to remove it.
        return self.inputs.tokenizer.decode(new_tokens, skip_special_tokens=False)


def estimate_progress(
    checkpoint: str,
    reference_frames: np.ndarray,
    target_frames: np.ndarray,
    task: str,
    device: torch.device | None = None,
    dtype: str = "auto",
) -> ProgressEstimate:
    """One-off estimate (loads the model each call: use :class:`ProgressEstimator` for many)."""
    return ProgressEstimator(checkpoint, device, dtype)(reference_frames, target_frames, task)


# --------------------------------------------------------------------------- HDF5 episodes


def _episode(h5file, episode_id: str, camera: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    if episode_id not in h5file:
        raise UserError(f"{h5file.filename}: no episode {episode_id!r}")
    if camera not in h5file[episode_id]:
        raise UserError(f"{h5file.filename}: episode {episode_id} has no camera {camera!r}")
    frames = h5file[episode_id][camera]
    indices = evenly_spaced(len(frames), count)
    return indices, frames[indices.tolist()]


def _prompt(h5file, episode_id: str, override: str | None) -> str:
    prompt = override or h5file[episode_id].attrs.get("prompt") or h5file.attrs.get("prompt")
    if not prompt:
        raise UserError(f"episode {episode_id}: no prompt attribute; set --gvl.prompt")
    return str(prompt)


def estimate_file(
    checkpoint: str,
    h5_path: str,
    reference: str,
    episodes: Sequence[str] | None = None,
    camera: str = "side_cam",
    num_reference: int = 8,
    num_target: int = 16,
    prompt: str | None = None,
    dtype: str = "auto",
    options: dict | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """Progress for episodes of one HDF5 file (default: all but ``reference``), shown one
    successful ``reference`` episode in context. Returns ``{episode_id: {"frame_indices",
    "progress" (None for NaN), "answer"}}``."""
    from rayrm.data.hdf5 import open_hdf5

    estimator = ProgressEstimator(
        checkpoint, dtype=dtype, options=options, max_new_tokens=max_new_tokens
    )
    results = {}
    with open_hdf5(h5_path) as f:
        ref_idx, ref_frames = _episode(f, reference, camera, num_reference)
        ref_progress = (ref_idx + 1) / len(f[reference][camera])
        for episode_id in episodes or [name for name in f if name != reference]:
            indices, frames = _episode(f, episode_id, camera, num_target)
            task = _prompt(f, episode_id, prompt)
            estimate = estimator(ref_frames, frames, task, reference_progress=ref_progress)
            results[episode_id] = {
                "frame_indices": indices.tolist(),
                "progress": [None if np.isnan(v) else float(v) for v in estimate.progress],
                "answer": estimate.answer,
            }
            logger.info("%s: %s", episode_id, results[episode_id]["progress"])
    return results


def run_gvl(cfg: GvlConfig) -> dict:
    """``rayrm gvl``: :func:`estimate_file` with the ``gvl`` settings; the results go to
    ``gvl.output`` as JSON, or to stdout when it is empty."""
    for name in ("checkpoint", "input", "reference"):
        if not getattr(cfg, name):
            raise ConfigError(f"rayrm gvl needs --gvl.{name}")
    results = estimate_file(
        cfg.checkpoint,
        cfg.input,
        cfg.reference,
        episodes=cfg.episodes,
        camera=cfg.camera,
        num_reference=cfg.num_reference,
        num_target=cfg.num_target,
        prompt=cfg.prompt,
        dtype=cfg.dtype,
        options=cfg.options,
        max_new_tokens=cfg.max_new_tokens or None,
    )
    text = json.dumps(results, indent=2)
    if cfg.output:
        with open(cfg.output, "w") as f:
            f.write(text)
        logger.info("progress of %d episodes in %s", len(results), cfg.output)
    else:
        print(text)  # the command's output, not a log line
    return results
