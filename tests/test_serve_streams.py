"""Served streams without Serve: the StreamTable and the HTTP wire format.

Every reward is checked against the offline ``RewardScorer`` fed the same frames one at a
time; the Serve tests (test_serve.py) then only need to show the routing and HTTP around it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _serve_helpers import offline

from rayrm.config import ConfigError, ServeConfig, load_config
from rayrm.serve.errors import (
    BadRequestError,
    ServerFullError,
    StreamLostError,
    UnknownStreamError,
)
from rayrm.serve.streams import StreamTable
from rayrm.serve.wire import decode_observation, decode_steps, encode_observation, encode_steps
from rayrm.testing import random_checkpoint

PROMPTS = ["put the cube in the pot", "open the drawer", "stack the red block"]
LENGTHS = [5, 70, 12]  # shorter than, and far past, the window L = 8 (and the history's 64)


@pytest.fixture(scope="module", params=[0, 4], ids=["progress", "sarm"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ck{request.param}") / "checkpoint"
    return random_checkpoint(str(path), num_stages=request.param, seed=7)


def _episodes(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8) for n in LENGTHS]


def _table(checkpoint, **limits) -> StreamTable:
    return StreamTable.from_checkpoint(checkpoint, "rep1", ServeConfig(**limits), "cpu")


def test_streams_equal_the_offline_scorer_whatever_the_interleaving(checkpoint):
    episodes = _episodes()
    table = _table(checkpoint)
    ids = [table.open(p) for p in PROMPTS]
    rng = np.random.default_rng(1)
    got = [[] for _ in episodes]
    next_frame = [0] * len(episodes)
    batch_sizes = []
    while any(next_frame[i] < len(e) for i, e in enumerate(episodes)):
        batch, owners = [], []
        for i in rng.permutation(len(episodes)):  # 0-3 steps of each stream, same batch
            for _ in range(int(rng.integers(0, 4))):
                if next_frame[i] < len(episodes[i]):
                    batch.append((ids[i], episodes[i][next_frame[i]]))
                    owners.append(i)
                    next_frame[i] += 1
        for i, result in zip(owners, table.step(batch)):
            got[i].append((result.reward, result.stage, result.step, result.success))
        batch_sizes.append(len(batch))
    assert max(batch_sizes) > len(episodes)  # some batches held a stream more than once
    for i, (frames, prompt) in enumerate(zip(episodes, PROMPTS)):
        rewards, stages, successes = offline(checkpoint, frames, prompt)
        np.testing.assert_allclose([g[0] for g in got[i]], rewards, atol=1e-5)
        assert [g[1] for g in got[i]] == stages
        assert [g[2] for g in got[i]] == list(range(1, len(frames) + 1))
        assert None not in successes  # the checkpoint has a success head
        np.testing.assert_allclose([g[3] for g in got[i]], successes, atol=1e-5)


def test_one_model_call_per_round_and_embeddings_beside_frames(checkpoint):
    table = _table(checkpoint)
    frames = _episodes()[0]
    a, b = table.open(PROMPTS[0]), table.open(PROMPTS[0])
    embedding = table.backbone.embed_frames(frames[:1], [""])[0]
    first = table.step([(a, frames[0]), (b, embedding)])
    assert table.model_calls == 1 and table.steps_done == 2
    assert first[0].reward == pytest.approx(first[1].reward, abs=1e-6)  # same frame both ways


def test_bad_steps_are_refused_one_by_one_and_the_others_go_on(checkpoint):
    table = _table(checkpoint, max_frame_side=64)
    frames = _episodes()[0]
    good, closed = table.open(PROMPTS[0]), table.open(PROMPTS[1])
    table.close(closed)
    bad = [
        (good, frames[0].astype(np.float32)),  # a float "frame"
        (good, frames[0][:, :, :2]),  # two channels
        (good, np.zeros(5, np.float32)),  # an embedding of the wrong size
        (good, np.full(table.model.visual_dim, np.nan, np.float32)),
        (good, np.zeros((65, 8, 3), np.uint8)),  # over max_frame_side
        (closed, frames[0]),
        ("rep1.never-opened", frames[0]),
        ("gone.0123", frames[0]),  # made by a replica that is not this one
    ]
    results = table.step([(good, frames[0]), *bad, (good, frames[1])])
    assert [type(r).__name__ for r in results[1:-1]] == [
        *["BadRequestError"] * 5,
        "UnknownStreamError",
        "UnknownStreamError",
        "StreamLostError",
    ]
    assert "got float32 [24, 24, 3]" in str(results[1])
    assert [results[0].step, results[-1].step] == [1, 2]  # only the good steps counted
    changed = table.step([(good, np.zeros((16, 16, 3), np.uint8))])[0]
    assert isinstance(changed, BadRequestError) and "first frame [24, 24, 3]" in str(changed)
    fresh = table.open(PROMPTS[0])  # a shape change within the stream's first batch
    first, second = table.step([(fresh, frames[0]), (fresh, np.zeros((16, 16, 3), np.uint8))])
    assert first.step == 1 and isinstance(second, BadRequestError)


def test_open_refuses_long_prompts_and_full_tables_and_closes_idle_streams(checkpoint):
    now = [0.0]
    table = _table(checkpoint, max_streams=2, stream_idle_s=10)
    table.clock = lambda: now[0]
    with pytest.raises(BadRequestError, match="65 words"):
        table.open(" ".join(["word"] * 65))
    first = table.open(PROMPTS[0])
    now[0] = 5.0
    table.open(PROMPTS[1])
    with pytest.raises(ServerFullError):
        table.open(PROMPTS[2])
    now[0] = 12.0  # the first stream has been idle for 12 s > 10 s: closed to make room
    table.open(PROMPTS[2])
    with pytest.raises(UnknownStreamError):
        table.close(first)
    with pytest.raises(StreamLostError, match="open it again"):
        table.stream_info("other.123")


@pytest.mark.parametrize("encoding", ["raw", "json"])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (6, 4, 3)), (np.float32, (32,))])
def test_wire_round_trip(encoding, dtype, shape):
    array = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    body, headers = encode_observation(array, encoding)
    decoded = decode_observation(body, {k.lower(): v for k, v in headers.items()})
    assert decoded.dtype == dtype and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    "body,headers,message",
    [
        (b"\x00" * 10, {"content-type": "application/octet-stream"}, "missing X-Shape"),
        (b"\x00" * 10, {"content-type": "application/octet-stream", "x-shape": "2,2,3"}, "12"),
        (b"\x00" * 12, {"content-type": "application/octet-stream", "x-shape": "2,x"}, "integers"),
        (
            b"\x00" * 12,
            {"content-type": "application/octet-stream", "x-shape": "2,2,3", "x-dtype": "int7"},
            "X-Dtype",
        ),
        (b'{"frame": "***", "shape": [1]}', {}, "base64"),
        (b'{"frame": ', {}, "malformed JSON"),
        (b"[1, 2]", {}, "JSON object"),
        (json.dumps({"embedding": ["a"]}).encode(), {}, "list of numbers"),
        (b"{}", {}, "'frame'"),
    ],
)
def test_wire_refuses_malformed_bodies_saying_why(body, headers, message):
    with pytest.raises(BadRequestError, match=message):
        decode_observation(body, headers)


@pytest.mark.parametrize("encoding", ["raw", "json"])
def test_multi_stream_steps_round_trip_and_must_match_their_streams(encoding):
    frames = (np.arange(2 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(2, 4, 4, 3)
    body, headers = encode_steps(["a.1", "b.2"], frames, encoding)
    headers = {k.lower(): v for k, v in headers.items()}
    streams, decoded = decode_steps(body, headers)
    assert streams == ["a.1", "b.2"]
    np.testing.assert_array_equal(decoded, frames)
    body, headers = encode_steps(["a.1", "b.2", "c.3"], np.concatenate([frames, frames[:1]]))
    headers = {k.lower(): v for k, v in headers.items()} | {"x-streams": "a.1,b.2"}
    with pytest.raises(BadRequestError, match="2 streams but observations of shape"):
        decode_steps(body, headers)


@pytest.mark.parametrize(
    "override,message",
    [
        (["--serve.replicas", "0"], "serve.replicas must be >= 1"),
        (["--serve.replicas", "3", "--serve.max_replicas", "2"], "max_replicas"),
        (["--serve.max_batch_size", "0"], "max_batch_size"),
        (["--serve.port", "70000"], "serve.port"),
        (["--serve.batch_wait_s", "-1"], "batch_wait_s"),
    ],
)
def test_serve_settings_are_checked_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)
