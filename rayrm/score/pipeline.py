"""The Ray Data scoring pipeline: whole episode rows -> actors that score and write parts.

::

    episode rows                    embedding shards (``shard_episode_dataset``), or raw
                                    episodes embedded on the fly (``raw_episode_dataset``:
                                    embed's read tasks and actors, then a groupby per episode)
      -> map_batches(PartWriter)    actor pool (one per free GPU by default, one on CPU): a
                                    call takes ``score.episodes_per_part`` episodes, computes
                                    their curves (``rayrm.evaluate.curves.ModelCurves``: the
                                    causal reward through ``RewardScorer`` and the prefix
                                    curve), writes their frames as one new part file and
                                    hands the driver only the part's records (a few bytes
                                    per episode); restarted by Ray when an actor dies

The actors write for the reason embed's do (``rayrm.embed.pipeline``): the driver learns each
commit as it happens, for the progress line and for what a rerun may skip, and the frames
never travel through the driver until the final merge.
"""

from __future__ import annotations

import warnings

import pyarrow as pa
import ray
import torch

from rayrm.config import ScoreConfig
from rayrm.data import storage
from rayrm.errors import UserError
from rayrm.evaluate.curves import ModelCurves
from rayrm.score.frames import Placement, frame_rows
from rayrm.score.ledger import part_name, part_records


class PartWriter:
    """Ray Data callable class: episode rows in, their frames written as one part file
    (``<folder>/<run id>-<unique>.parquet``), the part's records out."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int,
        placement: dict[str, Placement],
        folder: str,
        run_id: str,
        torch_threads: int = 0,
    ):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.curves = ModelCurves(checkpoint, batch_size)  # no rewound copies, no wrong prompts
        self.placement = placement
        self.folder = folder
        self.run_id = run_id

    def __call__(self, episodes: pa.Table) -> pa.Table:
        frames = frame_rows(self.curves(episodes), self.placement)
        name = part_name(self.run_id)
        storage.write_parquet(frames, storage.join(self.folder, name))
        return part_records(name, frames)


def actor_resources(scfg: ScoreConfig, embed_gpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor): ``score.num_gpus_per_actor`` (default 1 when the cluster
    has GPUs), ``score.num_actors`` (0: one per GPU left over by the embedding actors of raw
    input, ``embed_gpus``; one on CPU)."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    per_actor = scfg.num_gpus_per_actor
    if per_actor is None:
        per_actor = 1.0 if gpus > 0 else 0.0
    if scfg.num_actors > 0:
        return scfg.num_actors, per_actor
    if per_actor <= 0:
        return 1, 0.0
    free = gpus - embed_gpus
    if free < per_actor:
        raise UserError(
            f"score actors need {per_actor} GPU each, and {free:g} of the cluster's {gpus:g} "
            "are left by the embedding actors: lower score.num_gpus_per_actor (e.g. 0.25) "
            "or embed.num_actors"
        )
    return int(free // per_actor), per_actor


def part_dataset(
    episodes: ray.data.Dataset,
    scfg: ScoreConfig,
    checkpoint: str,
    placement: dict[str, Placement],
    folder: str,
    run_id: str,
    embed_gpus: float = 0.0,
    writer=None,
) -> ray.data.Dataset:
    """The episodes scored and written as part files under ``folder``; the dataset's rows
    are the parts' records (``rayrm.score.ledger.PART_RECORD_SCHEMA``). ``writer``: the
    actor class (:class:`PartWriter` unless a test wraps it)."""
    size, gpus = actor_resources(scfg, embed_gpus)
    with warnings.catch_warnings():
        # As in rayrm.embed.pipeline: bounded actor restarts need **ray_remote_args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return episodes.map_batches(
            writer or PartWriter,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "batch_size": scfg.batch_size,
                "placement": placement,
                "folder": folder,
                "run_id": run_id,
                "torch_threads": scfg.torch_threads,
            },
            batch_size=max(1, scfg.episodes_per_part),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_gpus=gpus,
            # CPU actors reserve no CPU, as evaluation's scorer: Ray Data hangs when actors
            # hold every CPU the read tasks need (ray#44687).
            num_cpus=scfg.num_cpus_per_actor,
            max_restarts=scfg.max_actor_restarts,
            max_task_retries=scfg.max_actor_restarts,
        )
