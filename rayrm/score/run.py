"""``rayrm score``: a checkpoint and a dataset in, one reward per frame out, at cluster scale.

The driver plans and commits; the frames' rewards are computed and written by Ray Data
actors (``rayrm.score.pipeline``). It lists the episodes (raw HDF5 / LeRobot v3 input, or
embedding shards) and where each one's frames go (``rayrm.score.frames``), reads back what an
earlier attempt of the same run committed (``rayrm.score.ledger``), streams the other
episodes through the pipeline while it receives one small record per part written and logs a
progress line, and at the end merges the parts into ``rewards.parquet`` (with the RA-BC
weights, which need the whole dataset's deltas) and writes the manifest, the commit record
(layout in ``rayrm.data.schema``, "Per-frame rewards").

Exactly once: every episode is scored into at least one part before the merge (else the run
fails and a rerun resumes), and the merge takes each episode from one part only, then checks
that no two frames share an ``index``. A killed run leaves parts and no manifest; a rerun with
the same settings scores only the episodes no part holds.

The values: ``progress_sparse`` is the causal reward ``RewardScorer`` gives frame by frame,
``prefix`` the prefix curve ``rayrm evaluate`` reports (both from evaluation's
``ModelCurves``), ``stage`` / ``subtask_progress`` SARM's heads. Raw input is embedded from
every camera (and the state) the checkpoint fuses (``rayrm.evaluate.inputs.raw_sources``); a
LeRobot episode is scored as one episode whatever its cameras (``embed.camera_as_episode``
ids, ``episode_000007:<key>``, have no place in LeRobot's index and are refused).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import rayrm
from rayrm.config import Config, to_dict
from rayrm.data import schema, storage
from rayrm.data.lerobot import is_lerobot_root
from rayrm.data.shards import read_episode_index
from rayrm.errors import UserError
from rayrm.runtime import quiet_datasets
from rayrm.score.frames import Placement, hdf5_placement, lerobot_placement, with_rabc
from rayrm.score.ledger import PartLedger, ScoreRun
from rayrm.score.pipeline import part_dataset
from rayrm.throughput import ThroughputLog
from rayrm.train.checkpoint import find_checkpoint, read_checkpoint_config

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    output: str  # the folder
    file: str  # its rewards.parquet
    num_episodes: int
    num_frames: int
    scored_frames: int = 0  # by this run (a resumed run skips the earlier ones)
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.scored_frames / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------- before any work


def _check_output(output: str, overwrite: bool) -> None:
    """A finished output (or a file: the old single-file layout) needs ``overwrite``; an
    unfinished run of ours resumes."""
    storage.check_writable(output, "score.output")
    manifest = storage.join(output, schema.MANIFEST_NAME)
    if storage.is_file(output) or storage.exists(manifest):
        if not overwrite:
            raise FileExistsError(f"{output} exists; pass --score.overwrite true to replace it")
        storage.delete(manifest if storage.is_dir(output) else output)  # readers: not done


def _evaluate_view(cfg: Config) -> Config:
    """``cfg`` with the evaluate section evaluation's readers need to read score's input."""
    scfg = cfg.score
    evaluate = dataclasses.replace(
        cfg.evaluate,
        input=scfg.input,
        embeddings=scfg.embeddings,
        camera=scfg.camera or cfg.evaluate.camera,
        split="all",
        rewind=False,
        batch_size=scfg.batch_size,
    )
    return dataclasses.replace(cfg, evaluate=evaluate)


def _settings(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """What decides the parts' values: a rerun resumes only when these are unchanged (the
    RA-BC settings act at the merge and may change between attempts)."""
    scfg = cfg.score
    return {
        "format": schema.SCORE_FORMAT,
        "checkpoint": storage.absolute(checkpoint),
        "input": scfg.input,
        "embeddings": None if scfg.input else scfg.embeddings,
        "dataset": scfg.dataset,
        "camera": cfg.evaluate.camera,
        "prompt": cfg.evaluate.prompt,
    }


def _episodes(cfg: Config, checkpoint_config: dict) -> tuple[list[str], list[int], list | None]:
    """(ids, frame counts, raw episodes or None) of every episode to score."""
    from rayrm.evaluate.inputs import scan_raw_episodes

    if cfg.score.input:
        raw = scan_raw_episodes(cfg, checkpoint_config, None)
        return [e.episode_id for e in raw], [e.num_frames for e in raw], raw
    index = read_episode_index(cfg.score.embeddings)
    ids = index.column("episode_id").to_pylist()
    return ids, index.column("num_frames").to_pylist(), None


def _placement(cfg: Config, ids: list[str], lengths: list[int]) -> dict[str, Placement]:
    scfg = cfg.score
    root = scfg.input if scfg.input and is_lerobot_root(scfg.input) else scfg.dataset
    if root:
        return lerobot_placement(root, ids, lengths)
    return hdf5_placement(ids, lengths)


# --------------------------------------------------------------------------- scoring


@dataclass
class _Todo:
    episode_id: str
    num_frames: int


def _episode_rows(cfg: Config, checkpoint_config: dict, ids: list[str], raw: list | None):
    """The episodes ``ids`` as whole episode rows (evaluation's readers), and the GPUs the
    embedding actors of raw input take."""
    from rayrm.evaluate.inputs import raw_episode_dataset, shard_episode_dataset

    if raw is None:
        return shard_episode_dataset(cfg.score.embeddings, ids), 0.0
    wanted = set(ids)
    todo = [e for e in raw if e.episode_id in wanted]
    dataset, _ = raw_episode_dataset(cfg, checkpoint_config, todo)
    embed_gpus = max(cfg.embed.num_actors, cfg.embed.max_actors, 1) * cfg.embed.num_gpus_per_actor
    return dataset, embed_gpus


def _score_parts(
    cfg: Config,
    checkpoint: str,
    run: ScoreRun,
    todo: list[str],
    raw: list | None,
    placement: dict[str, Placement],
    ledger: PartLedger,
    throughput: ThroughputLog,
    writer=None,
) -> None:
    checkpoint_config = read_checkpoint_config(checkpoint)
    with quiet_datasets():
        episodes, embed_gpus = _episode_rows(cfg, checkpoint_config, todo, raw)
        wanted = {e: placement[e] for e in todo}
        records = part_dataset(
            episodes, cfg.score, checkpoint, wanted, run.parts_dir, run.run_id, embed_gpus, writer
        )
        for batch in records.iter_batches(batch_size=None, batch_format="pyarrow"):
            throughput.update(*ledger.add(batch))


# --------------------------------------------------------------------------- publishing


def _provenance(cfg: Config, checkpoint: str, dataset: str) -> dict[bytes, bytes]:
    record = {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "rayrm_version": rayrm.__version__,
        "config": to_dict(cfg.score),
    }
    return {
        schema.LEROBOT_REWARD_MODEL_KEY.encode(): checkpoint.encode(),
        schema.SCORE_METADATA_KEY.encode(): json.dumps(record).encode(),
    }


def _publish(cfg: Config, checkpoint: str, run: ScoreRun, ledger: PartLedger) -> int:
    """Merge the parts into ``rewards.parquet``, then the manifest: the commit. Frames."""
    scfg = cfg.score
    missing = ledger.missing()
    if missing:  # every episode in a part, or nothing is published (a rerun resumes)
        raise RuntimeError(f"{len(missing)} episode(s) not scored, e.g. {missing[:5]}")
    frames = run.read_frames(ledger.parts)
    expected = sum(ledger.num_frames.values())
    if frames.num_rows != expected:
        raise RuntimeError(f"the parts hold {frames.num_rows} frames, {expected} expected")
    table = with_rabc(frames, scfg.rabc_chunk, scfg.rabc_kappa)
    dataset = scfg.input or scfg.embeddings
    table = table.replace_schema_metadata(_provenance(cfg, checkpoint, dataset))
    storage.write_parquet(table, storage.join(run.output, schema.SCORE_FILE))
    manifest = {
        "format": schema.SCORE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": run.run_id,
        "file": schema.SCORE_FILE,
        "num_episodes": len(ledger.parts),
        "num_frames": table.num_rows,
        "checkpoint": checkpoint,
        "dataset": dataset,
        "rayrm_version": rayrm.__version__,
    }
    storage.write_json(storage.join(run.output, schema.MANIFEST_NAME), manifest)
    run.remove()
    return table.num_rows


# --------------------------------------------------------------------------- the run


def run_score(cfg: Config, checkpoint: str | None = None, writer=None) -> ScoreResult:
    """Score every episode of ``score.input`` (or of ``score.embeddings``) into the folder
    ``score.output``; nothing is published unless every episode was scored. ``writer``: the
    scoring actor class (tests wrap :class:`rayrm.score.pipeline.PartWriter`)."""
    start = time.perf_counter()
    scfg = cfg.score
    if scfg.rabc_chunk < 0:
        raise UserError(f"score.rabc_chunk must be >= 0, got {scfg.rabc_chunk}")
    checkpoint = (
        checkpoint or scfg.checkpoint or find_checkpoint(cfg.train.output, cfg.train.run_name)
    )
    output = storage.absolute(scfg.output)
    _check_output(output, scfg.overwrite)
    cfg = _evaluate_view(cfg)
    checkpoint_config = read_checkpoint_config(checkpoint)
    ids, lengths, raw = _episodes(cfg, checkpoint_config)
    placement = _placement(cfg, ids, lengths)
    run = ScoreRun(output).open(_settings(cfg, checkpoint), scfg.overwrite)
    ledger = PartLedger(dict(zip(ids, lengths)))
    ledger.add(run.committed())
    if ledger.parts:
        logger.info("resuming %s: %d episode(s) already scored", output, len(ledger.parts))
    todo = ledger.missing()
    todo_frames = [_Todo(e, ledger.num_frames[e]) for e in todo]
    throughput = ThroughputLog(todo_frames, len(ids) - len(todo), scfg.progress_every_s, "scored")
    if todo:
        _score_parts(cfg, checkpoint, run, todo, raw, placement, ledger, throughput, writer)
    throughput.log()
    num_frames = _publish(cfg, checkpoint, run, ledger)
    result = ScoreResult(
        output=scfg.output,
        file=storage.join(scfg.output, schema.SCORE_FILE),
        num_episodes=len(ids),
        num_frames=num_frames,
        scored_frames=throughput.frames,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "wrote %d frames of %d episodes (%d scored now, %.0f frames/s) to %s",
        result.num_frames,
        result.num_episodes,
        result.scored_frames,
        result.frames_per_second,
        result.file,
    )
    return result
