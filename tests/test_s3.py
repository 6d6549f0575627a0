"""Every path on object storage: a real S3 HTTP server (moto's, ``tests/_s3.py``) on 127.0.0.1.

Nothing is patched in the client libraries: pyarrow, Ray Data and Ray Train talk HTTP to the
server through the environment (``AWS_ENDPOINT_URL`` and keys, set before the session's Ray
starts), as they would to AWS.

* embed -> annotate (stage labels, annotation videos) -> train -> evaluate with the raw
  episodes, the stage JSON, the embeddings, the videos, the training run and the evaluation
  outputs all on the server; the embeddings equal the local run's.
* the server stopped in the middle of an embedding run: the run fails; once the server is
  back, the rerun finishes with every episode exactly once and the uninterrupted output.
* missing credentials and a bucket that does not exist: a clear error naming the URL before
  any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import ray
from _embed_checks import assert_same_rows, with_backbone, with_embed
from _failing_backbone import NAME as FAILING_BACKBONE
from _failing_backbone import REPO_ROOT, importable_everywhere
from _s3 import S3Server, patched_environ

from rayrm.annotate.labels import run_annotate, stage_json_from_hdf5
from rayrm.annotate.videos import run_annotate_video
from rayrm.config import AnnotateConfig, to_dict
from rayrm.data import schema, storage
from rayrm.data.shards import read_episodes, read_manifest
from rayrm.data.storage import StorageError
from rayrm.embed import run_embed
from rayrm.evaluate.run import run_evaluate
from rayrm.train.trainer import run_train


def rows_by_id(path: str) -> dict[str, dict]:
    rows = read_episodes(path).to_pylist()
    assert len(rows) == len({r["episode_id"] for r in rows})  # each episode once
    return {r["episode_id"]: r for r in rows}


def upload(local_file: str, url: str) -> str:
    with open(local_file, "rb") as f:
        storage.write_bytes(url, f.read())
    return url


def on_s3(cfg, root: str):
    """``cfg`` with every input and output under ``root`` (``s3://bucket``)."""
    raw = upload(cfg.synth.output, f"{root}/raw/episodes.h5")
    return dataclasses.replace(
        cfg,
        embed=dataclasses.replace(cfg.embed, input=raw, output=f"{root}/emb"),
        train=dataclasses.replace(cfg.train, embeddings=f"{root}/emb", output=f"{root}/train"),
        evaluate=dataclasses.replace(
            cfg.evaluate, embeddings=f"{root}/emb", output=f"{root}/eval", videos=1
        ),
    )


def test_embed_annotate_train_evaluate_all_on_s3(tiny_run, s3_server):
    bucket = "all-on-s3"
    root = s3_server.create_bucket(bucket)
    cfg = on_s3(tiny_run, root)
    result = run_embed(cfg)
    assert result.num_episodes == tiny_run.synth.num_episodes
    keys = s3_server.list_keys("all-on-s3", "emb/")
    manifest = read_manifest(cfg.embed.output)
    assert f"emb/{schema.MANIFEST_NAME}" in keys
    assert {f"emb/{c}" for c in manifest["chunks"]} <= set(keys)
    assert not [k for k in keys if k.startswith(f"emb/{schema.RUN_DIR}/")]  # run state gone
    expected = rows_by_id(tiny_run.embed.output)
    assert_same_rows(rows_by_id(cfg.embed.output), expected, skip={"source_file"})
    assert {r["source_file"] for r in rows_by_id(cfg.embed.output).values()} == {cfg.embed.input}

    # Stage labels from a stage JSON on the server, and annotation videos written there.
    stages = f"{root}/stages.json"
    storage.write_json(stages, stage_json_from_hdf5([tiny_run.synth.output]))
    annotate = AnnotateConfig(
        stages=stages,
        embeddings=cfg.embed.output,
        allow_unannotated=True,
        input=cfg.embed.input,
        video_output=f"{root}/videos",
        episodes=["episode_0000", "episode_0001"],
    )
    labelled = run_annotate(annotate)
    assert read_manifest(cfg.embed.output)["num_stages"] == labelled.num_stages == 4
    assert read_manifest(cfg.embed.output)["chunks"] == manifest["chunks"]  # not copied
    run_annotate_video(annotate)
    # (pyarrow leaves a "videos/" folder marker behind the deleted write probe)
    assert [k for k in s3_server.list_keys(bucket, "videos/") if not k.endswith("/")] == [
        "videos/episode_0000.mp4",
        "videos/episode_0000_contact.png",
        "videos/episode_0001.mp4",
        "videos/episode_0001_contact.png",
        "videos/stages_template.json",
    ]

    trained = run_train(cfg)
    assert trained.best_checkpoint.startswith("s3://all-on-s3/train/reward_model/checkpoint_")
    assert storage.is_file(storage.join(trained.best_checkpoint, "model.safetensors"))
    config = storage.read_json(storage.join(trained.best_checkpoint, "config.json"))
    assert config["embeddings"] == cfg.embed.output
    # Each rank read its share of the chunk bytes, and the one rank read them all.
    assert len(config["input_bytes_per_rank"]) == 1 and config["input_bytes_per_rank"][0] > 0

    evaluated = run_evaluate(cfg)  # the checkpoint found through train.output on S3
    assert evaluated.metrics_path == "s3://all-on-s3/eval/metrics.json"
    metrics = json.loads(storage.read_bytes(evaluated.metrics_path))
    assert metrics["checkpoint"] == trained.best_checkpoint
    assert metrics == json.loads(json.dumps(evaluated.metrics))
    eval_keys = s3_server.list_keys("all-on-s3", "eval/")
    for name in ("metrics.csv", "curves.json", "reward_curves.png", "report.html"):
        assert f"eval/{name}" in eval_keys
    assert any(k.startswith("eval/videos/") and k.endswith(".mp4") for k in eval_keys)


def start_driver(cfg, folder) -> subprocess.Popen:
    """``run_embed(cfg)`` in a driver process of its own on this session's Ray."""
    config = folder / "config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    address = ray.get_runtime_context().gcs_address
    log = open(folder / "driver.log", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "tests._embed_driver", str(config), "--address", address],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} after {timeout} s")


def test_server_outage_mid_run_then_a_rerun_finishes_exactly_once(
    tiny_run, s3_server, tmp_path, monkeypatch
):
    importable_everywhere(monkeypatch)
    cfg = on_s3(tiny_run, s3_server.create_bucket("outage"))
    # Slow batches, a chunk file per 8 frames: the outage lands half-way.
    cfg = with_backbone(cfg, name=FAILING_BACKBONE, options={"delay_s": 0.15})
    cfg = with_embed(cfg, batch_size=8, frames_per_block=8, max_actor_restarts=0)
    driver = start_driver(cfg, tmp_path)
    chunks = lambda: [k for k in s3_server.list_keys("outage", "emb/chunks/")]  # noqa: E731
    try:
        wait_for(lambda: len(chunks()) >= 6 or driver.poll() is not None, 240, "no chunks")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        s3_server.stop(keep_data=True)  # the outage: every request now fails
        try:
            driver.wait(timeout=240)  # the run fails by itself
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            pytest.fail("the run did not fail during the outage")
        assert driver.returncode != 0
    finally:
        if driver.poll() is None:
            driver.kill()
        if not s3_server.running:
            s3_server.start()  # with what it held when it stopped
    assert 6 <= len(chunks())
    assert f"emb/{schema.MANIFEST_NAME}" not in s3_server.list_keys("outage", "emb/")

    result = run_embed(cfg)  # the rerun resumes from the chunks on the server
    expected = rows_by_id(tiny_run.embed.output)
    assert 0 < result.embedded_frames < sum(r["num_frames"] for r in expected.values())
    assert_same_rows(rows_by_id(cfg.embed.output), expected, skip={"source_file"})


def test_missing_bucket_is_named_before_any_work(tiny_run, s3_server, monkeypatch):
    def no_scan(*args, **kwargs):
        raise AssertionError("the input was scanned before the output was checked")

    monkeypatch.setattr("rayrm.embed.run.list_hdf5_files", no_scan)
    cfg = with_embed(tiny_run, output="s3://no-such-bucket/emb")
    with pytest.raises(StorageError, match="embed.output=s3://no-such-bucket/emb.*bucket"):
        run_embed(cfg)
    train = dataclasses.replace(tiny_run.train, output="s3://no-such-bucket/train")
    with pytest.raises(StorageError, match="train.output=s3://no-such-bucket/train"):
        run_train(dataclasses.replace(tiny_run, train=train))


def test_missing_credentials_are_named_before_any_work(tiny_run, monkeypatch):
    """A server of its own that checks keys: without them, the output check fails at once
    with the URL, and nothing is scanned or embedded."""
    monkeypatch.setattr("rayrm.embed.run.list_hdf5_files", lambda *a: pytest.fail("scanned"))
    server = S3Server()
    with server.running_server():
        keys = server.require_auth()
        with patched_environ({**server.env(), **keys}):
            server.create_bucket("needs-keys")
        env = {k: v for k, v in server.env().items() if not k.startswith("AWS_ACCESS_KEY")}
        env = {k: v for k, v in env.items() if k != "AWS_SECRET_ACCESS_KEY"}
        unset = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")
        with patched_environ(env, unset=unset):
            cfg = with_embed(tiny_run, output="s3://needs-keys/emb")
            with pytest.raises(StorageError, match="embed.output=s3://needs-keys/emb"):
                run_embed(cfg)
