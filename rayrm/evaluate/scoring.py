"""Scoring: every episode to score (and rewound copies of the experts) through one Ray Data
actor (:class:`rayrm.evaluate.curves.CurveScorer`) holding every checkpoint asked for, and
the curves back as one :class:`ScoredEpisodes` per checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from rayrm.config import Config
from rayrm.data.shards import read_manifest
from rayrm.evaluate.curves import CurveScorer
from rayrm.evaluate.inputs import (
    raw_episode_dataset,
    scan_raw_episodes,
    shard_episode_dataset,
    shard_task_vectors,
)
from rayrm.evaluate.report import rows_of_kind
from rayrm.runtime import quiet_datasets
from rayrm.train.checkpoint import read_checkpoint_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredEpisodes(Mapping):
    """One checkpoint's curves of the scored sequences (episodes, then their rewound copies
    too), sorted by id: column name (``curves.CURVE_SCHEMA``) -> one value per sequence. A
    read-only mapping of those columns, so the metric functions read it as plain columns."""

    columns: dict[str, list]

    def __getitem__(self, name: str) -> list:
        return self.columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def num_sequences(self) -> int:
        return len(self.columns["episode_id"])

    def row(self, i: int) -> dict[str, Any]:
        """Sequence ``i``: column name -> its value."""
        return {name: values[i] for name, values in self.columns.items()}

    def indices(self, kind: str) -> list[int]:
        """The sequences of one kind (``episode``, ``rewound``)."""
        return rows_of_kind(self.columns, kind)

    def of_kind(self, kind: str) -> dict[str, list]:
        """The columns of the sequences of one kind only."""
        keep = self.indices(kind)
        return {name: [values[i] for i in keep] for name, values in self.columns.items()}


@dataclass(frozen=True)
class Scores:
    """The model's curves and those of its controls, scored on the same episodes."""

    model: ScoredEpisodes
    blind: ScoredEpisodes | None = None
    success_only: ScoredEpisodes | None = None

    def named(self) -> dict[str, ScoredEpisodes]:
        """``model`` and each control that was scored, by name."""
        found = {"model": self.model, "blind": self.blind, "success_only": self.success_only}
        return {name: scored for name, scored in found.items() if scored is not None}


@dataclass(frozen=True)
class StageCounts:
    """How many stages: the model's stage head has ``model_stages`` (0: a continuous model);
    the task has ``task_stages`` (what tells partial from failed episodes apart); ``names``
    holds ``task_stages`` names."""

    model_stages: int
    task_stages: int
    names: list[str]


def stage_counts(cfg: Config, checkpoint_config: dict, rows: ScoredEpisodes) -> StageCounts:
    """The model's stages from the checkpoint; the task's from the model, else the shards'
    annotation, else the ground-truth boundaries of the successful episodes."""
    model_stages = int(checkpoint_config["model"].get("num_stages", 0) or 0)
    manifest = {}
    if not cfg.evaluate.input and cfg.evaluate.embeddings:
        manifest = read_manifest(cfg.evaluate.embeddings)
    names = checkpoint_config.get("stage_names") or manifest.get("stage_names") or []
    task_stages = model_stages or int(manifest.get("num_stages", 0) or 0)
    if not task_stages:
        counts = [len(b) + 1 for b, s in zip(rows["stage_boundaries"], rows["success"]) if s]
        task_stages = max(counts, default=0)
    names = list(names) + [f"stage {i + 1}" for i in range(len(names), task_stages)]
    return StageCounts(model_stages, task_stages, names)


def wrong_instructions(language: dict[str, Any]) -> dict[str, Any] | None:
    """The instructions to score episodes with as wrong ones, or None (logged) when the check
    cannot be made: fewer than 2 tasks, or no language embedding at all."""
    if len(language) < 2:
        logger.info(
            "wrong-instruction check skipped: it needs >= 2 tasks (distinct prompts); the "
            "evaluated episodes hold %d (%s)",
            *(len(language), ", ".join(repr(p) for p in sorted(language)) or "none"),
        )
        return None
    if all(len(v) == 0 for v in language.values()):
        logger.info("wrong-instruction check skipped: the embeddings hold no language vector")
        return None
    logger.info("wrong-instruction check over %d tasks", len(language))
    return language


def score_episodes(
    cfg: Config, checkpoints: list[str], ids: list[str] | None
) -> list[ScoredEpisodes]:
    """The curves of the episodes ``ids`` (None: all of the raw input) and their rewound
    copies, one :class:`ScoredEpisodes` per checkpoint, in order: all scored in one pass
    over the data."""
    if isinstance(checkpoints, str):
        raise TypeError("score_episodes takes a list of checkpoints: [path]")
    ecfg = cfg.evaluate
    checkpoint_config = read_checkpoint_config(checkpoints[0])
    rewind = (ecfg.rewind_turn, ecfg.rewind_back) if ecfg.rewind else None
    with quiet_datasets():
        if ecfg.input:
            episodes = scan_raw_episodes(cfg, checkpoint_config, ids)
            dataset, language = raw_episode_dataset(cfg, checkpoint_config, episodes)
        else:
            dataset = shard_episode_dataset(ecfg.embeddings, ids)
            language = shard_task_vectors(ecfg.embeddings, ids)
        dataset = dataset.map_batches(
            CurveScorer,
            fn_constructor_kwargs={
                "checkpoints": checkpoints,
                "batch_size": ecfg.batch_size,
                "rewind": rewind,
                "instructions": wrong_instructions(language),
            },
            batch_size=16,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0,
        )
        tables = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    if not tables:
        raise RuntimeError("no episode was scored")
    table = pa.concat_tables(tables)
    return [_checkpoint_curves(table, index, ids) for index in range(len(checkpoints))]


def _checkpoint_curves(table: pa.Table, index: int, ids: list[str] | None) -> ScoredEpisodes:
    """The rows of checkpoint ``index`` (the ``scorer`` column), sorted by episode id."""
    table = table.filter(pc.equal(table.column("scorer"), index)).drop_columns(["scorer"])
    table = table.sort_by("episode_id")
    scored = set(table.column("source_episode").to_pylist())
    if ids is not None and scored != set(ids):
        missing = sorted(set(ids) - scored)[:5]
        raise RuntimeError(f"scored {len(scored)} of {len(set(ids))} episodes; missing {missing}")
    return ScoredEpisodes({name: table.column(name).to_pylist() for name in table.column_names})
