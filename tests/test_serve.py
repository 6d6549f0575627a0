"""``rayrm serve`` on a real local Ray Serve: HTTP on 127.0.0.1, handles, two pinned replicas.

One application serves the whole module (Serve takes ~20 s to start here); the replica-kill
test runs last because it changes the replicas.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import ray
import requests
from _local_ray import free_port
from _serve_helpers import offline
from ray import serve

from rayrm.cli import main
from rayrm.config import Config, ServeConfig
from rayrm.serve import BadRequestError, RewardClient, StreamLostError, UnknownStreamError
from rayrm.serve.app import MODEL_DEPLOYMENT, start_serve
from rayrm.serve.streams import stream_owner
from rayrm.testing import random_checkpoint

APP = "rayrm-test"
PROMPT = "put the cube in the pot"
FRAME = (24, 24, 3)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    checkpoint = random_checkpoint(str(tmp_path_factory.mktemp("serve") / "ck"), num_stages=0)
    port = free_port()
    cfg = Config(
        serve=ServeConfig(
            checkpoint=checkpoint,
            app_name=APP,
            port=port,
            replicas=2,
            cpus_per_replica=0,
            max_body_mb=0.05,  # 52 KB: a 24x24 frame is 1.7 KB, a 160x160 one is too much
            batch_wait_s=0.01,
        )
    )
    url = start_serve(cfg)
    yield url, checkpoint
    serve.shutdown()


def _episode(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (length, *FRAME), dtype=np.uint8)


def _run_stream(client: RewardClient, frames, prompt, out: list, errors: list) -> None:
    try:
        stream = client.open(prompt)
        out.append(stream)
        out.extend(client.step(stream, frame).reward for frame in frames)
        client.close(stream)
    except Exception as err:  # reported by the test, not lost in a thread
        errors.append(err)


def test_http_and_handle_streams_equal_the_offline_scorer(served):
    url, checkpoint = served
    clients = [RewardClient(url), RewardClient(url, encoding="json"), RewardClient(app_name=APP)]
    episodes = [_episode(seed, 6 + 3 * seed) for seed in range(12)]
    prompts = [f"{PROMPT} number {seed % 3}" for seed in range(12)]
    outs, errors, threads = [[] for _ in episodes], [], []
    for i, (frames, prompt) in enumerate(zip(episodes, prompts)):
        args = (clients[i % 3], frames, prompt, outs[i], errors)
        threads.append(threading.Thread(target=_run_stream, args=args))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len({stream_owner(out[0]) for out in outs}) == 2  # streams on both replicas
    for out, frames, prompt in zip(outs, episodes, prompts):
        np.testing.assert_allclose(out[1:], offline(checkpoint, frames, prompt)[0], atol=1e-5)


def test_concurrent_steps_share_model_calls(served):
    url, _ = served
    client = RewardClient(url)
    first = client.open(PROMPT)
    owner = stream_owner(first)
    streams = [first] + [s for s in (client.open(PROMPT) for _ in range(40)) if s != first]
    streams = [s for s in streams if stream_owner(s) == owner][:16]  # one replica's streams
    before = client.stream_info(first)
    frames = _episode(0, 8)

    def run(stream):
        for frame in frames:
            client.step(stream, frame)

    threads = [threading.Thread(target=run, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = client.stream_info(first)
    steps = after["steps"] - before["steps"]
    calls = after["model_calls"] - before["model_calls"]
    assert steps == len(streams) * len(frames) and after["step"] == len(frames)
    assert calls < steps / 2, (steps, calls)  # batched across streams, not one call a step


def test_step_many_equals_stream_by_stream_and_fails_per_stream(served):
    url, checkpoint = served
    episodes = [_episode(seed, 5) for seed in range(4)]
    expected = offline(checkpoint, episodes[0], PROMPT)[0]
    for client in (
        RewardClient(url),
        RewardClient(url, encoding="json"),
        RewardClient(app_name=APP),
    ):
        streams = [client.open(PROMPT) for _ in episodes]
        client.close(streams[2])
        ids = [*streams, "nosuch.replica"]
        for t in range(5):
            frames = np.stack([e[t] for e in episodes] + [episodes[0][t]])
            results = client.step_many(ids, frames)
            assert isinstance(results[2], UnknownStreamError)
            assert isinstance(results[4], StreamLostError)
            assert [results[i].step for i in (0, 1, 3)] == [t + 1] * 3
            assert results[0].reward == pytest.approx(expected[t], abs=1e-5)
            for i in (1, 3):
                single = offline(checkpoint, episodes[i][: t + 1], PROMPT)[0][-1]
                assert results[i].reward == pytest.approx(single, abs=1e-5)


def _post(url, path, body, headers=None):
    return requests.post(url + path, data=body, headers=headers or {}, timeout=30)


def test_bad_requests_get_4xx_with_a_message_and_the_server_goes_on(served):
    url, _ = served
    stream = requests.post(url + "/streams", json={"prompt": PROMPT}, timeout=30).json()["stream"]
    closed = requests.post(url + "/streams", json={"prompt": PROMPT}, timeout=30).json()["stream"]
    assert requests.delete(f"{url}/streams/{closed}", timeout=30).status_code == 200
    frame = _episode(1, 1)[0]
    raw = {"Content-Type": "application/octet-stream", "X-Shape": "24,24,3"}
    step = f"/streams/{stream}/step"
    cases = [
        (step, frame[:, :, :2].tobytes(), {**raw, "X-Shape": "24,24,2"}, 400, "uint8 [H, W, 3]"),
        (step, frame.astype(np.float32).tobytes(), {**raw, "X-Dtype": "float32"}, 400, "float32"),
        (step, frame.tobytes()[:-1], raw, 400, "bytes do not make"),
        (step, b'{"frame": 12', {"Content-Type": "application/json"}, 400, "malformed JSON"),
        (f"/streams/{closed}/step", frame.tobytes(), raw, 404, "unknown or closed"),
        ("/streams/nosuch.replica/step", frame.tobytes(), raw, 410, "open it again"),
        (step, np.zeros((160, 160, 3), np.uint8).tobytes(), raw, 413, "over"),
        ("/streams", b'{"prompt": ', {"Content-Type": "application/json"}, 400, "malformed"),
        ("/streams", json.dumps({"prompt": "word " * 80}).encode(), {}, 400, "80 words"),
        ("/streams", json.dumps({"prompt": 3}).encode(), {}, 400, "must be a string"),
        ("/nowhere", b"{}", {}, 404, "no route"),
    ]
    for path, body, headers, status, message in cases:
        reply = _post(url, path, body, headers)
        assert reply.status_code == status, (path, headers, reply.text)
        assert message in reply.json()["error"], (path, reply.text)
    good = _post(url, step, frame.tobytes(), raw)  # still serving, the stream unharmed
    assert good.status_code == 200 and good.json()["step"] == 1
    encoded = {"frame": base64.b64encode(frame.tobytes()).decode(), "shape": list(FRAME)}
    assert _post(url, step, json.dumps(encoded)).json()["step"] == 2


def test_client_raises_the_same_errors_on_both_paths(served):
    url, _ = served
    for client in (RewardClient(url), RewardClient(app_name=APP)):
        stream = client.open(PROMPT)
        with pytest.raises(BadRequestError, match="uint8"):
            client.step(stream, np.zeros((4, 4), np.uint8))
        client.close(stream)
        with pytest.raises(UnknownStreamError):
            client.step(stream, _episode(0, 1)[0])
        with pytest.raises(StreamLostError):
            client.step("nosuch.replica", _episode(0, 1)[0])


def test_serve_cli_without_a_checkpoint_exits_2(ray_session, tmp_path):
    assert main(["serve", "--workdir", str(tmp_path), "--serve.port", "1"]) == 2
    assert main(["serve", "--serve.replicas", "0"]) == 2


def _replica_actor(tag: str):
    return ray.get_actor(f"SERVE_REPLICA::{APP}#{MODEL_DEPLOYMENT}#{tag}", namespace="serve")


def test_a_killed_replica_loses_its_streams_only(served):
    """Run last: it kills one of the module's two replicas."""
    url, checkpoint = served
    http, handle = RewardClient(url), RewardClient(app_name=APP)
    streams = [http.open(PROMPT) for _ in range(12)]
    tags = sorted({stream_owner(s) for s in streams})
    assert len(tags) == 2
    doomed = [s for s in streams if stream_owner(s) == tags[0]]
    kept = [s for s in streams if stream_owner(s) == tags[1]]
    frames = _episode(3, 6)
    for stream in streams:
        for frame in frames[:3]:
            http.step(stream, frame)
    ray.kill(_replica_actor(tags[0]), no_restart=True)
    for stream in doomed:  # never a reward from another replica's history
        for client in (http, handle):
            with pytest.raises(StreamLostError, match="open it again"):
                client.step(stream, frames[3])
    expected = offline(checkpoint, frames, PROMPT)[0]
    for stream in kept:
        rewards = [http.step(stream, frame).reward for frame in frames[3:]]
        np.testing.assert_allclose(rewards, expected[3:], atol=1e-5)
    deadline = time.time() + 60
    while time.time() < deadline:  # Serve replaces the replica; new streams work again
        status = serve.status().applications[APP].deployments[MODEL_DEPLOYMENT]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    fresh = [http.open(PROMPT) for _ in range(8)]
    assert all(http.step(s, frames[0]).step == 1 for s in fresh)
