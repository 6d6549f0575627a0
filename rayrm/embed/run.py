"""``rayrm embed``: scan the input, embed what is not committed yet, publish the folder.

The driver plans and commits; it never holds an embedding. It scans the episodes' metadata
(Ray tasks when there are several files), reads back what an earlier attempt committed,
streams the rest through the pipeline (``rayrm.embed.pipeline``) while it receives one small
record per chunk written, and at the end writes the episodes table, the failures table and,
last, the manifest that commits them (layout in ``rayrm.data.schema``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray

from rayrm.backbones.base import backbone_class
from rayrm.config import Config, EmbedConfig
from rayrm.data import schema, storage
from rayrm.data.chunks import commit, episode_index_table, episodes_file_name
from rayrm.data.hdf5 import (
    EpisodeInfo,
    EpisodeProblem,
    InvalidEpisodesError,
    check_state_dims,
    list_hdf5_files,
    merge_scans,
    scan_episodes,
    scan_file,
)
from rayrm.data.lerobot import is_lerobot_root, scan_lerobot
from rayrm.data.sources import check_lerobot_state, read_error
from rayrm.embed.ledger import (
    FAILURES_FILE,
    ChunkLedger,
    RunFolder,
    failure_rows,
    run_dir,
)
from rayrm.embed.pipeline import chunk_dataset
from rayrm.embed.prompts import PromptVectorsTask
from rayrm.throughput import ThroughputLog

logger = logging.getLogger(__name__)

_MAX_SCAN_TASKS = 64


@dataclass
class EmbedResult:
    output: str
    num_episodes: int  # in the output
    num_frames: int  # in the output
    seconds: float
    embedded_frames: int = 0  # by this run (a resumed run skips the earlier ones)
    num_failed: int = 0
    startup_seconds: float = 0.0  # until the first embeddings were written
    driver_bytes: int = 0  # what the driver received from the pipeline (chunk records)

    @property
    def frames_per_second(self) -> float:
        return self.embedded_frames / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------- before any work


def _check_output(output: str, overwrite: bool) -> None:
    """An existing output needs ``overwrite`` (a run of ours in progress resumes instead);
    an unusable location fails here, before any work."""
    storage.check_writable(output, "embed.output")
    manifest = storage.exists(storage.join(output, schema.MANIFEST_NAME))
    unfinished = storage.exists(storage.join(run_dir(output), "run.json"))
    if overwrite or not storage.exists(output) or (unfinished and not manifest):
        return
    if storage.is_file(output) or manifest or storage.listdir(output):
        raise FileExistsError(f"{output} exists; pass --embed.overwrite true to replace it")


def _scan_chunk(
    files: list[str], cameras: list[str], prompt: str | None, state: str | None
) -> list[tuple[list, list]]:
    return [scan_file(file, cameras, prompt, state) for file in files]


def _scan_inputs(
    ecfg: EmbedConfig, files: list[str]
) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    """Every episode's metadata (every camera and the state checked): one file here,
    several in parallel Ray tasks."""
    cameras = ecfg.views()
    if len(files) == 1:
        episodes, problems = scan_episodes(files, cameras, ecfg.prompt, ecfg.state)
    else:
        n_chunks = min(len(files), _MAX_SCAN_TASKS)
        chunks = [files[i::n_chunks] for i in range(n_chunks)]
        task = ray.remote(_scan_chunk)
        args = (cameras, ecfg.prompt, ecfg.state)
        results = ray.get([task.remote(chunk, *args) for chunk in chunks])
        by_file = {f: scan for chunk, res in zip(chunks, results) for f, scan in zip(chunk, res)}
        # file order decides duplicate ids
        episodes, problems = merge_scans(by_file[file] for file in files)
    episodes, mismatched = check_state_dims(episodes, ecfg.state)
    return episodes, problems + mismatched


def _parallel_map(fn, items: list) -> list:
    """``map`` over ``items`` in up to ``_MAX_SCAN_TASKS`` Ray tasks (a single item: here)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    n_chunks = min(len(items), _MAX_SCAN_TASKS)
    task = ray.remote(lambda chunk: [fn(item) for item in chunk])
    results = ray.get([task.remote(items[i::n_chunks]) for i in range(n_chunks)])
    by_item = {}
    for i, chunk in enumerate(results):
        by_item.update(zip(range(i, len(items), n_chunks), chunk))
    return [by_item[i] for i in range(len(items))]


def lerobot_cameras(ecfg: EmbedConfig) -> list[str]:
    """The video keys to read: each an episode of its own with ``camera_as_episode``, else
    the views of one episode."""
    return list(ecfg.cameras) if ecfg.camera_as_episode else ecfg.views()


def _scan_lerobot(ecfg: EmbedConfig) -> tuple[list[EpisodeInfo], list[EpisodeProblem], int]:
    """A LeRobot v3 root: metadata here, the video files' headers probed in Ray tasks."""
    check_lerobot_state(ecfg.input, ecfg.state)
    episodes, failures = scan_lerobot(
        ecfg.input,
        lerobot_cameras(ecfg),
        ecfg.prompt,
        ecfg.success_column,
        mapper=_parallel_map,
        camera_as_episode=ecfg.camera_as_episode,
    )
    return episodes, failures, len({e.source_file for e in episodes})


def _scan(ecfg: EmbedConfig, backbone: str) -> tuple[list[EpisodeInfo], list[EpisodeProblem]]:
    if is_lerobot_root(ecfg.input):
        episodes, failures, num_files = _scan_lerobot(ecfg)
    else:
        files = list_hdf5_files(ecfg.input)
        episodes, failures = _scan_inputs(ecfg, files)
        num_files = len(files)
    for problem in failures:
        logger.warning("%s", problem)
    logger.info(
        "%d episodes (%d frames) in %d file(s), %d failed the checks; backbone '%s'",
        len(episodes),
        sum(e.num_frames for e in episodes),
        num_files,
        failed_episodes(failures),
        backbone,
    )
    return episodes, failures


def embed_settings(cfg: Config) -> dict[str, Any]:
    """What decides the embeddings: a rerun resumes only when these are unchanged."""
    return {
        "format": schema.EMBEDDINGS_FORMAT,
        "backbone": asdict(cfg.backbone),
        "camera": cfg.embed.camera,
        "cameras": list(cfg.embed.cameras),
        "camera_as_episode": cfg.embed.camera_as_episode,
        "state": cfg.embed.state,
        "success_column": cfg.embed.success_column,
        "prompt": cfg.embed.prompt,
    }


def _resume(run: RunFolder, episodes: list[EpisodeInfo], overwrite: bool) -> ChunkLedger:
    """The ledger of what ``run`` committed before (checked against the input)."""
    committed = run.committed()
    ids = set(committed.column("episode_id").to_pylist())
    if run.check_inputs(episodes, ids, overwrite):
        committed = committed.slice(0, 0)
    ledger = ChunkLedger(episodes)
    ledger.add(committed)
    if ledger.complete():
        logger.info(
            "resuming %s: %d episode(s) already embedded", run.output, len(ledger.complete())
        )
    return ledger


# --------------------------------------------------------------------------- embedding


def _embed_episodes(
    cfg: Config,
    run: RunFolder,
    todo: list[EpisodeInfo],
    ledger: ChunkLedger,
    prompt_task,
    throughput,
) -> int:
    """Stream ``todo`` through the pipeline; the bytes of chunk records the driver took in."""
    dataset = chunk_dataset(cfg, todo, storage.absolute(cfg.embed.output), run.run_id)
    received = 0
    # One block prefetched: with two, Ray Data holds the first block back until the second
    # is ready too, so the first embeddings reach the driver late (bench/RESULTS.md).
    for records in dataset.iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=1
    ):
        prompt_task.start()  # no-op after the first batch
        received += records.nbytes
        frames, completed = ledger.add(records)
        throughput.update(frames, completed)
    return received


def _diagnose(episodes: list[EpisodeInfo], ecfg: EmbedConfig) -> list[EpisodeProblem]:
    """Why episodes' frames did not all arrive (the read tasks skip episodes that fail)."""
    if not episodes:
        return []
    cameras, state = ecfg.views(), ecfg.state
    task = ray.remote(read_error)
    reasons = ray.get([task.remote(info, cameras, state) for info in episodes])
    problems = []
    for info, reason in zip(episodes, reasons):
        reason = reason or "frames were not all delivered (a read failed; rerun to retry)"
        key = getattr(info, "camera", None) or "+".join(cameras + ([state] if state else []))
        problems.append(EpisodeProblem(info.source_file, info.episode_id, key, reason))
        logger.warning("%s", problems[-1])
    return problems


def failed_episodes(problems: list[EpisodeProblem]) -> int:
    """Distinct (file, episode) pairs: an episode with two problems is one failed episode."""
    return len({(p.file, p.episode) for p in problems})


# --------------------------------------------------------------------------- publishing


def _check_failures(problems: list[EpisodeProblem], ecfg: EmbedConfig, run: RunFolder) -> None:
    n_failed = failed_episodes(problems)
    if not n_failed:
        return
    if ecfg.max_failed_episodes < 0 or n_failed <= ecfg.max_failed_episodes:
        logger.warning(
            "%d episode(s) failed (allowed: %s); listed in the output's failures table",
            n_failed,
            "any" if ecfg.max_failed_episodes < 0 else ecfg.max_failed_episodes,
        )
        return
    note = (
        f"{n_failed} episode(s) failed, more than embed.max_failed_episodes="
        f"{ecfg.max_failed_episodes}; nothing published. The other episodes are kept in "
        f"{ecfg.output} (failures in {run.path}/{FAILURES_FILE}): fix or remove the bad "
        "input, or raise embed.max_failed_episodes, and rerun to resume."
    )
    raise InvalidEpisodesError(problems, note=note)


def _publish(
    cfg: Config,
    run: RunFolder,
    written: list[EpisodeInfo],
    ledger: ChunkLedger,
    failures: list[EpisodeProblem],
    prompt_task: PromptVectorsTask,
) -> None:
    """Episodes table and failures table under new names, then the manifest: the commit."""
    output = storage.absolute(cfg.embed.output)
    missing = [e.episode_id for e in written if e.episode_id not in ledger.tiles]
    if missing:  # the exactly-once check: every episode that did not fail, tiled once
        raise RuntimeError(f"{len(missing)} episode(s) not fully written, e.g. {missing[:5]}")
    language, visual_dim, language_dim = prompt_task.get()
    episodes_name = episodes_file_name(run.run_id)
    table = episode_index_table(written, language, ledger.tiles)
    storage.write_parquet(table, storage.join(output, episodes_name))
    failures_name = f"{schema.FAILURES_PREFIX}{run.run_id}.json"
    storage.write_json(storage.join(output, failures_name), failure_rows(failures))
    chunks = sorted({c.file for e in written for c in ledger.tiles[e.episode_id]})
    manifest = _manifest(cfg, written, visual_dim, language_dim, failures)
    manifest.update(episodes=episodes_name, failures=failures_name, chunks=chunks)
    manifest["run_id"] = run.run_id
    commit(output, manifest)
    run.remove()


def _manifest(
    cfg: Config, written: list[EpisodeInfo], visual_dim: int, language_dim: int, failures
) -> dict[str, Any]:
    return {
        "format": schema.EMBEDDINGS_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": asdict(cfg.backbone),
        "camera": cfg.embed.views()[0],
        "cameras": list(cfg.embed.cameras),
        "camera_as_episode": cfg.embed.camera_as_episode,
        "frame_layout": frame_layout(cfg.embed, written, visual_dim).to_dict(),
        "visual_dim": int(visual_dim),
        "language_dim": int(language_dim),
        "num_episodes": len(written),
        "num_frames": sum(e.num_frames for e in written),
        "num_failed_episodes": failed_episodes(failures),
        "input_files": sorted({e.source_file for e in written}),
    }


def frame_layout(
    ecfg: EmbedConfig, episodes: list[EpisodeInfo], visual_dim: int
) -> schema.FrameLayout:
    """What each stored frame vector holds: every camera's embedding (one backbone, so one
    dim), then the state (every episode's P is the same: ``check_state_dims``)."""
    cameras = ecfg.views()
    state_dim = max((e.state_dim for e in episodes), default=0) if ecfg.state else 0
    return schema.FrameLayout(
        tuple(cameras), (int(visual_dim),) * len(cameras), ecfg.state, int(state_dim)
    )


# --------------------------------------------------------------------------- the run


def run_embed(cfg: Config) -> EmbedResult:
    """Embed ``cfg.embed.input`` into ``cfg.embed.output`` (both already resolved)."""
    start = time.perf_counter()
    ecfg = cfg.embed
    backbone_class(cfg.backbone.name)  # an unknown name fails here, before any work
    output = storage.absolute(ecfg.output)
    _check_output(output, ecfg.overwrite)
    episodes, failures = _scan(ecfg, cfg.backbone.name)
    prompt_task = PromptVectorsTask(cfg, episodes)
    run = RunFolder(output).open(embed_settings(cfg), ecfg.overwrite)
    try:
        ledger = _resume(run, episodes, ecfg.overwrite)
        todo = [e for e in episodes if e.episode_id not in ledger.tiles]
        throughput = ThroughputLog(todo, len(episodes) - len(todo), ecfg.progress_every_s)
        received = _embed_episodes(cfg, run, todo, ledger, prompt_task, throughput) if todo else 0
        throughput.log()
        failures += list(ledger.problems.values())
        failures += _diagnose(ledger.incomplete(todo), ecfg)
        for problem in ledger.problems.values():
            logger.warning("%s", problem)
        run.write_failures(failures)
        _check_failures(failures, ecfg, run)
        failed = {(p.file, p.episode) for p in failures}
        written = [e for e in episodes if (e.source_file, e.episode_id) not in failed]
        _publish(cfg, run, written, ledger, failures, prompt_task)
    except BaseException:
        with contextlib.suppress(OSError):  # the storage may be what failed
            if not run.has_progress():
                run.remove()
        run.close()
        raise
    result = EmbedResult(
        output=ecfg.output,
        num_episodes=len(written),
        num_frames=sum(e.num_frames for e in written),
        seconds=time.perf_counter() - start,
        embedded_frames=throughput.frames,
        startup_seconds=(throughput.first or throughput.start) - start,
        num_failed=failed_episodes(failures),
        driver_bytes=received,
    )
    logger.info(
        "wrote %d episodes (%d frames; %d embedded now) to %s in %.1f s (%.0f frames/s)",
        result.num_episodes,
        result.num_frames,
        result.embedded_frames,
        result.output,
        result.seconds,
        result.frames_per_second,
    )
    return result
