"""``rayrm annotate``: a stage JSON -> ``stage`` / ``subtask_progress`` columns on the shards.

Stage JSON, two forms (boundaries = the first frames of stages 2..K, docs/recipe.md#stages)::

    {"episode_0000": [12, 30, 45], "episode_0001": [10, 25, 41]}           # plain

    {"stages": ["reach", "grasp", "move", "place"],                         # with names
     "episodes": {"episode_0000": [12, 30, 45], "episode_0001": [10, 25, 41]}}

K comes from ``annotate.num_stages``, else the stage names (JSON, else ``annotate.stage_names``),
else the most common boundary count + 1. Everything is checked before anything is written, and
every problem is reported, one line each naming its episode: a value that is not a list of
integers, a wrong boundary count, boundaries outside 1..T-1 or not strictly increasing, episodes
the embeddings do not hold, and episodes of the embeddings the JSON leaves out. The last are
allowed with ``annotate.allow_unannotated`` (failed episodes often can't be fully labelled):
they get empty ``stage`` / ``subtask_progress`` lists and keep their ``stage_boundaries``.

Writing: the labels live in the episodes table (no frame embedding is read or copied). A new
episodes table is written under a new name, then a new manifest (with ``num_stages`` and
``stage_names``) that names it and the same chunk files: writing the manifest is the commit,
so readers see either the old or the new labels, never a mix, on a local path or a URL alike.
Running it again with another JSON replaces the labels.

Run: ``rayrm annotate --config configs/demo_sarm.yaml [--annotate.stages FILE]``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayrm.config import AnnotateConfig
from rayrm.data import schema, storage
from rayrm.data.chunks import commit, episodes_file_name
from rayrm.data.hdf5 import open_hdf5
from rayrm.data.shards import EpisodeReader, read_episode_index, read_manifest
from rayrm.errors import UserError
from rayrm.stages import boundary_problem, stage_labels

logger = logging.getLogger(__name__)


class StageAnnotationError(UserError):
    """A stage JSON that can't label the shards; lists every problem, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n  ".join(problems)
        super().__init__(f"{len(problems)} problem(s) in stage annotations {source}:\n  {lines}")


@dataclass
class StageFile:
    num_stages: int
    stage_names: list[str]
    boundaries: dict[str, list[int]]
    source: str


# --------------------------------------------------------------------------- reading the JSON


def _is_named_form(data: dict) -> bool:
    return isinstance(data.get("episodes"), dict) and set(data) <= {"format", "stages", "episodes"}


def _as_boundaries(value) -> list[int] | None:
    """A JSON value as a list of ints (floats like 12.0 are fine), None if it isn't one."""
    if not isinstance(value, list):
        return None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        if isinstance(v, float) and not v.is_integer():  # also NaN and infinities
            return None
        out.append(int(v))
    return out


def _stage_count(cfg: AnnotateConfig, names: list[str], counts: list[int]) -> int:
    if cfg.num_stages > 0:
        return cfg.num_stages
    if names:
        return len(names)
    if not counts:
        return 1
    # The most common count; a tie goes to the larger one (failures reach fewer stages).
    tally = Counter(counts)
    return max(tally, key=lambda n: (tally[n], n)) + 1


def parse_stage_json(data, cfg: AnnotateConfig, source: str = "stage JSON") -> StageFile:
    """Check the JSON's structure (not yet against the episodes) and settle K and the names."""
    if not isinstance(data, dict):
        raise StageAnnotationError(source, ["top level must be a JSON object"])
    problems: list[str] = []
    names = list(cfg.stage_names)
    episodes = data
    if _is_named_form(data):
        episodes = data["episodes"]
        given = data.get("stages", [])
        if not isinstance(given, list) or not all(isinstance(n, str) and n for n in given):
            problems.append('"stages" must be a list of non-empty stage names')
        elif given:
            names = given
    if len(set(names)) != len(names):
        problems.append(f"stage names {names} are not unique")
    boundaries: dict[str, list[int]] = {}
    for episode, value in episodes.items():
        parsed = _as_boundaries(value)
        if parsed is None:
            problems.append(
                f"episode {episode}: boundaries must be a list of integer frame indices, "
                f"got {json.dumps(value)[:80]}"
            )
        else:
            boundaries[episode] = parsed
    num_stages = _stage_count(cfg, names, [len(b) for b in boundaries.values()])
    if names and len(names) != num_stages:
        problems.append(f"{len(names)} stage names {names} but num_stages={num_stages}")
    if problems:
        raise StageAnnotationError(source, problems)
    names = names or [f"stage_{k + 1}" for k in range(num_stages)]
    return StageFile(num_stages, names, boundaries, source)


def load_stage_json(path: str, cfg: AnnotateConfig) -> StageFile:
    if not storage.exists(path):
        raise FileNotFoundError(f"no stage JSON at {path} (set annotate.stages)")
    with storage.open_input(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise StageAnnotationError(path, [f"not valid JSON: {err}"]) from None
    return parse_stage_json(data, cfg, path)


# --------------------------------------------------------------------------- checking


def check_annotations(
    stages: StageFile, num_frames: dict[str, int], allow_unannotated: bool
) -> list[str]:
    """Every problem of the annotations against the episodes; returns the unannotated ids
    (raises :class:`StageAnnotationError` unless everything is fine)."""
    problems = []
    for episode, boundaries in stages.boundaries.items():
        if episode not in num_frames:
            problems.append(f"episode {episode}: not in the embeddings")
            continue
        reason = boundary_problem(boundaries, num_frames[episode], stages.num_stages)
        if reason:
            problems.append(f"episode {episode}: {reason}")
    unannotated = sorted(set(num_frames) - set(stages.boundaries))
    if not allow_unannotated:
        problems += [
            f"episode {e}: not annotated (set annotate.allow_unannotated to label it with "
            "empty lists)"
            for e in unannotated
        ]
    if problems:
        raise StageAnnotationError(stages.source, problems)
    return unannotated


# --------------------------------------------------------------------------- writing


def label_table(table: pa.Table, boundaries: dict[str, list[int]]) -> pa.Table:
    """The rows with ``stage`` / ``subtask_progress`` (replacing any earlier labels) and, for
    annotated episodes, ``stage_boundaries`` set to the annotation."""
    table = table.drop_columns([c for c in schema.STAGE_COLUMNS if c in table.column_names])
    ids = table.column("episode_id").to_pylist()
    lengths = table.column("num_frames").to_pylist()
    old_boundaries = table.column("stage_boundaries").to_pylist()
    stages, subtasks, new_boundaries = [], [], []
    for episode, num_frames, old in zip(ids, lengths, old_boundaries):
        if episode in boundaries:
            stage, subtask = stage_labels(boundaries[episode], num_frames)
            stages.append(stage)
            subtasks.append(subtask)
            new_boundaries.append(boundaries[episode])
        else:
            stages.append(np.zeros(0, np.int32))
            subtasks.append(np.zeros(0, np.float32))
            new_boundaries.append(old)
    index = table.schema.get_field_index("stage_boundaries")
    field = table.schema.field(index)
    table = table.set_column(index, field, pa.array(new_boundaries, type=field.type))
    for field, values in zip(schema.STAGE_FIELDS, (stages, subtasks)):
        table = table.append_column(field, pa.array(values, type=field.type))
    return table


def _commit_labels(path: str, stages: StageFile, unannotated: list[str]) -> int:
    """A labelled episodes table under a new name, then the manifest naming it (the commit)."""
    reader = EpisodeReader(path)
    table = label_table(reader.index(), stages.boundaries)
    name = episodes_file_name(f"labels-{uuid.uuid4().hex[:8]}")
    storage.write_parquet(table, storage.join(reader.path, name))
    manifest = dict(reader.manifest)
    manifest.update(
        episodes=name,
        num_stages=stages.num_stages,
        stage_names=stages.stage_names,
        stage_annotation={
            "source": storage.absolute(stages.source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "annotated_episodes": len(stages.boundaries),
            "unannotated_episodes": unannotated,
        },
    )
    commit(reader.path, manifest)
    return table.num_rows


@dataclass
class AnnotateResult:
    embeddings: str
    num_stages: int
    stage_names: list[str]
    annotated: int
    unannotated: list[str]


def run_annotate(cfg: AnnotateConfig) -> AnnotateResult:
    """Label ``cfg.embeddings`` in place with ``cfg.stages`` (paths already resolved)."""
    path = cfg.embeddings
    read_manifest(path)  # a clear error for a folder that is not (finished) embeddings
    storage.check_writable(path, "annotate.embeddings")
    stages = load_stage_json(cfg.stages, cfg)
    index = read_episode_index(path)
    num_frames = dict(
        zip(index.column("episode_id").to_pylist(), index.column("num_frames").to_pylist())
    )
    unannotated = check_annotations(stages, num_frames, cfg.allow_unannotated)
    if unannotated:
        logger.warning(
            "%d episode(s) have no stage annotation and get empty labels: %s%s",
            len(unannotated),
            ", ".join(unannotated[:10]),
            " ..." if len(unannotated) > 10 else "",
        )
    rows = _commit_labels(path, stages, unannotated)
    if rows != len(num_frames):
        raise RuntimeError(f"wrote {rows} rows, expected {len(num_frames)}")
    logger.info(
        "labelled %d of %d episodes of %s with K=%d stages (%s)",
        len(stages.boundaries),
        len(num_frames),
        path,
        stages.num_stages,
        ", ".join(stages.stage_names),
    )
    return AnnotateResult(
        path, stages.num_stages, stages.stage_names, len(stages.boundaries), unannotated
    )


# --------------------------------------------------------------------------- synthetic labels


def stage_json_from_hdf5(files: list[str]) -> dict[str, list[int]]:
    """The seed-form stage JSON of the successful episodes whose ``stage_boundaries`` attribute
    covers all their ``num_stages`` stages (what ``rayrm synth`` knows as ground truth)."""
    out: dict[str, list[int]] = {}
    for file in files:
        with open_hdf5(file) as handle:
            for name, group in handle.items():
                attrs = group.attrs
                boundaries = [
                    int(b) for b in np.atleast_1d(attrs.get(schema.ATTR_STAGE_BOUNDARIES, []))
                ]
                num_stages = int(attrs.get(schema.ATTR_NUM_STAGES, len(boundaries) + 1))
                if (
                    bool(attrs.get(schema.ATTR_SUCCESS, False))
                    and len(boundaries) == num_stages - 1
                ):
                    out[name] = boundaries
    return out


def write_stage_json(path: str, boundaries: dict[str, list[int]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(dict(sorted(boundaries.items())), f, indent=1)
    os.replace(tmp, path)
    return path
