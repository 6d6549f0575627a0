"""The Ray Serve application: a stateful model deployment behind a stateless HTTP front.

::

    HTTP client ──> Serve proxy ──> RewardHTTP (parse, check, forward; any replica)
                                        │ handle call, routed by stream id
    RewardClient in Ray ────────────────┴──> RewardModel replica (streams + @serve.batch)

``RewardModel`` replicas hold the streams (``rayrm.serve.streams.StreamTable``) and fuse the
steps that arrive within ``serve.batch_wait_s`` into one backbone call and one model call
(``@serve.batch``, the shape of Serve's batching guide). The router of ``RewardModel``
(``rayrm.serve.routing.StreamAffinityRouter``) pins each stream to its replica, so the front
needs no state and scales freely.

Scale-down and replica death: Serve drains a replica's in-flight requests before stopping
it, but the streams it holds go with it. Later calls on them get ``410 stream lost, open it
again``; an RL loop treats that as the end of its episode's reward and opens a new stream.
Raise ``serve.max_replicas`` above ``serve.replicas`` for autoscaling (on ongoing requests
per replica, ``serve.target_ongoing_requests``) only where episodes may be cut like that.

HTTP API (``serve.route_prefix``, default ``/``; encodings of a step in ``rayrm.serve.wire``)::

    GET    /info                       model facts: visual_dim, window, num_stages, ...
    POST   /streams                    {"prompt": "..."}  ->  {"stream": "<id>"}
    POST   /streams/<id>/step          a frame or embedding  ->  {"reward", "step", "stage",
                                                             "success"}
    POST   /steps                      N streams' frames at once  ->  {"results": [...]}
    GET    /streams/<id>               the stream's step count and its replica's facts
    DELETE /streams/<id>               ->  {"closed": "<id>"}

Errors come back as ``{"error": "..."}`` with 400 (bad input, malformed JSON, a prompt the
text encoder would truncate), 404 (unknown or closed stream), 410 (stream lost), 413 (body
over ``serve.max_body_mb``) or 503 (``serve.max_streams`` open).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from rayrm.config import Config, ServeConfig
from rayrm.serve.errors import (
    BodyTooLargeError,
    ServeError,
    StreamLostError,
    UnknownStreamError,
)
from rayrm.serve.routing import StreamAffinityRouter
from rayrm.serve.streams import StepResult, StreamTable, group_by_owner
from rayrm.serve.wire import decode_observation, decode_steps, parse_json
from rayrm.train.checkpoint import find_checkpoint, read_checkpoint_config

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "RewardModel"


@serve.deployment(name=MODEL_DEPLOYMENT)
class RewardModel:
    """Refusals come back as values (a ``ServeError``), not raised: a 4xx is the caller's
    business, and raising would log a traceback in the replica for every bad request."""

    def __init__(self, checkpoint: str, limits: dict):
        self.limits = ServeConfig(**limits)
        tag = serve.get_replica_context().replica_id.unique_id
        self.table = StreamTable.from_checkpoint(checkpoint, tag, self.limits)
        self._step_batch.set_max_batch_size(self.limits.max_batch_size)
        self._step_batch.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    # Every method is async: they all run on the replica's event loop, one at a time, so the
    # table is never touched by two threads (Serve runs sync methods in a thread pool).
    async def info(self) -> dict:
        return self.table.info()

    async def open(self, prompt: str) -> str | ServeError:
        return refusal_as_value(self.table.open, prompt)

    async def close(self, stream_id: str) -> None | ServeError:
        return refusal_as_value(self.table.close, stream_id)

    async def stream_info(self, stream_id: str) -> dict | ServeError:
        return refusal_as_value(self.table.stream_info, stream_id)

    async def step(self, stream_id: str, observation) -> StepResult | ServeError:
        return await self._step_batch((stream_id, observation))

    async def step_many(self, streams: list[str], observations) -> list[StepResult | ServeError]:
        """Steps of several of this replica's streams in one call; they join the same batch
        queue as single steps."""
        steps = [self._step_batch((s, o)) for s, o in zip(streams, observations)]
        return list(await asyncio.gather(*steps))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _step_batch(self, requests: list[tuple]) -> list:
        return self.table.step(requests)


def refusal_as_value(fn, *args):
    try:
        return fn(*args)
    except ServeError as err:
        return err


async def call_model(call, stream_id: str | None = None):
    """Await a handle call and raise what it refused; a replica that died under a stream's
    call is a lost stream, not a 500."""
    try:
        value = await call
    except (RayActorError, ActorUnavailableError) as err:
        if stream_id is None:
            raise
        raise StreamLostError(
            f"stream {stream_id} lost: its replica died ({type(err).__name__}); open it again"
        ) from None
    if isinstance(value, ServeError):
        raise value
    return value


async def call_many(model: DeploymentHandle, streams: list[str], observations) -> list:
    """``step_many`` on the replica owning ``streams``; its death loses each of them."""
    try:
        return await model.step_many.remote(streams, observations)
    except (RayActorError, ActorUnavailableError) as err:
        return [
            StreamLostError(f"stream {s} lost: its replica died ({type(err).__name__})")
            for s in streams
        ]


@serve.deployment(name="RewardHTTP")
class RewardHTTP:
    def __init__(self, model: DeploymentHandle, max_body_bytes: int):
        self.model = model
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._route(request))
        except ServeError as err:
            return JSONResponse({"error": err.message}, status_code=err.status)

    async def _route(self, request: Request) -> dict:
        path = request.url.path.removeprefix(request.scope["root_path"])
        parts = [p for p in path.split("/") if p]
        method = request.method
        if method == "GET" and parts == ["info"]:
            return await call_model(self.model.info.remote())
        if method == "POST" and parts == ["streams"]:
            prompt = parse_json(await self._body(request)).get("prompt")
            return {"stream": await call_model(self.model.open.remote(prompt))}
        if len(parts) == 3 and parts[0] == "streams" and parts[2] == "step" and method == "POST":
            observation = decode_observation(await self._body(request), request.headers)
            call = self.model.step.remote(parts[1], observation)
            return dataclasses.asdict(await call_model(call, parts[1]))
        if method == "POST" and parts == ["steps"]:
            streams, observations = decode_steps(await self._body(request), request.headers)
            return {"results": await self._step_many(streams, observations)}
        if len(parts) == 2 and parts[0] == "streams" and method == "GET":
            return await call_model(self.model.stream_info.remote(parts[1]), parts[1])
        if len(parts) == 2 and parts[0] == "streams" and method == "DELETE":
            await call_model(self.model.close.remote(parts[1]), parts[1])
            return {"closed": parts[1]}
        raise UnknownStreamError(f"no route {method} /{'/'.join(parts)}")

    async def _step_many(self, streams: list[str], observations) -> list[dict]:
        """One handle call per owning replica, one after the other: Serve gives the handle
        calls made while serving one request that request's id, and in Ray 2.60 two of them
        in flight at once stall in its router (seen: 60 s, then cancelled). A stream's refusal
        is its entry, ``{"error", "status"}``, and the others still get rewards."""
        out: list[dict] = [{}] * len(streams)
        for rows in group_by_owner(streams).values():
            results = await call_many(self.model, [streams[i] for i in rows], observations[rows])
            for i, result in zip(rows, results):
                out[i] = (
                    {"error": result.message, "status": result.status}
                    if isinstance(result, ServeError)
                    else dataclasses.asdict(result)
                )
        return out

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (never read whole)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLargeError(f"body of {declared} bytes over {self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLargeError(f"body over {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def gpus_per_replica(scfg: ServeConfig) -> float:
    if scfg.gpus_per_replica is not None:
        return scfg.gpus_per_replica
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(scfg: ServeConfig, checkpoint: str):
    """The bound application: model replicas (fixed or autoscaling) and the HTTP front."""
    read_checkpoint_config(checkpoint)  # a clear error here, not in every replica
    scaling = {"num_replicas": scfg.replicas}
    if scfg.max_replicas > scfg.replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": scfg.replicas,
                "max_replicas": scfg.max_replicas,
                "target_ongoing_requests": scfg.target_ongoing_requests,
                # a removed replica loses its streams: scale down only after a long lull
                "downscale_delay_s": scfg.downscale_delay_s,
            }
        }
    model = RewardModel.options(
        ray_actor_options={"num_cpus": scfg.cpus_per_replica, "num_gpus": gpus_per_replica(scfg)},
        max_ongoing_requests=scfg.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=StreamAffinityRouter),
        **scaling,
    ).bind(checkpoint, dataclasses.asdict(scfg))
    front = RewardHTTP.options(
        num_replicas=scfg.http_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=scfg.max_ongoing_requests,
    )
    return front.bind(model, int(scfg.max_body_mb * 2**20))


def start_serve(cfg: Config) -> str:
    """Deploy the application on the connected Ray; returns its HTTP address."""
    scfg = cfg.serve
    checkpoint = scfg.checkpoint or find_checkpoint(cfg.train.output, cfg.train.run_name)
    serve.start(http_options={"host": scfg.host, "port": scfg.port})
    serve.run(build_app(scfg, checkpoint), name=scfg.app_name, route_prefix=scfg.route_prefix)
    url = f"http://{scfg.host}:{scfg.port}{scfg.route_prefix.rstrip('/')}"
    logger.info("serving %s at %s (app %s)", checkpoint, url, scfg.app_name)
    return url


def run_serve(cfg: Config) -> None:
    """``rayrm serve``: deploy, then keep serving until interrupted (or return at once with
    ``serve.detach``, leaving the application running on the cluster)."""
    url = start_serve(cfg)
    info = json.dumps(
        serve.get_deployment_handle(MODEL_DEPLOYMENT, cfg.serve.app_name).info.remote().result()
    )
    logger.info("model: %s; try: curl %s/info", info, url)
    if cfg.serve.detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cfg.serve.app_name)
