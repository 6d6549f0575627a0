"""``RewardClient``: the served reward model from Python, over HTTP or a Serve handle.

::

    client = RewardClient("http://127.0.0.1:8000")   # outside Ray (any process, any machine)
    client = RewardClient()                          # inside the Ray cluster: a Serve handle
    stream = client.open("Put the cube in the pot.") # one per environment episode
    reward = client.step(stream, frame).reward       # uint8 [H, W, 3], or an embedding [D]
    client.close(stream)
    results = client.step_many(streams, frames)      # a vectorised env: [N, H, W, 3], one call

Both paths raise the same errors (``rayrm.serve.errors``): ``StreamLostError`` when the
stream's replica is gone (open a new stream), ``BadRequestError`` for bad input, and so on.
One client may be shared by threads: HTTP connections are kept per thread.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import requests
from ray.exceptions import ActorUnavailableError, RayActorError

from rayrm.serve.errors import ERRORS_BY_STATUS, ServeError, StreamLostError
from rayrm.serve.streams import StepResult, group_by_owner
from rayrm.serve.wire import encode_observation, encode_steps


class RewardClient:
    def __init__(
        self,
        url: str | None = None,
        app_name: str = "rayrm",
        encoding: str = "raw",
        timeout_s: float = 60.0,
    ):
        self.url = url.rstrip("/") if url else None
        self.encoding = encoding
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._handle = None
        if self.url is None:
            from ray import serve

            from rayrm.serve.app import MODEL_DEPLOYMENT

            self._handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)

    def info(self) -> dict:
        if self._handle is not None:
            return self._answer(None, self._handle.info.remote())
        return self._http("GET", "/info")

    def open(self, prompt: str) -> str:
        if self._handle is not None:
            return self._answer(None, self._handle.open.remote(prompt))
        return self._http("POST", "/streams", json.dumps({"prompt": prompt}).encode())["stream"]

    def step(self, stream: str, observation: np.ndarray) -> StepResult:
        if self._handle is not None:
            return self._answer(stream, self._handle.step.remote(stream, observation))
        body, headers = encode_observation(observation, self.encoding)
        return StepResult(**self._http("POST", f"/streams/{stream}/step", body, headers))

    def step_many(
        self, streams: list[str], observations: np.ndarray
    ) -> list[StepResult | ServeError]:
        """One step of each stream (row i of ``observations`` for ``streams[i]``), in one HTTP
        request: the way for a vectorised environment. Each item is the stream's result, or
        the error it met (e.g. a ``StreamLostError``: reopen that stream); the others go on."""
        if self._handle is not None:
            return self._step_many_handle(list(streams), np.asarray(observations))
        body, headers = encode_steps(list(streams), np.asarray(observations), self.encoding)
        results = self._http("POST", "/steps", body, headers)["results"]
        return [
            ERRORS_BY_STATUS.get(r["status"], ServeError)(r["error"])
            if "error" in r
            else StepResult(**r)
            for r in results
        ]

    def _step_many_handle(self, streams: list[str], observations: np.ndarray) -> list:
        """One ``step_many`` call per owning replica, all in flight at once."""
        groups = list(group_by_owner(streams).values())
        calls = [
            self._handle.step_many.remote([streams[i] for i in rows], observations[rows])
            for rows in groups
        ]
        out: list = [None] * len(streams)
        for rows, call in zip(groups, calls):
            try:
                results = self._answer(streams[rows[0]], call)
            except StreamLostError as err:
                results = [err] * len(rows)
            for i, result in zip(rows, results):
                out[i] = result
        return out

    def stream_info(self, stream: str) -> dict:
        """The stream's step count, and the facts of the replica holding it."""
        if self._handle is not None:
            return self._answer(stream, self._handle.stream_info.remote(stream))
        return self._http("GET", f"/streams/{stream}")

    def close(self, stream: str) -> None:
        if self._handle is not None:
            self._answer(stream, self._handle.close.remote(stream))
        else:
            self._http("DELETE", f"/streams/{stream}")

    def _answer(self, stream: str | None, response):
        """The call's value; what the replica refused (returned as a value) is raised."""
        try:
            value = response.result(timeout_s=self.timeout_s)
        except (RayActorError, ActorUnavailableError) as err:
            if stream is None:
                raise
            raise StreamLostError(
                f"stream {stream} lost: its replica died ({type(err).__name__}); open it again"
            ) from None
        if isinstance(value, ServeError):
            raise value
        return value

    def _http(self, method: str, path: str, body: bytes | None = None, headers=None) -> dict:
        session = getattr(self._local, "session", None)
        if session is None:  # requests.Session is not thread-safe: one per thread
            session = self._local.session = requests.Session()
        headers = headers or ({"Content-Type": "application/json"} if body else {})
        reply = session.request(
            method, self.url + path, data=body, headers=headers, timeout=self.timeout_s
        )
        if reply.status_code == 200:
            return reply.json()
        try:
            message = reply.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:500]
        error = ERRORS_BY_STATUS.get(reply.status_code, ServeError)
        err = error(f"{message} (HTTP {reply.status_code})")
        err.status = reply.status_code
        raise err
