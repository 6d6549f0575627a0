"""``rayrm annotate-video``: per episode an mp4 with the frame number on every frame and a
contact sheet, so a person can read off the frames where stages change.

Outputs in ``annotate.video_output``:

=============================  ===========================================================
file                           content
=============================  ===========================================================
``<episode>.mp4``              the ``annotate.camera`` frames, upscaled, "Frame: i" drawn
``<episode>_contact.png``      every ``contact_every``-th frame (and the last), numbered
``stages_template.json``       the stage JSON to fill in (named form, empty boundary lists)
=============================  ===========================================================

The driver only reads metadata; each episode is one Ray task that reads its frames (from the
HDF5 file, or decoded from a LeRobot v3 root's mp4: ``annotate.input`` may be either, with
``annotate.camera`` its video key) and encodes the video, so thousands of episodes spread
over the cluster's CPUs.

Run: ``rayrm annotate-video --config configs/demo.yaml [--annotate.episodes ep1,ep2]``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import ray

from rayrm.config import AnnotateConfig
from rayrm.data import storage
from rayrm.data.hdf5 import EpisodeInfo, InvalidEpisodesError
from rayrm.data.schema import safe_name
from rayrm.data.sources import read_frames, scan_raw_input
from rayrm.errors import UserError
from rayrm.video import contact_sheet, numbered_frames, write_mp4, write_png

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "stages_template.json"
PROMPT_UNUSED = "-"  # the scans want a prompt; videos don't need one


def video_paths(output: str, episode_id: str) -> tuple[str, str]:
    base = os.path.join(output, safe_name(episode_id))
    return f"{base}.mp4", f"{base}_contact.png"


def annotate_episode(info: EpisodeInfo, cfg: AnnotateConfig) -> tuple[str, int]:
    """Ray task: one episode's numbered mp4 and contact sheet; returns (id, frames written)."""
    frames = read_frames(info, cfg.camera)
    # The encoders write local files: on a URL output they go up once written.
    with storage.staged_output(cfg.video_output) as out:
        video, sheet = video_paths(out, info.episode_id)
        written = write_mp4(video, numbered_frames(frames, cfg.min_size), fps=cfg.fps)
        sheet_image = contact_sheet(frames, cfg.contact_every, cfg.contact_columns, cfg.min_size)
        write_png(sheet, sheet_image)
    return info.episode_id, written


def select_episodes(cfg: AnnotateConfig) -> list[EpisodeInfo]:
    episodes, problems = scan_raw_input(cfg.input, cfg.camera, PROMPT_UNUSED)
    if problems:
        raise InvalidEpisodesError(problems)
    if cfg.episodes:
        known = {e.episode_id for e in episodes}
        unknown = [e for e in cfg.episodes if e not in known]
        if unknown:
            raise UserError(f"annotate.episodes not found in {cfg.input}: {', '.join(unknown)}")
        episodes = [e for e in episodes if e.episode_id in set(cfg.episodes)]
    return episodes


def write_template(path: str, episodes: list[EpisodeInfo], stage_names: list[str]) -> None:
    """A stage JSON to fill in; never replaces one that exists (it may hold labels)."""
    if storage.exists(path):
        logger.info("kept the existing %s", path)
        return
    template = {
        "stages": stage_names or ["stage_1", "stage_2"],
        "episodes": {e.episode_id: [] for e in episodes},
    }
    storage.write_json(path, template)


@dataclass
class AnnotateVideoResult:
    output: str
    num_episodes: int
    num_frames: int
    seconds: float


def run_annotate_video(cfg: AnnotateConfig) -> AnnotateVideoResult:
    start = time.perf_counter()
    episodes = select_episodes(cfg)
    storage.check_writable(cfg.video_output, "annotate.video_output")
    logger.info("writing annotation videos of %d episodes to %s", len(episodes), cfg.video_output)
    task = ray.remote(annotate_episode).options(num_cpus=1)
    pending = [task.remote(info, cfg) for info in episodes]
    done, frames, last_log = 0, 0, time.perf_counter()
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(len(pending), 16), timeout=10)
        for _, written in ray.get(ready):
            done, frames = done + 1, frames + written
        if time.perf_counter() - last_log > 10 or not pending:
            logger.info("annotation videos: %d / %d episodes", done, len(episodes))
            last_log = time.perf_counter()
    write_template(storage.join(cfg.video_output, TEMPLATE_NAME), episodes, cfg.stage_names)
    result = AnnotateVideoResult(cfg.video_output, done, frames, time.perf_counter() - start)
    logger.info(
        "wrote %d videos (%d frames) and contact sheets to %s in %.1f s",
        done,
        frames,
        cfg.video_output,
        result.seconds,
    )
    return result
