"""Whole-episode reward curves from a checkpoint, computed in a Ray Data actor.

Two curves per episode (SEED-SPEC §6):

* ``prefix``: the plain prefix curve; value i = the model's output at the last frame of the
  prefix emb[:i+1] brought to L frames like a training window. What the model actually says.
* ``chained``: the seed's chaining for long episodes, total[i] = p[o] + (1 - p[o]) * p[i] with
  o = max(i - L + 1, 0) on the prefix predictions p. Kept for comparison with the seed only:
  chaining alone makes even a blind model score VOC 1.0.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rayrm.data.shards import episodes_from_table
from rayrm.train.checkpoint import load_model

CURVE_KINDS = ("prefix", "chained")


def chain_curve(prefix: np.ndarray, seq_len: int) -> np.ndarray:
    prefix = np.asarray(prefix, dtype=np.float64)
    origin = np.maximum(np.arange(len(prefix)) - seq_len + 1, 0)
    return prefix[origin] + (1.0 - prefix[origin]) * prefix


class CurveScorer:
    """Ray Data callable class: episode rows in, one row of curves per episode out."""

    def __init__(self, checkpoint: str, batch_size: int = 256):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, config = load_model(checkpoint, device)
        self.blind = bool(config.get("train", {}).get("blind", False))
        self.device = device
        self.batch_size = batch_size

    def __call__(self, table: pa.Table) -> pa.Table:
        episodes = episodes_from_table(table)
        prefix_curves, chained_curves = [], []
        for i in range(len(episodes)):
            visual = torch.from_numpy(episodes.episode(i)).to(self.device)
            language = torch.from_numpy(episodes.language[i]).to(self.device)
            if self.blind:  # the blind control is evaluated on what it was trained on
                visual, language = torch.zeros_like(visual), torch.zeros_like(language)
            curve = self.model.prefix_curve(visual, language, self.batch_size).cpu().numpy()
            prefix_curves.append(curve.astype(np.float32))
            chained = chain_curve(curve, self.model.cfg.max_seq_len)
            chained_curves.append(chained.astype(np.float32))
        return pa.table(
            {
                "episode_id": episodes.episode_ids,
                "success": pa.array(episodes.success, type=pa.bool_()),
                "num_frames": pa.array(episodes.lengths, type=pa.int32()),
                "prefix": pa.array(prefix_curves, type=pa.list_(pa.float32())),
                "chained": pa.array(chained_curves, type=pa.list_(pa.float32())),
            }
        )
