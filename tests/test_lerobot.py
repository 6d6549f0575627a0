"""LeRobot v3 input: the writer's layout, the reader's scan and decode, and bad input.

The dataset is generated here (``_lerobot``): 6 episodes, 2 cameras, 3 tasks, 16x16 frames,
2 episodes per mp4 file. Embedding from it end to end is in ``test_lerobot_embed.py``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _lerobot import (
    CAMERAS,
    EPISODES_PER_FILE,
    FPS,
    LENGTHS,
    SIZE,
    TASKS,
    TOP,
    WRIST,
    decoded_episode,
    episode_frames,
    video_path,
    write_dataset,
)

from rayrm.data import mp4
from rayrm.data.lerobot import (
    LeRobotDatasetError,
    is_lerobot_root,
    read_error,
    read_packed_blocks,
    scan_lerobot,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "ds")


@pytest.fixture
def copy(dataset, tmp_path) -> str:
    """A copy of the dataset for a test to break."""
    target = str(tmp_path / "ds")
    shutil.copytree(dataset, target)
    return target


def _episodes_table(root: str) -> pa.Table:
    return pq.read_table(os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"))


# --------------------------------------------------------------------------- the writer


def test_info_json_is_lerobot_v3(dataset):
    with open(os.path.join(dataset, "meta/info.json")) as f:
        info = json.load(f)
    assert info["codebase_version"] == "v3.0"
    assert info["fps"] == FPS and info["chunks_size"] == 1000
    assert info["total_episodes"] == 6 and info["total_tasks"] == 3
    assert info["total_frames"] == sum(LENGTHS)
    assert info["splits"] == {"train": "0:6"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert (
        info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    )
    for camera in CAMERAS:
        feature = info["features"][camera]
        assert feature["dtype"] == "video"
        assert feature["shape"] == [SIZE, SIZE, 3]
        assert feature["names"] == ["height", "width", "channels"]
        assert feature["info"]["video.codec"] == "h264"
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert info["features"][name]["shape"] == [1]


def test_tasks_parquet_is_indexed_by_the_task_string(dataset):
    tasks = pd.read_parquet(os.path.join(dataset, "meta/tasks.parquet"))  # as LeRobot loads it
    assert tasks.index.name == "task"
    assert list(tasks.index) == list(TASKS)
    assert tasks["task_index"].tolist() == [0, 1, 2]


def test_episode_rows_place_several_episodes_in_each_video_file(dataset):
    rows = _episodes_table(dataset).to_pylist()
    assert [r["episode_index"] for r in rows] == list(range(6))
    assert [r["length"] for r in rows] == list(LENGTHS)
    assert [r["tasks"] for r in rows] == [[TASKS[i % 3]] for i in range(6)]
    ends = np.cumsum(LENGTHS).tolist()
    assert [r["dataset_to_index"] for r in rows] == ends
    assert [r["dataset_from_index"] for r in rows] == [0] + ends[:-1]
    for camera in CAMERAS:

        def col(name, camera=camera):
            return [r[f"videos/{camera}/{name}"] for r in rows]

        assert col("file_index") == [0, 0, 1, 1, 2, 2]
        assert col("chunk_index") == [0] * 6
        # the second episode of a file starts where the first one ends
        assert col("from_timestamp") == pytest.approx([0, 0.5, 0, 0.6, 0, 0.4])
        assert col("to_timestamp") == pytest.approx([0.5, 1.2, 0.6, 1.5, 0.4, 1.2])
    assert [r["success"] for r in rows] == [True, False] * 3


def test_data_parquet_has_one_row_per_frame(dataset):
    table = pq.read_table(os.path.join(dataset, "data/chunk-000/file-000.parquet"))
    assert table.column("index").to_pylist() == list(range(sum(LENGTHS)))
    assert table.column("frame_index").to_pylist() == [t for n in LENGTHS for t in range(n)]
    assert table.column("episode_index").to_pylist() == [
        i for i, n in enumerate(LENGTHS) for _ in range(n)
    ]
    assert table.column("task_index").to_pylist() == [
        i % 3 for i, n in enumerate(LENGTHS) for _ in range(n)
    ]
    stamps = [t / FPS for n in LENGTHS for t in range(n)]
    assert table.column("timestamp").to_pylist() == pytest.approx(stamps)


def test_each_video_file_holds_its_episodes_frames(dataset):
    """h264 is lossy: each decoded frame must be nearest to the frame written there, among
    all frames written for that camera."""
    for camera in CAMERAS:
        written = [(i, t) for i, n in enumerate(LENGTHS) for t in range(n)]
        originals = np.concatenate([episode_frames(i, camera, n) for i, n in enumerate(LENGTHS)])
        for i in range(6):
            decoded = decoded_episode(dataset, camera, i).astype(int)
            for t, frame in enumerate(decoded):
                distance = np.abs(originals.astype(int) - frame).mean(axis=(1, 2, 3))
                assert written[int(np.argmin(distance))] == (i, t), (camera, i, t)


# --------------------------------------------------------------------------- the reader


def test_scan_finds_every_episode_with_its_task_and_success(dataset):
    assert is_lerobot_root(dataset)
    episodes, problems = scan_lerobot(dataset, [TOP], success_column="success")
    assert problems == []
    assert [e.episode_id for e in episodes] == [f"episode_{i:06d}" for i in range(6)]
    assert [e.prompt for e in episodes] == [TASKS[i % 3] for i in range(6)]
    assert [e.success for e in episodes] == [True, False] * 3
    assert [e.num_frames for e in episodes] == list(LENGTHS)
    assert [e.dataset_from_index for e in episodes] == [0, *np.cumsum(LENGTHS)[:-1]]
    assert [e.source_file for e in episodes] == [
        video_path(dataset, TOP, i // EPISODES_PER_FILE) for i in range(6)
    ]
    assert all(e.frame_shape == (SIZE, SIZE, 3) for e in episodes)


def test_with_camera_as_episode_several_cameras_are_episodes_of_their_own(dataset):
    episodes, problems = scan_lerobot(dataset, [TOP, WRIST], camera_as_episode=True)
    assert problems == []
    assert [e.episode_id for e in episodes[:2]] == [
        f"episode_000000:{TOP}",
        f"episode_000000:{WRIST}",
    ]
    assert len(episodes) == 12 and all(e.success is None for e in episodes)


def test_several_cameras_are_views_of_one_episode_decoded_in_lockstep(dataset):
    episodes, problems = scan_lerobot(dataset, [TOP, WRIST])
    assert problems == []
    assert [e.episode_id for e in episodes] == [f"episode_{i:06d}" for i in range(6)]
    assert [v.camera for v in episodes[0].views()] == [TOP, WRIST]
    assert episodes[3].extra_views[0].source_file == video_path(dataset, WRIST, 1)
    blocks = list(read_packed_blocks(episodes, frames_per_block=8))
    ids = np.concatenate([b["episode_id"] for b in blocks])
    for column, camera in (("frame", TOP), (f"frame/{WRIST}", WRIST)):
        frames = np.concatenate([b[column] for b in blocks])
        for i in range(6):
            expected = decoded_episode(dataset, camera, i)
            assert np.array_equal(frames[ids == f"episode_{i:06d}"], expected), (column, i)


def test_an_undecodable_second_camera_fails_the_episode_naming_file_and_key(copy):
    with open(video_path(copy, WRIST, 2), "wb") as f:
        f.write(b"not an mp4 at all" * 64)
    episodes, problems = scan_lerobot(copy, [TOP, WRIST])
    assert [e.episode_id for e in episodes] == [f"episode_{i:06d}" for i in range(4)]
    assert sorted((p.file, p.episode, p.key) for p in problems) == [
        (video_path(copy, WRIST, 2), "episode_000004", WRIST),
        (video_path(copy, WRIST, 2), "episode_000005", WRIST),
    ]


def test_decoded_blocks_hold_each_episodes_frames_from_its_timestamps(dataset):
    episodes, _ = scan_lerobot(dataset, [WRIST])
    blocks = list(read_packed_blocks(episodes, frames_per_block=8))
    assert [len(b["frame"]) for b in blocks] == [8, 8, 8, 8, 7]  # 39 frames, blocks span episodes
    ids = np.concatenate([b["episode_id"] for b in blocks])
    frame_index = np.concatenate([b["frame_index"] for b in blocks])
    frames = np.concatenate([b["frame"] for b in blocks])
    prompts = np.concatenate([b["prompt"] for b in blocks])
    for i, n in enumerate(LENGTHS):
        mine = ids == f"episode_{i:06d}"
        assert frame_index[mine].tolist() == list(range(n))
        assert set(prompts[mine]) == {TASKS[i % 3]}
        # PyAV's frames, decoded here from the whole file, cut where the episode lies in it
        assert np.array_equal(frames[mine], decoded_episode(dataset, WRIST, i))


# --------------------------------------------------------------------------- bad input


def test_missing_info_json_names_the_dataset(copy):
    os.remove(os.path.join(copy, "meta/info.json"))
    assert not is_lerobot_root(copy)
    with pytest.raises(LeRobotDatasetError, match=f"{copy}.*meta/info.json is missing"):
        scan_lerobot(copy, [TOP])


def test_an_older_codebase_version_is_refused(copy):
    path = os.path.join(copy, "meta/info.json")
    with open(path) as f:
        info = json.load(f)
    info["codebase_version"] = "v2.1"
    with open(path, "w") as f:
        json.dump(info, f)
    with pytest.raises(LeRobotDatasetError, match=r"codebase_version 'v2.1'.*v3\.0"):
        scan_lerobot(copy, [TOP])


def test_an_unknown_camera_lists_the_available_ones(dataset):
    with pytest.raises(LeRobotDatasetError) as err:
        scan_lerobot(dataset, ["observation.images.side"])
    assert "observation.images.side" in str(err.value)
    assert f"video keys are: {TOP}, {WRIST}" in str(err.value)
    assert dataset in str(err.value)


def test_an_unknown_success_column_names_the_file(dataset):
    with pytest.raises(LeRobotDatasetError, match="no column.*is_success"):
        scan_lerobot(dataset, [TOP], success_column="is_success")


def test_a_video_shorter_than_its_episode_is_that_episodes_problem(copy):
    # file 1 of the top camera holds episodes 2 (6 frames) and 3 (9): keep 10 frames only
    frames = np.concatenate([episode_frames(2, TOP, 6), episode_frames(3, TOP, 4)])
    with open(video_path(copy, TOP, 1), "wb") as f:
        f.write(mp4.encode_mp4(frames, FPS))
    episodes, problems = scan_lerobot(copy, [TOP])
    assert [e.episode_id for e in episodes] == [f"episode_{i:06d}" for i in (0, 1, 2, 4, 5)]
    assert len(problems) == 1
    bad = problems[0]
    assert (bad.file, bad.episode, bad.key) == (video_path(copy, TOP, 1), "episode_000003", TOP)
    assert "shorter than its episode" in bad.reason and "1.5000 s" in bad.reason


def test_an_undecodable_file_fails_its_episodes_only(copy):
    with open(video_path(copy, WRIST, 2), "wb") as f:
        f.write(b"not an mp4 at all" * 64)
    episodes, problems = scan_lerobot(copy, [TOP, WRIST], camera_as_episode=True)
    assert len(episodes) == 10
    assert sorted((p.episode, p.key) for p in problems) == [
        (f"episode_000004:{WRIST}", WRIST),
        (f"episode_000005:{WRIST}", WRIST),
    ]
    assert all("cannot decode the video file" in p.reason for p in problems)
    assert all(p.file == video_path(copy, WRIST, 2) for p in problems)


def test_a_decode_failure_drops_that_episode_and_read_error_names_it(dataset):
    import dataclasses

    episodes, _ = scan_lerobot(dataset, [TOP])
    # episode 1 claims 3 more frames than its file has left after its from_timestamp
    broken = dataclasses.replace(episodes[1], num_frames=LENGTHS[1] + 3)
    blocks = list(read_packed_blocks([episodes[0], broken, episodes[2]], frames_per_block=5))
    ids = np.concatenate([b["episode_id"] for b in blocks])
    frames = np.concatenate([b["frame"] for b in blocks])
    # blocks of 5: episode 0 fills the first; episode 1's frames 0-4 the second; its frames
    # 5 and 6 wait in the third when the decode fails, and are dropped with it
    assert ids.tolist().count("episode_000001") == 5
    assert ids.tolist().count("episode_000000") == LENGTHS[0]
    # episode 2 takes the dropped frames' places in the buffer, intact
    assert np.array_equal(frames[ids == "episode_000002"], decoded_episode(dataset, TOP, 2))
    reason = read_error(broken)
    assert reason and "video ends after 7 of the episode's 10 frames" in reason
    assert read_error(episodes[1]) is None


# --------------------------------------------------------------------------- rayrm synth


def test_synth_writes_the_same_episodes_as_a_lerobot_dataset(tmp_path):
    import h5py

    from rayrm.config import SynthConfig, load_config, resolve_paths
    from rayrm.data.synthetic import (
        LEROBOT_CAMERAS,
        write_synthetic_dataset,
        write_synthetic_lerobot,
    )

    cfg = SynthConfig(
        num_episodes=4, image_size=16, min_stage_frames=2, max_stage_frames=3, seed=5,
        tasks=["red", "green"], format="lerobot",
    )  # fmt: skip
    root = str(tmp_path / "lerobot")
    stages = write_synthetic_lerobot(cfg, root)
    h5 = write_synthetic_dataset(cfg, tmp_path / "same.h5")
    side = LEROBOT_CAMERAS["side_cam"]
    episodes, problems = scan_lerobot(root, [side], success_column="success")
    assert problems == [] and len(episodes) == 4
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary left
    with h5py.File(h5) as f:
        groups = [f[name] for name in sorted(f)]
        for info, group in zip(episodes, groups):
            assert info.num_frames == len(group["side_cam"])
            assert info.prompt == group.attrs["prompt"]
            assert info.success == bool(group.attrs["success"])
            if info.success:
                assert stages[info.episode_id] == list(group.attrs["stage_boundaries"])
        # h264 of noisy 16x16 frames is lossy: near (measured 6.5), where the next episode is
        # 22 away and the frame one step later 16
        frames = np.concatenate([b["frame"] for b in read_packed_blocks(episodes[:1], 64)])
        assert np.abs(frames.astype(int) - groups[0]["side_cam"][()].astype(int)).mean() < 10
    demo = resolve_paths(load_config("configs/demo_lerobot.yaml"))
    assert demo.synth.output.endswith("raw/lerobot") and demo.embed.input == demo.synth.output
    assert demo.embed.camera == side


def test_synth_lerobot_needs_an_even_image_size():
    from rayrm.config import SynthConfig
    from rayrm.data.synthetic import validate_config

    with pytest.raises(ValueError, match="image_size must be even for lerobot"):
        validate_config(SynthConfig(image_size=17, format="lerobot"))
    with pytest.raises(ValueError, match="synth.format must be one of"):
        validate_config(SynthConfig(format="zarr"))


def test_read_tasks_are_as_many_as_asked_and_read_files_in_order(dataset):
    from rayrm.data.lerobot import LeRobotEpisodeDatasource

    episodes, _ = scan_lerobot(dataset, [TOP])
    source = LeRobotEpisodeDatasource(episodes, frames_per_block=8)
    for wanted in range(1, 7):
        tasks = source.get_read_tasks(wanted)
        assert len(tasks) == wanted  # fewer would make Ray Data split every block
        rows = [t.metadata.num_rows for t in tasks]
        assert sum(rows) == sum(LENGTHS)
    assert len(source.get_read_tasks(50)) == 6  # at most one per episode
    # consecutive runs in file order, split by frame count: 5+7+6 | 9 | 4+8 frames
    files = [list(t.metadata.input_files) for t in source.get_read_tasks(3)]
    assert files == [
        [video_path(dataset, TOP, 0), video_path(dataset, TOP, 1)],
        [video_path(dataset, TOP, 1)],
        [video_path(dataset, TOP, 2)],
    ]
