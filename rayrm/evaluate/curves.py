"""Whole-episode reward curves from a checkpoint, computed in a Ray Data actor.

Three curves per episode (docs/recipe.md#curves); every metric is reported for each:

* ``prefix``: the plain prefix curve; value t = the model's output at the last frame of the
  prefix emb[:t+1] brought to L frames like a training window. What the model actually says.
* ``chained``: the reference pipeline's chaining for long episodes,
  total[t] = p[o] + (1 - p[o]) * p[t] with o = max(t - L + 1, 0) on the prefix values p. Kept for
  comparison only: chaining alone makes even a blind model score VOC 1.0.
* ``causal``: the online reward, computed by the streaming :class:`RewardScorer` fed one
  frame at a time (all episodes of a block stepped together as environments). It only ever sees
  frames 0..t, like the prefix curve, and equals it to float precision: it is computed through
  the other code path so the report shows that what ``rayrm evaluate`` measured is what an RL
  loop gets. (A sliding window of the last L frames was not chosen: ReWiND targets are relative
  to the window start, so such a window would say how far the last L frames went, not how far
  the episode is; that is what chaining tries to patch up.)

SARM models also give the predicted stage per frame (``stage_pred``; argmax of the logits).
Models with a success head give its probability that the task is done at each frame of the
plain prefix curve (``success_pred``).

Wrong instruction (``final_wrong``, recorded episodes only, when given ``instructions`` of at
least 2 tasks): the final value of the plain prefix curve when the episode's frames are paired
with another task's instruction, averaged over all the other tasks (not a random pick, so the
figure is deterministic and uses every task). Beside the true instruction's final value
(``prefix[-1]``) it says whether the model reads the instruction at all; ReWiND's
mismatched-instruction negatives train it to say 0 there.

Rewound episodes (``rewound`` rows): an expert episode played forward up to a turnaround,
then backward over its own frames (its embeddings in reverse order), so the ground-truth
progress rises then falls. A model that sees the task must follow it down; the chained
curve keeps rising (docs/recipe.md#departures-from-the-reference-pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from rayrm.data.shards import EpisodeBatch, episodes_from_table
from rayrm.devices import default_device
from rayrm.evaluate.scorer import RewardScorer
from rayrm.stages import stage_labels, stage_progress
from rayrm.train.checkpoint import load_model
from rayrm.train.windows import prefix_positions

CURVE_KINDS = ("prefix", "chained", "causal")
REWOUND_SUFFIX = "~rewound"

CURVE_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("source_episode", pa.string()),  # the recorded episode the rows' frames come from
        ("kind", pa.string()),  # "episode" or "rewound"
        ("source_file", pa.string()),
        ("prompt", pa.string()),  # the episode's instruction: its task
        ("success", pa.bool_()),
        ("failure_mode", pa.string()),  # why a failure failed, when the data says
        ("num_frames", pa.int32()),
        ("frame_index", pa.list_(pa.int32())),  # frame of the recorded episode at each step
        ("turn", pa.int32()),  # rewound: step of the turnaround; -1 otherwise
        ("stage_boundaries", pa.list_(pa.int32())),
        ("true_progress", pa.list_(pa.float32())),  # empty when unknown (failures)
        ("true_stage", pa.list_(pa.int32())),  # empty when unknown
        # SARM: the progress target from the true stages and the model's priors
        ("true_stage_progress", pa.list_(pa.float32())),
        ("prefix", pa.list_(pa.float32())),
        ("chained", pa.list_(pa.float32())),
        ("causal", pa.list_(pa.float32())),
        ("stage_pred", pa.list_(pa.int32())),  # empty for continuous models
        ("causal_stage_pred", pa.list_(pa.int32())),
        # SARM: the subtask progress head at each prefix's last frame; empty otherwise
        ("subtask_pred", pa.list_(pa.float32())),
        # the success head's "done" probability at each prefix's last frame; empty without one
        ("success_pred", pa.list_(pa.float32())),
        # final prefix value under the other tasks' instructions (mean); null when not scored
        ("final_wrong", pa.float32()),
    ]
)


def chain_curve(prefix: np.ndarray, seq_len: int) -> np.ndarray:
    prefix = np.asarray(prefix, dtype=np.float64)
    origin = np.maximum(np.arange(len(prefix)) - seq_len + 1, 0)
    return prefix[origin] + (1.0 - prefix[origin]) * prefix


def rewind_frames(num_frames: int, turn_share: float, back_share: float) -> tuple[np.ndarray, int]:
    """Frame order of a rewound episode and the step of its turnaround.

    Forward over frames 0..u-1 (u = turn_share * T, at least 2), then backward over
    u-2, u-3, ... for back_share * u frames (at least 1, never below frame 0)."""
    forward = int(np.clip(round(turn_share * num_frames), 2, num_frames))
    back = int(np.clip(round(back_share * forward), 1, forward - 1))
    order = np.concatenate([np.arange(forward), np.arange(forward - 2, forward - 2 - back, -1)])
    return order.astype(np.int32), forward - 1


@torch.no_grad()
def final_values(model, visual: torch.Tensor, languages: torch.Tensor) -> torch.Tensor:
    """Last value of the plain prefix curve of ``visual`` [T, D] under each instruction of
    ``languages`` [N, D_lang]: float32 [N]. The last prefix is the whole episode brought to L
    (``prefix_positions``), read at min(T-1, L-1), exactly as ``prefix_outputs`` does; only
    that one sequence is run, once per instruction, since only the final value is compared."""
    num_frames, seq_len = visual.shape[0], model.cfg.max_seq_len
    last = prefix_positions(num_frames, seq_len, device=visual.device)[-1]
    seqs = visual[last].unsqueeze(0).expand(len(languages), -1, -1)
    language = None if model.language_proj is None else languages
    progress = model.forward_all(seqs, language).progress
    return progress[:, min(num_frames, seq_len) - 1].float()


@dataclass
class Episode:
    """One sequence to score: a recorded episode, or a rewound one built from it."""

    episode_id: str
    source: int  # index in the batch
    kind: str
    frame_index: np.ndarray
    turn: int


def true_stages(
    boundaries: list[int], labels: tuple | None, num_frames: int, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Ground-truth (stage, subtask progress) per frame: the annotated labels, else the
    boundaries when they cover all K stages of a SARM model, else (continuous model: only
    drawn as bands) whatever stages the boundaries show; None without any."""
    if labels is not None and len(labels[0]) == num_frames and np.all(labels[0] >= 0):
        return labels[0].astype(np.int32), labels[1].astype(np.float32)
    if (k > 0 and len(boundaries) == k - 1) or (k == 0 and len(boundaries) > 0):
        return stage_labels(boundaries, num_frames)
    return None


class ModelCurves:
    """The curves of one checkpoint for a batch of episode rows."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int = 256,
        rewind: tuple[float, float] | None = None,
        instructions: dict[str, list[float]] | None = None,
    ):
        device = default_device()
        self.model, config = load_model(checkpoint, device)
        self.blind = bool(config.get("train", {}).get("blind", False))
        self.num_stages = int(getattr(self.model.cfg, "num_stages", 0))
        self.scorer = RewardScorer(self.model, config)
        self.device = device
        self.batch_size = batch_size
        self.rewind = rewind
        # prompt -> language embedding of every task, for the wrong-instruction values
        self.instructions = {p: np.asarray(v, np.float32) for p, v in (instructions or {}).items()}

    def _episodes(self, batch: EpisodeBatch) -> list[Episode]:
        out = []
        for i, episode_id in enumerate(batch.episode_ids):
            length = int(batch.lengths[i])
            out.append(Episode(episode_id, i, "episode", np.arange(length, dtype=np.int32), -1))
            if self.rewind and batch.success[i] is not False:
                order, turn = rewind_frames(length, *self.rewind)
                out.append(Episode(episode_id + REWOUND_SUFFIX, i, "rewound", order, turn))
        return out

    def _as_input(self, values: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(values, np.float32))
        if self.blind:  # the blind control is evaluated on what it was trained on
            tensor = torch.zeros_like(tensor)
        return tensor.to(self.device)

    def _inputs(self, batch: EpisodeBatch, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self._as_input(batch.episode(episode.source)[episode.frame_index])
        return visual, self._as_input(batch.language[episode.source])

    def _final_wrong(self, batch: EpisodeBatch, episode: Episode) -> float | None:
        """Mean final prefix value under every other task's instruction (module docstring);
        None for rewound copies and without at least one other task."""
        own = batch.prompts[episode.source]
        others = [v for p, v in sorted(self.instructions.items()) if p != own]
        if episode.kind != "episode" or not others:
            return None
        visual, _ = self._inputs(batch, episode)
        return float(final_values(self.model, visual, self._as_input(np.stack(others))).mean())

    def _prefix(self, batch: EpisodeBatch, episode: Episode) -> dict[str, np.ndarray | None]:
        visual, language = self._inputs(batch, episode)
        if hasattr(self.model, "prefix_outputs"):
            out = self.model.prefix_outputs(visual, language, self.batch_size)
        else:
            out = {"progress": self.model.prefix_curve(visual, language, self.batch_size)}
        return {k: None if v is None else v.cpu().numpy() for k, v in out.items()}

    def _causal(self, batch: EpisodeBatch, episodes: list[Episode]) -> list[tuple]:
        """All episodes stepped together through the streaming scorer, frame by frame."""
        lengths = np.array([len(e.frame_index) for e in episodes])
        self.scorer.reset(language=np.stack([batch.language[e.source] for e in episodes]))
        progress = [np.zeros(n, np.float32) for n in lengths]
        stages = [np.zeros(n if self.num_stages else 0, np.int32) for n in lengths]
        for t in range(int(lengths.max())):
            active = np.flatnonzero(lengths > t)
            frames = np.stack(
                [batch.episode(episodes[i].source)[episodes[i].frame_index[t]] for i in active]
            )
            values = self.scorer.step(frames, env_ids=active)
            for n, i in enumerate(active):
                progress[i][t] = values[n]
                if self.num_stages:
                    stages[i][t] = self.scorer.last_stage[n]
        return list(zip(progress, stages))

    def _curve_row(
        self, batch: EpisodeBatch, sources: list[str], episode: Episode, prefix: dict, causal
    ) -> dict:
        i, order = episode.source, episode.frame_index
        length = int(batch.lengths[i])
        labels = None
        if batch.stage is not None:
            frames = slice(batch.offsets[i], batch.offsets[i + 1])
            labels = batch.stage[frames], batch.subtask[frames]
        stages = true_stages(batch.stage_boundaries[i], labels, length, self.num_stages)
        known = batch.success[i] is not False  # failures have no (t+1)/T ground truth
        stage_pred = prefix.get("stage")
        return {
            "episode_id": episode.episode_id,
            "source_episode": batch.episode_ids[i],
            "kind": episode.kind,
            "source_file": sources[i],
            "prompt": batch.prompts[i],
            "success": None if episode.kind == "rewound" else batch.success[i],
            "failure_mode": None
            if episode.kind == "rewound" or batch.failure_modes is None
            else batch.failure_modes[i],
            "num_frames": len(order),
            "frame_index": order,
            "turn": episode.turn,
            "stage_boundaries": batch.stage_boundaries[i],
            "true_progress": ((order + 1) / length).astype(np.float32) if known else [],
            "true_stage": stages[0][order] if stages is not None else [],
            "true_stage_progress": self._stage_target(stages, order),
            "prefix": prefix["progress"].astype(np.float32),
            "chained": chain_curve(prefix["progress"], self.model.cfg.max_seq_len).astype(
                np.float32
            ),
            "causal": causal[0],
            "stage_pred": [] if stage_pred is None else stage_pred.astype(np.int32),
            "causal_stage_pred": causal[1],
            "subtask_pred": _values_or_empty(prefix.get("subtask")),
            "success_pred": _values_or_empty(prefix.get("success")),
            "final_wrong": self._final_wrong(batch, episode),
        }

    def _stage_target(self, stages, order: np.ndarray) -> np.ndarray | list:
        if stages is None or not self.num_stages:
            return []
        priors = self.model.stage_prior.cpu().numpy()
        return stage_progress(stages[0][order], stages[1][order], priors).astype(np.float32)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = episodes_from_table(table)
        sources = [""] * len(batch)
        if "source_file" in table.column_names:  # videos read the frames from there
            sources = table.column("source_file").to_pylist()
        episodes = self._episodes(batch)
        causal = self._causal(batch, episodes)
        rows = [
            self._curve_row(batch, sources, e, self._prefix(batch, e), c)
            for e, c in zip(episodes, causal)
        ]
        columns = {name: [r[name] for r in rows] for name in CURVE_SCHEMA.names}
        return pa.Table.from_pydict(columns, schema=CURVE_SCHEMA)


def _values_or_empty(values: np.ndarray | None) -> np.ndarray | list:
    return [] if values is None else values.astype(np.float32)


class CurveScorer:
    """Ray Data callable class: episode rows in, one row of curves per (rewound) episode and
    checkpoint out; ``scorer`` says which checkpoint (index into ``checkpoints``). Several
    checkpoints (the model and its blind control) share one pass over the data."""

    def __init__(
        self,
        checkpoints: list[str],
        batch_size: int = 256,
        rewind: tuple[float, float] | None = None,
        instructions: dict[str, list[float]] | None = None,
    ):
        self.models = [ModelCurves(c, batch_size, rewind, instructions) for c in checkpoints]

    def __call__(self, table: pa.Table) -> pa.Table:
        tables = []
        for index, model in enumerate(self.models):
            curves = model(table)
            scorer = pa.array(np.full(curves.num_rows, index, np.int32))
            tables.append(curves.append_column("scorer", scorer))
        return pa.concat_tables(tables)
