"""Bad raw input: every problem is named (file, episode, key) in the error and in the
failures table, while the other episodes are still embedded. With any failure the CLI exits
with 2 and publishes nothing (the good episodes wait in ``.<output>.partial`` for a rerun),
unless ``embed.max_failed_episodes`` allows it. Problems found before any frame is read
(unknown backbone, no input files) abort at once with nothing written.

Each case writes a small valid HDF5 file by hand and then breaks one thing in it.
"""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from _embed_checks import partial_ids, read_failures, read_json, read_rows
from conftest import make_config

import rayrm.embed.run
from rayrm.cli import main
from rayrm.config import load_config, resolve_paths
from rayrm.data import schema
from rayrm.data.hdf5 import InvalidEpisodesError, scan_episodes
from rayrm.embed import run_dir, run_embed

PROMPT = "Put the cube in the pot."


def write_episode(group: h5py.Group, T: int = 6, size: int = 8, **overrides) -> None:
    """A valid episode (uint8 [T, size, size, 3] side_cam, action [T, 7]); ``overrides``
    replace or (with None) drop datasets."""
    rng = np.random.default_rng(T)
    data = {
        "side_cam": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
        "wrist_cam": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
        "action": rng.standard_normal((T, 7)).astype(np.float32),
        **overrides,
    }
    for key, value in data.items():
        if value is not None:
            group.create_dataset(key, data=value)
    group.attrs["success"] = True


def write_file(path, episodes: dict[str, dict], prompt: str | None = PROMPT) -> str:
    with h5py.File(path, "w") as f:
        if prompt is not None:
            f.attrs["prompt"] = prompt
        for name, overrides in episodes.items():
            write_episode(f.create_group(name), **overrides)
    return str(path)


def run_cli(workdir, input_path, *extra) -> int:
    return main(["embed", "--workdir", str(workdir), "--embed.input", str(input_path), *extra])


def cli_config(workdir, input_path):
    """The config ``run_cli`` runs with, so a rerun in-process has the same settings."""
    args = ["--workdir", str(workdir), "--embed.input", str(input_path)]
    return resolve_paths(load_config(None, args))


def output_of(workdir) -> str:
    return os.path.join(workdir, "embeddings")


def assert_nothing_written(workdir) -> None:
    """No output folder (no run state either) exists."""
    left = [n for n in os.listdir(workdir) if "embeddings" in n]
    assert left == [], left


def assert_not_published(workdir, failed: set[tuple], kept: list[str]) -> None:
    """No output; the partial folder holds the ``kept`` episodes (exactly once) and a
    failures table of exactly the ``failed`` (file, episode, key) triples."""
    assert not os.path.exists(os.path.join(output_of(workdir), schema.MANIFEST_NAME))
    rows = read_failures(output_of(workdir))
    assert {(r["file"], r["episode"], r["key"]) for r in rows} == failed
    assert all(r["reason"] for r in rows)
    assert partial_ids(output_of(workdir)) == sorted(kept)


def assert_names(message: str, file: str, episode: str, key: str, reason: str) -> None:
    """One line of the message names the file, the episode and the key, and says why."""
    lines = [line for line in message.splitlines() if file in line]
    assert any(
        f"episode {episode}," in line and f"key {key}]" in line and reason in line for line in lines
    ), message


def break_one(tmp_path, **overrides) -> str:
    return write_file(tmp_path / "bad.h5", {"ep_ok": {}, "ep_bad": overrides})


NAN_POSE = np.zeros((6, 7), np.float32)
NAN_POSE[2, 3] = np.nan

CASES = {
    "missing camera": (dict(side_cam=None), "side_cam", "missing camera dataset"),
    "float frames": (
        dict(side_cam=np.zeros((6, 8, 8, 3), np.float32)),
        "side_cam",
        "dtype float32, expected uint8",
    ),
    "grayscale frames": (
        dict(side_cam=np.zeros((6, 8, 8), np.uint8)),
        "side_cam",
        "expected [T, H, W, 3]",
    ),
    "too short": (dict(T=3), "side_cam", "3 frames, need >= 4"),
    "action length": (
        dict(action=np.zeros((5, 7), np.float32)),
        "action",
        "5 actions but 6 frames",
    ),
    "NaN in pose": (
        dict(tcp_pose=NAN_POSE),
        "tcp_pose",
        "non-finite value (NaN or inf) at frame 2",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_episode(ray_session, tmp_path, caplog, case):
    overrides, key, reason = CASES[case]
    path = break_one(tmp_path, **overrides)
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path) == 2
    assert_names(caplog.text, path, "ep_bad", key, reason)
    assert "ep_ok" not in caplog.text  # only the broken episode is reported
    assert_not_published(tmp_path, {(path, "ep_bad", key)}, kept=["ep_ok"])

    # The rerun resumes (ep_ok is not embedded again) and fails the same way.
    with pytest.raises(InvalidEpisodesError) as err:
        run_embed(cli_config(tmp_path, path))
    [problem] = err.value.problems
    assert (problem.file, problem.episode, problem.key) == (path, "ep_bad", key)
    assert_not_published(tmp_path, {(path, "ep_bad", key)}, kept=["ep_ok"])


def test_allowed_failures_are_published_with_the_table(ray_session, tmp_path):
    path = break_one(tmp_path, tcp_pose=NAN_POSE)
    assert run_cli(tmp_path, path, "--embed.max_failed_episodes", "1") == 0
    output = output_of(tmp_path)
    assert sorted(read_rows(output)) == ["ep_ok"]
    [row] = read_failures(output)
    assert (row["file"], row["episode"], row["key"]) == (path, "ep_bad", "tcp_pose")
    manifest = read_json(output, schema.MANIFEST_NAME)
    assert (manifest["num_episodes"], manifest["num_failed_episodes"]) == (1, 1)
    assert not os.path.exists(run_dir(output))


def test_fixing_the_input_resumes_with_only_the_failed_episode(ray_session, tmp_path):
    path = break_one(tmp_path, side_cam=None)
    assert run_cli(tmp_path, path) == 2
    with h5py.File(path, "a") as f:  # the fix: ep_bad gets its camera
        del f["ep_bad"]
        write_episode(f.create_group("ep_bad"), T=7)
    result = run_embed(cli_config(tmp_path, path))
    assert result.embedded_frames == 7  # ep_ok came from the first run
    assert sorted(read_rows(output_of(tmp_path))) == ["ep_bad", "ep_ok"]
    assert read_failures(output_of(tmp_path)) == []


def corrupt_a_chunk(path: str, episode: str, frame: int) -> None:
    """Rewrite ``episode``'s camera as one gzip chunk per frame, then garble one chunk: the
    metadata stays valid (the scan passes), reading that frame fails."""
    with h5py.File(path, "a") as f:
        data = f[episode]["side_cam"][()]
        del f[episode]["side_cam"]
        frames = f[episode].create_dataset(
            "side_cam", data=data, chunks=(1, *data.shape[1:]), compression="gzip"
        )
        chunk = frames.id.get_chunk_info(frame)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(b"\xff" * chunk.size)


def test_frames_that_fail_to_read(ray_session, tmp_path, caplog):
    # The read task fails on that episode, skips it and goes on with the others.
    path = write_file(tmp_path / "bad.h5", {"ep_ok": {}, "ep_bad": {}, "ep_zz": {}})
    corrupt_a_chunk(path, "ep_bad", frame=3)
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path) == 2
    assert_names(caplog.text, path, "ep_bad", "side_cam", "frames cannot be read")
    assert_not_published(tmp_path, {(path, "ep_bad", "side_cam")}, kept=["ep_ok", "ep_zz"])


def test_file_without_episodes(ray_session, tmp_path, caplog):
    path = str(tmp_path / "empty.h5")
    with h5py.File(path, "w") as f:
        f.attrs["prompt"] = PROMPT
        f.create_dataset("not_an_episode", data=np.zeros(3))
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path) == 2
    assert_names(caplog.text, path, "-", "-", "holds no episode groups")
    assert_not_published(tmp_path, {(path, "-", "-")}, kept=[])


def test_corrupt_file(ray_session, tmp_path, caplog):
    path = tmp_path / "corrupt.h5"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path) == 2
    assert_names(caplog.text, str(path), "-", "-", "cannot open as HDF5")
    assert_not_published(tmp_path, {(str(path), "-", "-")}, kept=[])


def test_duplicate_episode_ids_across_files(ray_session, tmp_path, caplog):
    # Two files: scanned in parallel Ray tasks; the first file keeps the repeated id.
    folder = tmp_path / "raw"
    folder.mkdir()
    first = write_file(folder / "a.h5", {"ep_0": {}, "ep_1": {}})
    second = write_file(folder / "b.h5", {"ep_1": {}, "ep_2": {}})
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, folder) == 2
    assert_names(caplog.text, second, "ep_1", "-", f"also in {first}")
    assert_not_published(tmp_path, {(second, "ep_1", "-")}, kept=["ep_0", "ep_1", "ep_2"])
    # The unfinished run records the input it embedded, by episode (for its resume check).
    table = pq.read_table(os.path.join(run_dir(output_of(tmp_path)), "inputs.parquet"))
    table = table.select(["episode_id", "source_file"])
    sources = dict(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    assert sources == {"ep_0": first, "ep_1": first, "ep_2": second}


def test_no_prompt_anywhere(ray_session, tmp_path, caplog):
    path = write_file(tmp_path / "noprompt.h5", {"ep_0": {}}, prompt=None)
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path) == 2
    assert_names(caplog.text, path, "ep_0", "prompt", "no prompt")
    assert_not_published(tmp_path, {(path, "ep_0", "prompt")}, kept=[])
    # embed.prompt supplies the missing prompt: the same file then passes the checks.
    episodes, problems = scan_episodes([path], "side_cam", prompt="pick")
    assert problems == [] and episodes[0].prompt == "pick"


def test_several_problems_in_one_file_are_listed_together(ray_session, tmp_path, caplog):
    path = write_file(
        tmp_path / "bad.h5",
        {
            "ep_a": dict(side_cam=None),
            "ep_b": dict(side_cam=np.zeros((6, 8, 8, 3), np.float32)),
            "ep_c": dict(T=3, action=np.zeros((5, 7), np.float32)),  # two problems
            "ep_ok": {},
        },
    )
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path) == 2
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()  # one message holds them all
    assert message.startswith("4 problem(s)")
    assert_names(message, path, "ep_a", "side_cam", "missing camera")
    assert_names(message, path, "ep_b", "side_cam", "dtype float32")
    assert_names(message, path, "ep_c", "side_cam", "3 frames, need >= 4")
    assert_names(message, path, "ep_c", "action", "5 actions but 3 frames")
    assert "ep_ok" not in message
    assert "3 episode(s) failed" in message  # ep_c's two problems are one failed episode
    failed = {(path, "ep_a", "side_cam"), (path, "ep_b", "side_cam")}
    failed |= {(path, "ep_c", "side_cam"), (path, "ep_c", "action")}
    assert_not_published(tmp_path, failed, kept=["ep_ok"])


def test_bad_stage_boundaries(ray_session, tmp_path):
    path = write_file(tmp_path / "bad.h5", {"ep_0": {}, "ep_1": {}})
    with h5py.File(path, "a") as f:
        f["ep_0"].attrs["stage_boundaries"] = np.array([3, 2], np.int32)  # not increasing
        f["ep_1"].attrs["stage_boundaries"] = np.array([2, 6], np.int32)  # 6 = T, past the end
    with pytest.raises(InvalidEpisodesError) as err:
        run_embed(make_config(tmp_path, embed=dict(input=path)))
    found = {(p.episode, p.key) for p in err.value.problems}
    assert found == {("ep_0", "stage_boundaries"), ("ep_1", "stage_boundaries")}
    failed = {(path, "ep_0", "stage_boundaries"), (path, "ep_1", "stage_boundaries")}
    assert_not_published(tmp_path, failed, kept=[])


def test_unknown_backbone_fails_before_reading_input(ray_session, tmp_path, caplog, monkeypatch):
    path = write_file(tmp_path / "ok.h5", {"ep_0": {}})

    def must_not_run(*args, **kwargs):
        raise AssertionError("input read before the backbone name was checked")

    monkeypatch.setattr(rayrm.embed.run, "list_hdf5_files", must_not_run)
    monkeypatch.setattr(rayrm.embed.run, "scan_episodes", must_not_run)
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, path, "--backbone.name", "dinov9000") == 2
    assert "unknown backbone 'dinov9000'" in caplog.text
    assert "available: " in caplog.text and "tiny" in caplog.text.split("available: ")[1]
    assert_nothing_written(tmp_path)


def test_nonexistent_input_path(ray_session, tmp_path, caplog):
    missing = tmp_path / "nowhere" / "episodes.h5"
    with caplog.at_level(logging.ERROR, logger="rayrm"):
        assert run_cli(tmp_path, missing) == 2
    assert str(missing) in caplog.text
    assert_nothing_written(tmp_path)
