"""Synthetic robot demonstrations in the raw HDF5 layout (see ``rayrm.data.schema``), or
the same episodes as a LeRobot v3 dataset (``synth.format: lerobot``, see
:func:`write_synthetic_lerobot`).

Each episode shows one task, "put the cube in the pot", from a fixed side camera drawn with
numpy only: a background with a mild vertical gradient, a table strip, a coloured cube on the
left half of the table, an open pot (a U shape) on the right half, and a gripper (a vertical
arm from the top edge ending in two fingers whose gap shows open / closed). ``wrist_cam`` is a
nearest-neighbour close-up around the gripper. The task progress is visible in every frame, so
a reward model can learn it from the pixels alone.

The episode has K = 4 stages of random length in ``[min_stage_frames, max_stage_frames]``;
all motion is cosine-eased so the frames change steadily over time:

=====  =====  ===============================================================================
stage  name   what happens
=====  =====  ===============================================================================
1      reach  the gripper moves from the top (random x) down around the cube, fingers open
2      grasp  the fingers close on the cube, then lift it a little
3      move   gripper and cube travel together along a raised arc to above the pot
4      place  the gripper lowers the cube into the pot, opens, and rises a little
=====  =====  ===============================================================================

A share ``failure_fraction`` of the episodes fails (``success=False``), spread evenly over
three failure modes; ``stage_boundaries`` then only lists the stages actually reached:

============  ==================================================================  ==========
mode          what happens                                                        boundaries
============  ==================================================================  ==========
``none``      success: the cube ends inside the pot                               3
``stall``     the gripper freezes (slight jitter only) somewhere in stage 2 or 3  1 or 2
``drop``      the cube slips out in stage 3 and falls to the table; the gripper   2
              goes on to the pot and lowers / opens there without it
``backward``  in stage 3 the gripper carries the cube back and sets it down       2
              near where it started
============  ==================================================================  ==========

Those three are easy: the motion itself looks wrong. ``synth.failure_modes`` chooses the
modes the failures cycle through (empty: the three above), and two more are hard because the
motion is the expert's own, fluent to the end; both need ``synth.distractor``, a flat tray on
the table between cube and pot in every episode (drawn from a stream of its own, so the rest
of the scene is the same with or without it):

================  ==============================================================  ==========
``wrong_target``  the expert's reach, grasp and arc, but the cube is set down on  2
                  the tray; frames equal the successful twin's until stage 3
``stop_short``    the same, set down on the table just before the pot's wall      2
================  ==============================================================  ==========

Two destinations (``synth.destinations: [pot, tray]``, with ``synth.distractor``): every task
comes twice, "... in the pot." and "... on the tray." (:func:`task_list`); a tray task's expert
sets the cube on the tray (:func:`tray_motion`), its ``wrong_target`` failure puts it in the
pot, frame for frame a pot task's success, and its ``stop_short`` sets it down on the table
just past the tray. So a wrong-target failure differs from a success of the other task only in
the instruction: the hard case of a real multi-task dataset.

Several tasks (``synth.tasks``, a list of cube colours from :data:`CUBE_COLORS`): each
episode shows one of them, told apart only by the cube's colour in the frames and by its
prompt, "Put the <colour> cube in the pot." (``synth.prompt`` is then unused). Scene, stages
and motion are drawn exactly as for one task, so the instruction is the only thing that says
which cube should end in the pot; that is what the wrong-instruction check of
``rayrm evaluate`` needs. Tasks are spread evenly over the successes and over the failures
(:func:`plan_tasks`), shuffled by the seed. Without ``synth.tasks`` every episode is the red
cube with ``synth.prompt``, byte for byte what the generator wrote before tasks existed.

Everything is deterministic: episode ``i`` draws from ``np.random.default_rng([seed, i])``, so
it does not depend on how many episodes come before it. Geometry is in image fractions
(x to the right, y down, both in [0, 1]) and only turned into pixels when drawing, so any
``image_size`` >= 16 works.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from rayrm.config import (
    SYNTH_DESTINATIONS,
    SYNTH_FAILURE_MODES,
    SYNTH_HARD_FAILURE_MODES,
    ConfigError,
    SynthConfig,
)
from rayrm.data import schema
from rayrm.data.lerobot_writer import LeRobotEpisode, write_lerobot_dataset
from rayrm.data.schema import (
    ACTION_KEY,
    ATTR_FAILURE_MODE,
    ATTR_NUM_STAGES,
    ATTR_PROMPT,
    ATTR_STAGE_BOUNDARIES,
    ATTR_SUCCESS,
    CAMERA_KEYS,
    POSE_KEY,
)
from rayrm.errors import UserError

logger = logging.getLogger(__name__)

SIDE_CAM, WRIST_CAM = CAMERA_KEYS
# The cameras' video keys in a synthetic LeRobot dataset (LeRobot's naming convention).
LEROBOT_CAMERAS = {SIDE_CAM: "observation.images.side", WRIST_CAM: "observation.images.wrist"}
LEROBOT_SUCCESS_COLUMN = "success"
NUM_STAGES = 4
SUCCESS_MODE = "none"
FAILURE_MODES = SYNTH_FAILURE_MODES  # the default cycle (synth.failure_modes empty)
HARD_FAILURE_MODES = SYNTH_HARD_FAILURE_MODES
ALL_FAILURE_MODES = (*FAILURE_MODES, *HARD_FAILURE_MODES)
TRAY_HEIGHT = 0.045

# Gripper shape (image fractions). Fingers are longer than the cube so they cover its sides.
ARM_WIDTH = 0.05
PALM_HEIGHT = 0.03
FINGER_WIDTH = 0.025
FINGER_LENGTH = 0.14
POT_WALL = 0.035
GRAVITY = 0.05  # image fractions per frame^2: a dropped cube lands within ~4 frames
GRIPPER_JITTER = 0.0015  # per-frame position noise of a moving gripper
STALL_JITTER = 0.002  # a stalled gripper only trembles around where it stopped
POSE_NOISE = 0.001
WRIST_CROP = 0.45  # side of the wrist close-up, as a fraction of the side view
CUBE_COLORS = {  # base RGB per task colour (jittered per episode); red is the one-task default
    "red": (215, 45, 40),
    "green": (40, 160, 60),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 170),
}
DEFAULT_CUBE = "red"
TASK_PROMPT = "Put the {} cube in the pot."
DESTINATIONS = SYNTH_DESTINATIONS
TRAY_PROMPT = "Put the {}cube on the tray."  # the colour and a space, or nothing
TASK_STREAM = 7919  # seeds the task plan apart from the episodes' own generators
# Gripper pointing down: 180 degrees about x, quaternion scalar-last (qx, qy, qz, qw).
GRIPPER_QUAT = np.array([1.0, 0.0, 0.0, 0.0])


@dataclass(frozen=True)
class Layout:
    """Per-episode scene: where things are, how big, and their (jittered) colours."""

    table_y: float  # table top
    cube_size: float
    cube_x0: float  # cube centre at the start
    pot_x: float  # pot centre
    pot_width: float
    pot_height: float
    gripper_x0: float
    gripper_y0: float  # fingertip height at the start
    colors: dict[str, np.ndarray]  # float32 RGB per part
    tray_x: float = 0.0  # distractor tray centre; width 0 = no tray
    tray_width: float = 0.0

    @property
    def tray_top_y(self) -> float:
        return self.table_y - TRAY_HEIGHT

    @property
    def cube_rest_y(self) -> float:
        return self.table_y - self.cube_size / 2

    @property
    def pot_interior(self) -> tuple[float, float]:
        return (
            self.pot_x - self.pot_width / 2 + POT_WALL,
            self.pot_x + self.pot_width / 2 - POT_WALL,
        )

    @property
    def pot_floor_y(self) -> float:
        return self.table_y - POT_WALL

    @property
    def open_gap(self) -> float:
        return self.cube_size + 0.10

    @property
    def place_gap(self) -> float:
        # Opening inside the pot: as wide as the walls allow, so the fingers stay inside.
        left, right = self.pot_interior
        return min(self.open_gap, right - left - 2 * FINGER_WIDTH - 0.01)


@dataclass
class Motion:
    """Per-frame gripper state: fingertip centre (x, y), finger gap, holding the cube or not."""

    x: np.ndarray
    y: np.ndarray
    gap: np.ndarray
    attached: np.ndarray

    def splice(self, other: Motion, start: int) -> Motion:
        """Frames before ``start`` from self, the rest from ``other``."""
        keep = np.arange(len(self.x)) < start
        return Motion(
            *(np.where(keep, a, b) for a, b in zip(self._arrays(), other._arrays(), strict=True))
        )

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.x, self.y, self.gap, self.attached)


# --------------------------------------------------------------------------- config and plan


def validate_config(cfg: SynthConfig) -> None:
    """Raise ConfigError naming the first synth setting that cannot make a dataset: the
    config's own checks, then the task colours (this module's palette)."""
    cfg.validate()
    if not all(t in CUBE_COLORS for t in cfg.tasks):
        raise ConfigError(f"synth.tasks must be colours of {list(CUBE_COLORS)}, got {cfg.tasks!r}")


def plan_failure_modes(cfg: SynthConfig) -> list[str]:
    """Failure mode of every episode: round(N * fraction) failures, evenly spaced over the
    episode indices (so any contiguous split sees some) and cycling through the modes."""
    n = cfg.num_episodes
    num_failures = int(np.floor(n * cfg.failure_fraction + 0.5))  # round half up
    modes = [SUCCESS_MODE] * n
    for k in range(num_failures):
        cycle = cfg.failure_modes or FAILURE_MODES
        modes[int((k + 0.5) * n / num_failures)] = cycle[k % len(cycle)]
    return modes


def task_list(cfg: SynthConfig) -> list[tuple[str, str, str]]:
    """Every task as (prompt, cube colour, destination): ``synth.prompt`` alone, or one per
    cube colour; each in every destination of ``synth.destinations`` (pot first)."""
    tasks = []
    for destination in cfg.destinations:
        for cube in cfg.tasks or [DEFAULT_CUBE]:
            if destination == "tray":
                prompt = TRAY_PROMPT.format(f"{cube} " if cfg.tasks else "")
            else:
                prompt = TASK_PROMPT.format(cube) if cfg.tasks else cfg.prompt
            tasks.append((prompt, cube, destination))
    return tasks


def task_prompts(cfg: SynthConfig) -> list[str]:
    """The prompt of every task (:func:`task_list`)."""
    return [prompt for prompt, _, _ in task_list(cfg)]


def plan_tasks(cfg: SynthConfig, modes: list[str]) -> list[int]:
    """Task index of every episode. Successes and failures are each dealt round-robin over the
    tasks in an order shuffled by the seed, so every task gets its share of both (a per-task
    report needs successes of each task) and the task is not tied to the episode index."""
    num_tasks = len(task_prompts(cfg))
    tasks = [0] * len(modes)
    if num_tasks == 1:
        return tasks
    rng = np.random.default_rng([cfg.seed, TASK_STREAM])
    dealt = 0
    for success in (True, False):
        group = [i for i, mode in enumerate(modes) if (mode == SUCCESS_MODE) == success]
        for j, i in enumerate(rng.permutation(group)):
            tasks[int(i)] = (dealt + j) % num_tasks
        dealt += len(group)
    return tasks


# --------------------------------------------------------------------------- scene and motion


def _jitter_color(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(
        np.float32
    )


def sample_layout(rng: np.random.Generator, cube: str = DEFAULT_CUBE) -> Layout:
    """Random positions (cube left, pot right) and colours, each jittered a little. The cube
    colour only changes the base RGB, not the draws, so every task has the same scenes."""
    colors = {
        "sky": _jitter_color(rng, (205, 210, 220), 12),
        "table": _jitter_color(rng, (150, 110, 70), 10),
        "cube": _jitter_color(rng, CUBE_COLORS[cube], 12),
        "pot": _jitter_color(rng, (55, 95, 165), 12),
        "arm": _jitter_color(rng, (90, 90, 95), 8),
        "finger": _jitter_color(rng, (45, 45, 50), 8),
    }
    return Layout(
        table_y=0.80 + rng.uniform(-0.02, 0.02),
        cube_size=0.11 + rng.uniform(-0.01, 0.01),
        cube_x0=rng.uniform(0.12, 0.36),
        pot_x=rng.uniform(0.66, 0.80),
        pot_width=0.26 + rng.uniform(-0.01, 0.01),
        pot_height=0.18 + rng.uniform(-0.01, 0.01),
        gripper_x0=rng.uniform(0.2, 0.8),
        gripper_y0=rng.uniform(0.2, 0.3),
        colors=colors,
    )


def add_tray(rng: np.random.Generator, layout: Layout) -> Layout:
    """The distractor: a flat tray on the table between the cube and the pot. Drawn from its
    own stream (``rng`` is not advanced), so a scene is the same with and without it, and
    ``synth.distractor: false`` datasets stay byte for byte what they were."""
    tray_rng = np.random.Generator(rng.bit_generator.jumped())
    pot_left = layout.pot_x - layout.pot_width / 2
    cube_right = layout.cube_x0 + layout.cube_size / 2
    width = layout.cube_size + 0.03
    # Room on the table between tray and pot for a stop-short cube (see hard_failure_motion).
    low = cube_right + width / 2 + 0.01
    high = pot_left - width / 2 - layout.cube_size - 0.05
    # Scenes too tight for a tray between the two move the cube left to make room.
    cube_x0 = layout.cube_x0 if low <= high else layout.cube_x0 - (low - high)
    low = min(low, high)
    colors = {**layout.colors, "tray": _jitter_color(tray_rng, (225, 130, 175), 10)}
    return dataclasses.replace(
        layout,
        cube_x0=max(cube_x0, layout.cube_size / 2 + 0.01),
        tray_x=float(tray_rng.uniform(low, high)),
        tray_width=width,
        colors=colors,
    )


def sample_stage_starts(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, int]:
    """First frame of each of the K stages (starts[0] == 0) and the episode length T."""
    durations = rng.integers(cfg.min_stage_frames, cfg.max_stage_frames + 1, size=NUM_STAGES)
    starts = np.concatenate([[0], np.cumsum(durations)[:-1]])
    return starts, int(durations.sum())


def eased(frames: np.ndarray, keys: list[tuple[float, float]]) -> np.ndarray:
    """Cosine-eased interpolation through (time, value) keys; held constant outside them."""
    times = np.array([t for t, _ in keys], np.float64)
    values = np.array([v for _, v in keys], np.float64)
    idx = np.clip(np.searchsorted(times, frames, side="right") - 1, 0, len(keys) - 2)
    span = np.maximum(times[idx + 1] - times[idx], 1e-9)  # repeated key times are allowed
    u = np.clip((frames - times[idx]) / span, 0.0, 1.0)
    weight = 0.5 - 0.5 * np.cos(np.pi * u)
    return values[idx] + weight * (values[idx + 1] - values[idx])


def carry_draws(rng: np.random.Generator) -> tuple[float, float]:
    """The expert's two random choices: how high the arc rises, and a small x offset at the
    destination (drawn in this order, as before the hard failure modes existed)."""
    peak = rng.uniform(0.08, 0.13)
    return float(peak), float(rng.uniform(-0.01, 0.01))


def carry_motion(
    layout: Layout,
    starts: np.ndarray,
    T: int,
    draws: tuple[float, float],
    dest_x: float,
    floor_y: float,
    release_gap: float,
) -> Motion:
    """Reach, grasp, move along an arc to ``dest_x``, lower the fingertips to ``floor_y``, open
    to ``release_gap`` and rise: the expert's trajectory when the destination is the pot."""
    frames = np.arange(T, dtype=np.float64)
    b1, b2, b3 = (float(s) for s in starts[1:])
    end = float(T - 1)
    closed = b1 + 0.7 * (b2 - b1)  # fingers closed on the cube; the lift follows
    lowered, opened = b3 + 0.45 * (end - b3), b3 + 0.75 * (end - b3)
    grasp_y = layout.table_y  # fingertips on the table
    lift_y = grasp_y - 0.06
    above_pot_y = layout.table_y - layout.pot_height - 0.03
    peak_y = min(lift_y, above_pot_y) - draws[0]
    cube_x, dest_x = layout.cube_x0, dest_x + draws[1]
    # x arrives over the cube before y reaches it, so the fingers come down around the cube.
    x_keys = [(0, layout.gripper_x0), (0.7 * b1, cube_x), (b2, cube_x), (b3, dest_x)]
    y_keys = [(0, layout.gripper_y0), (b1, grasp_y), (closed, grasp_y), (b2, lift_y)]
    y_keys += [((b2 + b3) / 2, peak_y), (b3, above_pot_y), (lowered, floor_y), (opened, floor_y)]
    y_keys += [(end, floor_y - 0.12)]
    gap_keys = [(0, layout.open_gap), (b1, layout.open_gap), (closed, layout.cube_size)]
    gap_keys += [(lowered, layout.cube_size), (opened, release_gap)]
    attached = (frames >= closed) & (frames <= lowered)
    return Motion(eased(frames, x_keys), eased(frames, y_keys), eased(frames, gap_keys), attached)


def success_motion(rng: np.random.Generator, layout: Layout, starts: np.ndarray, T: int) -> Motion:
    """Reach, grasp, move along an arc, place in the pot: the expert's gripper trajectory."""
    draws = carry_draws(rng)
    return carry_motion(
        layout, starts, T, draws, layout.pot_x, layout.pot_floor_y, layout.place_gap
    )


def hard_failure_motion(
    layout: Layout, starts: np.ndarray, T: int, draws: tuple[float, float], mode: str
) -> Motion:
    """The expert's own fluent motion with another destination: ``wrong_target`` sets the cube
    on the tray, ``stop_short`` on the table just before the pot's wall."""
    if mode == "wrong_target":
        return carry_motion(
            layout, starts, T, draws, layout.tray_x, layout.tray_top_y, layout.open_gap
        )
    short_x = layout.pot_x - layout.pot_width / 2 - layout.cube_size / 2 - 0.03
    return carry_motion(layout, starts, T, draws, short_x, layout.table_y, layout.open_gap)


def tray_motion(
    layout: Layout, starts: np.ndarray, T: int, draws: tuple[float, float], mode: str
) -> Motion:
    """The expert's motion when the task's destination is the tray: set on the tray (success,
    and the base the easy failures are made from), into the pot (``wrong_target``: a pot
    task's success, frame for frame), or on the table just past the tray (``stop_short``)."""
    if mode == "wrong_target":
        return carry_motion(
            layout, starts, T, draws, layout.pot_x, layout.pot_floor_y, layout.place_gap
        )
    if mode == "stop_short":  # the room between tray and pot that add_tray keeps free
        pot_wall = layout.pot_x - layout.pot_width / 2
        past_x = (layout.tray_x + layout.tray_width / 2 + pot_wall) / 2
        return carry_motion(layout, starts, T, draws, past_x, layout.table_y, layout.open_gap)
    return carry_motion(layout, starts, T, draws, layout.tray_x, layout.tray_top_y, layout.open_gap)


def stall_motion(rng: np.random.Generator, expert: Motion, stop: int) -> Motion:
    """Hold the state of frame ``stop`` for the rest of the episode, trembling slightly."""
    T = len(expert.x)
    held = Motion(
        np.full(T, expert.x[stop]) + rng.normal(0, STALL_JITTER, T),
        np.full(T, expert.y[stop]) + rng.normal(0, STALL_JITTER, T),
        np.full(T, expert.gap[stop]),
        np.full(T, expert.attached[stop]),
    )
    return expert.splice(held, stop)


def backward_motion(rng: np.random.Generator, layout: Layout, expert: Motion, turn: int) -> Motion:
    """From frame ``turn`` on, carry the cube back and set it down near its start."""
    T = len(expert.x)
    frames = np.arange(T, dtype=np.float64)
    # Key times as shares of the frames left after the turn: rise, back over, down, open, up.
    rise, over, down, opened, up = turn + np.array([0.3, 0.55, 0.75, 0.88, 1.0]) * (T - 1 - turn)
    x0, y0, gap0 = expert.x[turn], expert.y[turn], expert.gap[turn]
    pot_left = layout.pot_x - layout.pot_width / 2
    put_x = float(np.clip(layout.cube_x0 + rng.uniform(-0.04, 0.04), 0.08, pot_left - 0.12))
    table_y, lift_y = layout.table_y, layout.table_y - 0.06
    x = eased(frames, [(turn, x0), (over, put_x)])
    y_keys = [(turn, y0), (rise, min(y0, lift_y) - 0.06), (over, lift_y), (down, table_y)]
    y = eased(frames, [*y_keys, (opened, table_y), (up, table_y - 0.12)])
    gap = eased(frames, [(turn, gap0), (down, gap0), (opened, layout.open_gap)])
    return expert.splice(Motion(x, y, gap, frames <= down), turn)


def drop_frame(rng: np.random.Generator, layout: Layout, expert: Motion, starts: np.ndarray) -> int:
    """A frame in stage 3 where the cube can slip and land on the table, clear of the pot."""
    b2, b3 = int(starts[2]), int(starts[3])
    clear_x = layout.pot_x - layout.pot_width / 2 - layout.cube_size / 2 - 0.02
    inside = np.arange(b2 + 1, b3)
    phase = (inside - b2) / (b3 - b2)
    is_clear = expert.x[inside] < clear_x
    clear = inside[is_clear]
    # Prefer a slip once the cube is well up in the air, but before it nears the pot.
    preferred = inside[is_clear & (phase >= 0.2) & (phase <= 0.6)]
    for candidates in (preferred, clear):
        if len(candidates):
            return int(rng.choice(candidates))
    return b2 + 1


def cube_track(layout: Layout, motion: Motion) -> np.ndarray:
    """Cube centre per frame: follows the fingers while held, otherwise falls onto its
    support (pot floor when inside the pot, else the table). Loops over frames, not pixels."""
    half = layout.cube_size / 2
    left, right = layout.pot_interior
    x, y, vy = layout.cube_x0, layout.cube_rest_y, 0.0
    track = np.empty((len(motion.x), 2), np.float64)
    for t in range(len(motion.x)):
        if motion.attached[t]:
            x, y, vy = float(motion.x[t]), float(motion.y[t]) - half, 0.0
        else:
            in_pot = left <= x - half and x + half <= right
            on_tray = layout.tray_width > 0 and abs(x - layout.tray_x) <= layout.tray_width / 2
            floor = layout.pot_floor_y if in_pot else layout.tray_top_y if on_tray else None
            support = (layout.table_y if floor is None else floor) - half
            vy += GRAVITY
            y = min(y + vy, support)
            vy = 0.0 if y >= support else vy
        track[t] = x, y
    return track


# --------------------------------------------------------------------------- drawing


def _fill(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, rgb: np.ndarray) -> None:
    """Fill an axis-aligned box given in image fractions; at least one pixel wide and high."""
    size = img.shape[0]
    c0, r0 = min(max(round(x0 * size), 0), size - 1), min(max(round(y0 * size), 0), size - 1)
    c1, r1 = max(min(round(x1 * size), size), c0 + 1), max(min(round(y1 * size), size), r0 + 1)
    img[r0:r1, c0:c1] = rgb


def draw_background(layout: Layout, size: int) -> np.ndarray:
    """Static part of the side view: gradient wall, table strip and the pot."""
    shade = np.linspace(1.0, 0.85, size, dtype=np.float32)[:, None, None]  # darker lower down
    img = np.broadcast_to(layout.colors["sky"] * shade, (size, size, 3)).copy()
    _fill(img, 0.0, layout.table_y, 1.0, 1.0, layout.colors["table"])
    left, top = layout.pot_x - layout.pot_width / 2, layout.table_y - layout.pot_height
    right, pot = left + layout.pot_width, layout.colors["pot"]
    _fill(img, left, top, left + POT_WALL, layout.table_y, pot)
    _fill(img, right - POT_WALL, top, right, layout.table_y, pot)
    _fill(img, left, layout.pot_floor_y, right, layout.table_y, pot)
    if layout.tray_width > 0:
        half = layout.tray_width / 2
        tray = layout.colors["tray"]
        _fill(
            img, layout.tray_x - half, layout.tray_top_y, layout.tray_x + half, layout.table_y, tray
        )
    return img


def draw_gripper(img: np.ndarray, x: float, y: float, gap: float, colors: dict) -> None:
    """Arm from the top edge, a palm, and two fingers whose inner edges are ``gap`` apart."""
    palm_y = y - FINGER_LENGTH
    outer = gap / 2 + FINGER_WIDTH
    _fill(img, x - ARM_WIDTH / 2, 0.0, x + ARM_WIDTH / 2, palm_y - PALM_HEIGHT, colors["arm"])
    _fill(img, x - outer, palm_y - PALM_HEIGHT, x + outer, palm_y, colors["arm"])
    _fill(img, x - outer, palm_y, x - gap / 2, y, colors["finger"])
    _fill(img, x + gap / 2, palm_y, x + outer, y, colors["finger"])


def render_side(layout: Layout, motion: Motion, cube_xy: np.ndarray, size: int) -> np.ndarray:
    """Noise-free side view, float32 [T, S, S, 3]."""
    frames = np.empty((len(motion.x), size, size, 3), np.float32)
    frames[:] = draw_background(layout, size)
    half = layout.cube_size / 2
    for t, img in enumerate(frames):
        cx, cy = cube_xy[t]
        _fill(img, cx - half, cy - half, cx + half, cy + half, layout.colors["cube"])
        draw_gripper(img, motion.x[t], motion.y[t], motion.gap[t], layout.colors)
    return frames


def render_wrist(side: np.ndarray, motion: Motion) -> np.ndarray:
    """Close-up around the fingers: a crop of the side view, nearest-neighbour resized."""
    size = side.shape[1]
    box = max(4, round(WRIST_CROP * size))
    steps = np.arange(size) * box // size
    wrist = np.empty_like(side)
    for t in range(len(side)):
        # The crop is centred just above the fingertips and shifted to stay inside the image.
        r0 = int(np.clip(round((motion.y[t] - 0.05) * size) - box // 2, 0, size - box))
        c0 = int(np.clip(round(motion.x[t] * size) - box // 2, 0, size - box))
        wrist[t] = side[t][(r0 + steps)[:, None], (c0 + steps)[None, :]]
    return wrist


def to_uint8(rng: np.random.Generator, frames: np.ndarray, noise: float) -> np.ndarray:
    """Add per-pixel Gaussian noise (std ``noise``) and quantise."""
    noisy = frames + noise * rng.standard_normal(frames.shape, dtype=np.float32)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- proprioception


def pose_and_action(
    rng: np.random.Generator, layout: Layout, motion: Motion
) -> tuple[np.ndarray, np.ndarray]:
    """tcp_pose [T,7] = (x, y, z, quaternion) and action [T,7] = (dpos, drot, gripper)."""
    T = len(motion.x)
    position = np.stack([motion.x, motion.y, layout.table_y - motion.y], axis=1)
    position = position + rng.normal(0, POSE_NOISE, position.shape)
    quat = GRIPPER_QUAT + rng.normal(0, POSE_NOISE, (T, 4))
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    pose = np.concatenate([position, quat], axis=1).astype(np.float32)
    delta = np.diff(pose[:, :3], axis=0, append=pose[-1:, :3])
    delta[-1] = delta[-2] if T > 1 else 0.0  # the last action repeats the one before
    # Gripper command: how closed the fingers are one frame later (0 open, 1 on the cube).
    next_gap = np.append(motion.gap[1:], motion.gap[-1])
    closed = np.clip((layout.open_gap - next_gap) / (layout.open_gap - layout.cube_size), 0, 1)
    action = np.concatenate([delta, np.zeros((T, 3)), closed[:, None]], axis=1)
    return pose, action.astype(np.float32)


# --------------------------------------------------------------------------- episodes


def plan_motion(
    rng: np.random.Generator,
    layout: Layout,
    starts: np.ndarray,
    T: int,
    failure_mode: str,
    destination: str = "pot",
) -> tuple[Motion, np.ndarray]:
    """Gripper motion for the mode and the stage boundaries it actually reaches."""
    draws = carry_draws(rng)
    motion = carry_motion(
        layout, starts, T, draws, layout.pot_x, layout.pot_floor_y, layout.place_gap
    )
    boundaries = starts[1:]
    if destination == "tray":  # the expert's motion to the tray, or a hard failure's
        motion = tray_motion(layout, starts, T, draws, failure_mode)
    if failure_mode in HARD_FAILURE_MODES:  # reached the cube and carried it, to elsewhere
        if destination == "pot":
            motion = hard_failure_motion(layout, starts, T, draws, failure_mode)
        boundaries = starts[1:3]
    elif failure_mode == "stall":
        stage = int(rng.integers(1, 3))  # 0-based: stage 2 or 3
        stop = int(rng.integers(starts[stage] + 1, starts[stage + 1]))
        motion, boundaries = stall_motion(rng, motion, stop), starts[1 : stage + 1]
    elif failure_mode == "drop":
        release = drop_frame(rng, layout, motion, starts)
        motion.attached = motion.attached & (np.arange(T) < release)
        boundaries = starts[1:3]  # nothing left to place: stage 4 is never reached
    elif failure_mode == "backward":
        turn = int(rng.integers(starts[2] + 1, starts[3]))
        motion, boundaries = backward_motion(rng, layout, motion, turn), starts[1:3]
    jitter = rng.normal(0, GRIPPER_JITTER, (2, T))
    motion.x, motion.y = motion.x + jitter[0], motion.y + jitter[1]
    return motion, np.asarray(boundaries, np.int32)


def make_episode(
    rng: np.random.Generator,
    cfg: SynthConfig,
    failure_mode: str,
    cube: str = DEFAULT_CUBE,
    destination: str = "pot",
) -> dict:
    """One episode: camera frames, pose, actions, labels, and the scene facts tests need
    (``cube_xy`` [T,2] cube centre per frame, ``pot_x`` pot centre, ``pot_interior`` its inner
    x-range, ``cube_color`` RGB; all in image fractions).

    Generators in the same state give the same scene, stage lengths and expert motion for every
    ``failure_mode`` and ``cube`` colour, so a failure can be compared frame by frame with its
    successful twin, and one task with another."""
    validate_config(cfg)
    if failure_mode not in (SUCCESS_MODE, *ALL_FAILURE_MODES):
        raise ValueError(f"unknown failure_mode {failure_mode!r}")
    if failure_mode in HARD_FAILURE_MODES and not cfg.distractor:
        raise ValueError(f"failure_mode {failure_mode!r} needs synth.distractor (the tray)")
    if cube not in CUBE_COLORS:
        raise ValueError(f"unknown cube colour {cube!r}; one of {list(CUBE_COLORS)}")
    if destination not in DESTINATIONS or (destination == "tray" and not cfg.distractor):
        raise ValueError(f"destination {destination!r}: one of {DESTINATIONS}; tray needs the tray")
    layout = sample_layout(rng, cube)
    if cfg.distractor:
        layout = add_tray(rng, layout)
    starts, T = sample_stage_starts(rng, cfg)
    motion, boundaries = plan_motion(rng, layout, starts, T, failure_mode, destination)
    cube_xy = cube_track(layout, motion)
    side = render_side(layout, motion, cube_xy, cfg.image_size)
    wrist = render_wrist(side, motion)
    pose, action = pose_and_action(rng, layout, motion)
    return {
        SIDE_CAM: to_uint8(rng, side, cfg.noise),
        WRIST_CAM: to_uint8(rng, wrist, cfg.noise),
        POSE_KEY: pose,
        ACTION_KEY: action,
        "success": failure_mode == SUCCESS_MODE,
        "stage_boundaries": boundaries,
        "failure_mode": failure_mode,
        "cube_xy": cube_xy.astype(np.float32),
        "pot_x": float(layout.pot_x),
        "pot_interior": layout.pot_interior,
        "tray_x": float(layout.tray_x),  # 0 without synth.distractor
        "tray_width": float(layout.tray_width),
        "cube_color": layout.colors["cube"].round().astype(np.uint8),
    }


# --------------------------------------------------------------------------- all episodes


def synthetic_episodes(cfg: SynthConfig):
    """(prompt, episode) of every synthetic episode, in order, as the HDF5 writer makes them."""
    tasks = task_list(cfg)
    modes = plan_failure_modes(cfg)
    chosen = plan_tasks(cfg, modes)
    for index, mode in enumerate(modes):
        rng = np.random.default_rng([cfg.seed, index])
        prompt, cube, destination = tasks[chosen[index]]
        yield prompt, make_episode(rng, cfg, mode, cube, destination)


# --------------------------------------------------------------------------- HDF5 file


def write_episode(group: h5py.Group, episode: dict, prompt: str) -> None:
    """Datasets chunked by up to 16 frames, so 64-frame block reads touch few chunks."""
    T = len(episode[ACTION_KEY])
    for key in (*CAMERA_KEYS, POSE_KEY, ACTION_KEY):
        data = episode[key]
        group.create_dataset(key, data=data, chunks=(min(T, 16), *data.shape[1:]))
    group.attrs[ATTR_PROMPT] = prompt
    group.attrs[ATTR_SUCCESS] = bool(episode["success"])
    group.attrs[ATTR_STAGE_BOUNDARIES] = np.asarray(episode["stage_boundaries"], np.int32)
    group.attrs[ATTR_NUM_STAGES] = NUM_STAGES
    group.attrs[ATTR_FAILURE_MODE] = episode["failure_mode"]


def _write_all(f: h5py.File, cfg: SynthConfig) -> int:
    if not cfg.tasks:  # one task: the file's prompt is every episode's
        f.attrs[ATTR_PROMPT] = cfg.prompt
    total_frames = 0
    episodes = synthetic_episodes(cfg)
    bar = tqdm(
        episodes,
        total=cfg.num_episodes,
        desc="synthetic episodes",
        unit="ep",
        disable=not sys.stderr.isatty(),
    )
    for index, (prompt, episode) in enumerate(bar):
        write_episode(f.create_group(f"episode_{index:04d}"), episode, prompt)
        total_frames += len(episode[ACTION_KEY])
    return total_frames


def write_synthetic_dataset(cfg: SynthConfig, path: str | Path | None = None) -> Path:
    """Write cfg.num_episodes episodes to `path` (default cfg.output) and return the path.

    The file is written under a temporary name in the same folder and moved into place at
    the end, so readers never see a half-written file, even after an exception."""
    validate_config(cfg)
    if path is None and cfg.output is None:
        raise UserError("synth.output must be set when no path is given")
    target = Path(path if path is not None else cfg.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name next to the target: os.replace is atomic within one file system.
    tmp_path = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with h5py.File(tmp_path, "x") as f:
            total_frames = _write_all(f, cfg)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    size = cfg.image_size
    logger.info(
        "wrote %d synthetic episodes (%d frames, %dx%d, %d task(s)) to %s",
        *(cfg.num_episodes, total_frames, size, size, len(task_prompts(cfg)), target),
    )
    return target


# --------------------------------------------------------------------------- LeRobot v3 folder


def write_synthetic_lerobot(cfg: SynthConfig, root: str) -> dict[str, list[int]]:
    """The same episodes as :func:`write_synthetic_dataset`, as a LeRobot v3 dataset under
    the local folder ``root`` (both cameras as videos, ``success`` as an episode column);
    returns the stage JSON of the successful episodes under their LeRobot ids
    (``episode_000007``). (``rayrm.data.lerobot_writer`` itself also writes to URLs.)

    The folder is written beside the target and moved into place at the end, so a crash
    leaves no half-written dataset there. The episodes are held in memory while written (the
    writer encodes each mp4 file whole): fine for synthetic sizes."""
    validate_config(cfg)
    episodes, stages = [], {}
    for index, (prompt, episode) in enumerate(synthetic_episodes(cfg)):
        frames = {LEROBOT_CAMERAS[key]: episode[key] for key in CAMERA_KEYS}
        episodes.append(
            LeRobotEpisode(prompt, frames, bool(episode["success"]), episode[ACTION_KEY])
        )
        boundaries = [int(b) for b in episode["stage_boundaries"]]
        if episode["success"] and len(boundaries) == NUM_STAGES - 1:
            stages[schema.lerobot_episode_id(index)] = boundaries
    target = Path(root)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write_lerobot_dataset(
            str(tmp), episodes, fps=cfg.fps, success_column=LEROBOT_SUCCESS_COLUMN
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d synthetic episodes as a LeRobot v3 dataset to %s", len(episodes), root)
    return stages
