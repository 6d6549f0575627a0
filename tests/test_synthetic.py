"""Tests for the synthetic episode generator (rayrm.data.synthetic)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from rayrm.config import SynthConfig
from rayrm.data import synthetic
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

DATASET_KEYS = (*CAMERA_KEYS, POSE_KEY, ACTION_KEY)


def small_config(**overrides) -> SynthConfig:
    settings = dict(num_episodes=6, image_size=32, failure_fraction=0.5, seed=3)
    return SynthConfig(**{**settings, **overrides})


def episode(mode: str, index: int, **overrides) -> dict:
    cfg = SynthConfig(**overrides)
    return synthetic.make_episode(np.random.default_rng([11, index]), cfg, mode)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{name}/{key}": f[name][key][()] for name in f for key in DATASET_KEYS}


def cube_centroid_x(frame: np.ndarray, cube_color: np.ndarray) -> float:
    """x of the cube-coloured pixels' centroid, as a fraction of the image width."""
    diff = np.abs(frame.astype(np.int16) - cube_color.astype(np.int16))
    cols = np.nonzero((diff < 30).all(axis=-1))[1]
    assert len(cols) > 0, "no cube-coloured pixels in the frame"
    return float((cols.mean() + 0.5) / frame.shape[1])


def test_file_layout(tmp_path: Path) -> None:
    cfg = small_config()
    path = synthetic.write_synthetic_dataset(cfg, tmp_path / "nested" / "eps.h5")
    assert path == tmp_path / "nested" / "eps.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs[ATTR_PROMPT] == cfg.prompt
        assert list(f) == [f"episode_{i:04d}" for i in range(cfg.num_episodes)]
        for group in f.values():
            T = len(group[ACTION_KEY])
            assert 4 * cfg.min_stage_frames <= T
            for cam in CAMERA_KEYS:
                assert group[cam].dtype == np.uint8
                assert group[cam].shape == (T, cfg.image_size, cfg.image_size, 3)
            assert group[POSE_KEY].dtype == np.float32 and group[POSE_KEY].shape == (T, 7)
            assert group[ACTION_KEY].dtype == np.float32 and group[ACTION_KEY].shape == (T, 7)
            assert group.attrs[ATTR_PROMPT] == cfg.prompt
            assert group.attrs[ATTR_NUM_STAGES] == 4
            assert group.attrs[ATTR_STAGE_BOUNDARIES].dtype == np.int32
            success = bool(group.attrs[ATTR_SUCCESS])
            assert success == (group.attrs[ATTR_FAILURE_MODE] == "none")
    assert sorted(p.name for p in path.parent.iterdir()) == ["eps.h5"]  # no temp file left


def test_default_path_is_config_output(tmp_path: Path) -> None:
    target = tmp_path / "raw" / "episodes.h5"
    cfg = small_config(num_episodes=1, output=str(target))
    assert synthetic.write_synthetic_dataset(cfg) == target
    assert target.is_file()


def test_same_seed_gives_identical_arrays(tmp_path: Path) -> None:
    first = read_arrays(synthetic.write_synthetic_dataset(small_config(), tmp_path / "a.h5"))
    second = read_arrays(synthetic.write_synthetic_dataset(small_config(), tmp_path / "b.h5"))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert value.dtype == second[key].dtype
        np.testing.assert_array_equal(value, second[key], err_msg=key)


def test_different_seed_gives_different_episodes(tmp_path: Path) -> None:
    first = read_arrays(synthetic.write_synthetic_dataset(small_config(), tmp_path / "a.h5"))
    other = read_arrays(synthetic.write_synthetic_dataset(small_config(seed=4), tmp_path / "b.h5"))
    key = "episode_0000/side_cam"
    assert first[key].shape != other[key].shape or not np.array_equal(first[key], other[key])


def test_episode_does_not_depend_on_episodes_before_it() -> None:
    cfg = SynthConfig(image_size=32, seed=5)
    a = synthetic.make_episode(np.random.default_rng([cfg.seed, 3]), cfg, "none")
    b = synthetic.make_episode(np.random.default_rng([cfg.seed, 3]), cfg, "none")
    np.testing.assert_array_equal(a["side_cam"], b["side_cam"])
    np.testing.assert_array_equal(a["tcp_pose"], b["tcp_pose"])


@pytest.mark.parametrize(
    ("num_episodes", "fraction", "expected"),
    [(80, 0.3, 24), (10, 0.25, 3), (5, 0.0, 0), (7, 1.0, 7), (1, 0.4, 0)],
)
def test_failure_count_matches_fraction(num_episodes: int, fraction: float, expected: int) -> None:
    cfg = SynthConfig(num_episodes=num_episodes, failure_fraction=fraction)
    modes = synthetic.plan_failure_modes(cfg)
    assert len(modes) == num_episodes
    counts = Counter(m for m in modes if m != "none")
    assert sum(counts.values()) == expected
    if expected >= 3:  # spread evenly: mode counts differ by at most one
        assert set(counts) == set(synthetic.FAILURE_MODES)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_file_labels_follow_the_plan(tmp_path: Path) -> None:
    cfg = small_config(num_episodes=9, failure_fraction=1 / 3)
    path = synthetic.write_synthetic_dataset(cfg, tmp_path / "eps.h5")
    with h5py.File(path, "r") as f:
        modes = [f[name].attrs[ATTR_FAILURE_MODE] for name in f]
        successes = [bool(f[name].attrs[ATTR_SUCCESS]) for name in f]
    assert modes == synthetic.plan_failure_modes(cfg)
    assert sorted(m for m in modes if m != "none") == sorted(synthetic.FAILURE_MODES)
    assert successes == [m == "none" for m in modes]


@pytest.mark.parametrize("index", range(6))
def test_success_has_three_increasing_boundaries(index: int) -> None:
    ep = episode("none", index, image_size=16)
    T, bounds = len(ep[ACTION_KEY]), ep["stage_boundaries"]
    assert ep["success"] is True and ep["failure_mode"] == "none"
    assert len(bounds) == 3
    assert 0 < bounds[0] < bounds[1] < bounds[2] < T
    cfg = SynthConfig()
    durations = np.diff([0, *bounds, T])
    assert ((durations >= cfg.min_stage_frames) & (durations <= cfg.max_stage_frames)).all()


@pytest.mark.parametrize("mode", synthetic.FAILURE_MODES)
def test_failures_store_only_reached_boundaries(mode: str) -> None:
    for index in range(4):
        ep = episode(mode, index, image_size=16)
        bounds = ep["stage_boundaries"]
        assert ep["success"] is False and ep["failure_mode"] == mode
        assert len(bounds) in ((1, 2) if mode == "stall" else (2,))
        assert np.all(np.diff(bounds) > 0) and bounds[0] > 0 and bounds[-1] < len(ep[ACTION_KEY])


@pytest.mark.parametrize("index", range(4))
def test_cube_ends_in_pot_only_for_success(index: int) -> None:
    for mode in ("none", "drop", "backward"):
        ep = episode(mode, index)
        left, right = ep["pot_interior"]
        x = cube_centroid_x(ep["side_cam"][-1], ep["cube_color"])
        assert left < ep["pot_x"] < right
        assert (left < x < right) == (mode == "none"), (mode, x, left, right)


@pytest.mark.parametrize("index", range(4))
def test_dropped_cube_is_never_in_the_pot_and_lands_on_the_table(index: int) -> None:
    ep = episode("drop", index)
    left, right = ep["pot_interior"]
    cube = ep["cube_xy"]
    assert not ((cube[:, 0] > left) & (cube[:, 0] < right)).any()
    assert cube[-1, 1] == pytest.approx(cube[0, 1], abs=1e-5)  # back at table height
    assert cube[:, 1].min() < cube[0, 1] - 0.05  # it was lifted before it fell


def test_backward_puts_cube_down_near_its_start() -> None:
    for index in range(4):
        cube = episode("backward", index)["cube_xy"]
        assert cube[-1, 1] == pytest.approx(cube[0, 1], abs=1e-5)
        assert abs(cube[-1, 0] - cube[0, 0]) < 0.06
        assert cube[:, 0].max() > cube[0, 0] + 0.05  # it was carried towards the pot first


@pytest.mark.parametrize("index", range(4))
def test_stall_follows_the_expert_then_stops(index: int) -> None:
    # The same generator state gives the same scene and expert motion for every mode.
    expert, stall = episode("none", index)[POSE_KEY], episode("stall", index)
    pose = stall[POSE_KEY]
    assert pose.shape == expert.shape  # total length as for a success
    apart = np.abs(pose[:, :2] - expert[:, :2]).max(axis=1) > 0.02
    assert apart.any()
    diverged = int(np.argmax(apart))
    assert diverged > stall["stage_boundaries"][0]  # stopped inside stage 2 or 3
    assert np.ptp(pose[diverged:, :2], axis=0).max() < 0.02  # only jitters from then on


def test_frames_change_steadily_over_success() -> None:
    cfg_noise = SynthConfig().noise
    ep = episode("none", 0)
    frames = ep["side_cam"].astype(np.float32)
    # Two independent noise draws differ by noise * 2 / sqrt(pi) on average.
    noise_only = cfg_noise * 2 / np.sqrt(np.pi)
    assert np.abs(frames[-1] - frames[0]).mean() > noise_only + 3
    clean = episode("none", 0, noise=0.0)["side_cam"].astype(np.float32)
    step_change = np.abs(np.diff(clean, axis=0)).mean(axis=(1, 2, 3))
    assert (step_change > 0).mean() > 0.8  # the picture moves in nearly every frame
    cube_x = [cube_centroid_x(f, ep["cube_color"]) for f in ep["side_cam"]]
    assert np.all(np.diff(cube_x) > -0.05)  # the cube only ever travels towards the pot


def test_pose_and_action_are_consistent() -> None:
    ep = episode("none", 1)
    pose, action = ep[POSE_KEY], ep[ACTION_KEY]
    np.testing.assert_allclose(action[:-1, :3], np.diff(pose[:, :3], axis=0), atol=1e-6)
    np.testing.assert_array_equal(action[-1], action[-2])
    np.testing.assert_allclose(np.linalg.norm(pose[:, 3:], axis=1), 1.0, atol=1e-5)
    assert ((pose[:, :2] >= 0) & (pose[:, :2] <= 1)).all()
    gripper = action[:, 6]
    assert gripper.min() == pytest.approx(0.0, abs=1e-6) and gripper.max() > 0.99


@pytest.mark.parametrize("size", [16, 32, 224])
def test_any_image_size(size: int) -> None:
    ep = episode("drop", 2, image_size=size)
    T = len(ep[ACTION_KEY])
    for cam in CAMERA_KEYS:
        assert ep[cam].shape == (T, size, size, 3) and ep[cam].dtype == np.uint8
    assert ep["side_cam"].std() > 10  # a drawn scene, not a blank frame


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "eps.h5"
    path.write_bytes(b"previous dataset")
    real_make_episode = synthetic.make_episode
    calls = []

    def failing_make_episode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_make_episode(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_episode", failing_make_episode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthetic.write_synthetic_dataset(small_config(), path)
    assert path.read_bytes() == b"previous dataset"  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["eps.h5"]  # temp file removed

    new_path = tmp_path / "new.h5"
    calls.clear()
    with pytest.raises(RuntimeError):
        synthetic.write_synthetic_dataset(small_config(), new_path)
    assert not new_path.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_episodes", 0),
        ("image_size", 8),
        ("failure_fraction", 1.5),
        ("failure_fraction", -0.1),
        ("min_stage_frames", 1),
        ("max_stage_frames", 3),
    ],
)
def test_invalid_config_raises(tmp_path: Path, field: str, value: object) -> None:
    cfg = small_config(**{"min_stage_frames": 4, field: value})
    with pytest.raises(ValueError, match=field):
        synthetic.write_synthetic_dataset(cfg, tmp_path / "eps.h5")
    assert list(tmp_path.iterdir()) == []


def test_unknown_failure_mode_raises() -> None:
    with pytest.raises(ValueError, match="failure_mode"):
        synthetic.make_episode(np.random.default_rng(0), SynthConfig(), "explode")


# --------------------------------------------------------------------------- hard failures


def tray_range(ep: dict) -> tuple[float, float]:
    return ep["tray_x"] - ep["tray_width"] / 2, ep["tray_x"] + ep["tray_width"] / 2


@pytest.mark.parametrize("index", range(6))
def test_wrong_target_is_the_expert_until_it_carries_the_cube_onto_the_tray(index: int) -> None:
    success = episode("none", index, distractor=True)
    wrong = episode("wrong_target", index, distractor=True)
    assert success[ACTION_KEY].shape == wrong[ACTION_KEY].shape
    # Same scene (tray included), same reach and grasp: frames equal until the carry starts.
    grasped = int(wrong["stage_boundaries"][1])
    np.testing.assert_array_equal(success["side_cam"][:grasped], wrong["side_cam"][:grasped])
    left, right = success["pot_interior"]
    tray_left, tray_right = tray_range(wrong)
    end = wrong["cube_xy"][-1]
    assert tray_left < end[0] < tray_right and not left < end[0] < right
    assert end[1] < wrong["cube_xy"][0, 1] - 0.02  # resting on the tray, above the table
    assert left < success["cube_xy"][-1, 0] < right  # the twin success still ends in the pot
    x = cube_centroid_x(wrong["side_cam"][-1], wrong["cube_color"])  # and the pixels agree
    assert tray_left < x < tray_right
    # Fluent: the cube is held all the way (never dropped), lifted before it is set down.
    assert wrong["cube_xy"][:, 1].min() < end[1] - 0.1


@pytest.mark.parametrize("index", range(6))
def test_stop_short_sets_the_cube_down_just_before_the_pot(index: int) -> None:
    ep = episode("stop_short", index, distractor=True)
    left, _ = ep["pot_interior"]
    pot_left = ep["pot_x"] - (ep["pot_x"] - left) - synthetic.POT_WALL
    end = ep["cube_xy"][-1]
    assert end[0] < pot_left  # outside the pot...
    assert pot_left - end[0] < 0.12  # ...but close to its wall
    assert end[0] > ep["tray_x"] + ep["tray_width"] / 2  # past the tray, on the table
    assert end[1] == pytest.approx(ep["cube_xy"][0, 1], abs=1e-5)
    assert list(ep["stage_boundaries"]) == list(episode("none", index)["stage_boundaries"][:2])


def test_the_distractor_tray_sits_between_cube_and_pot_in_every_episode() -> None:
    for index in range(8):
        ep = episode("none", index, distractor=True)
        tray_left, tray_right = tray_range(ep)
        cube_right = ep["cube_xy"][0, 0] + 0.06
        pot_left = ep["pot_interior"][0] - synthetic.POT_WALL
        assert cube_right < tray_left and tray_right < pot_left, (index, tray_left, tray_right)
        column = int(ep["tray_x"] * 64)  # SynthConfig's default 64 px
        first = ep["side_cam"][0].astype(np.int16)
        plain = synthetic.make_episode(np.random.default_rng([11, index]), SynthConfig(), "none")
        without = plain["side_cam"][0].astype(np.int16)
        assert np.abs(first[:, column] - without[:, column]).max() > 40  # the tray is drawn


def test_failure_modes_are_chosen_in_config_and_hard_ones_need_the_tray() -> None:
    cfg = small_config(num_episodes=8, failure_modes=["wrong_target", "stop_short"])
    with pytest.raises(ValueError, match="synth.distractor"):
        synthetic.validate_config(cfg)
    cfg = small_config(
        num_episodes=8, failure_modes=["wrong_target", "stop_short"], distractor=True
    )
    counts = Counter(synthetic.plan_failure_modes(cfg))
    assert counts == {"none": 4, "wrong_target": 2, "stop_short": 2}
    with pytest.raises(ValueError, match="failure_modes"):
        synthetic.validate_config(small_config(failure_modes=["teleport"]))


def tray_episode(mode: str, index: int) -> dict:
    cfg = SynthConfig(distractor=True, destinations=["pot", "tray"])
    return synthetic.make_episode(np.random.default_rng([11, index]), cfg, mode, "red", "tray")


@pytest.mark.parametrize("index", range(4))
def test_a_tray_task_succeeds_on_the_tray_and_its_wrong_target_is_a_pot_success(index: int):
    success = tray_episode("none", index)
    tray_left, tray_right = tray_range(success)
    end = success["cube_xy"][-1]
    assert success["success"] and tray_left < end[0] < tray_right
    assert tray_left < cube_centroid_x(success["side_cam"][-1], success["cube_color"]) < tray_right
    # A tray task's wrong target is the pot: the same frames as the pot task's success.
    wrong = tray_episode("wrong_target", index)
    pot_success = episode("none", index, distractor=True)
    np.testing.assert_array_equal(wrong["side_cam"], pot_success["side_cam"])
    assert not wrong["success"] and len(wrong["stage_boundaries"]) == 2
    # ...and a pot task's wrong target (the tray) is the tray task's success, frame for frame.
    pot_wrong = episode("wrong_target", index, distractor=True)
    np.testing.assert_array_equal(pot_wrong["side_cam"], success["side_cam"])
    # stop short: on the table past the tray, before the pot's wall
    short = tray_episode("stop_short", index)["cube_xy"][-1]
    pot_wall = success["pot_interior"][0] - synthetic.POT_WALL
    assert tray_right < short[0] < pot_wall


def test_destinations_make_a_task_per_destination_and_need_the_tray():
    cfg = small_config(distractor=True, destinations=["pot", "tray"], tasks=["red", "blue"])
    assert synthetic.task_prompts(cfg) == [
        "Put the red cube in the pot.",
        "Put the blue cube in the pot.",
        "Put the red cube on the tray.",
        "Put the blue cube on the tray.",
    ]
    one = small_config(distractor=True, destinations=["pot", "tray"])
    assert synthetic.task_prompts(one) == [one.prompt, "Put the cube on the tray."]
    with pytest.raises(ValueError, match="synth.destinations"):
        synthetic.validate_config(small_config(destinations=["pot", "tray"]))
    with pytest.raises(ValueError, match="synth.destinations"):
        synthetic.validate_config(small_config(distractor=True, destinations=["shelf"]))


def test_a_two_destination_file_holds_both_tasks_with_their_outcomes(tmp_path: Path) -> None:
    cfg = small_config(
        num_episodes=12,
        distractor=True,
        destinations=["pot", "tray"],
        failure_modes=["wrong_target"],
        output=str(tmp_path / "two.h5"),
    )
    path = synthetic.write_synthetic_dataset(cfg)
    with h5py.File(path, "r") as f:
        found = Counter((f[name].attrs["prompt"], bool(f[name].attrs[ATTR_SUCCESS])) for name in f)
    assert found == {
        ("Put the cube in the pot.", True): 3,
        ("Put the cube in the pot.", False): 3,
        ("Put the cube on the tray.", True): 3,
        ("Put the cube on the tray.", False): 3,
    }
