"""Stream pinning: every call on a stream goes to the replica that holds its state.

A Ray Serve request router (``ray.serve.request_router.RequestRouter``, the API Serve's own
``PowerOfTwoChoicesRequestRouter`` and the LLM prefix-cache router implement) sees each
pending request's method and arguments before it picks a replica. Calls that name a stream
(``step``, ``close``, ``stream_info``: the stream id is their first argument; ``step_many``:
a list of streams of one owner) go to the replica whose tag starts the id. Everything else
(``open``, ``info``) goes to the less loaded of two random replicas, as Serve's default
router does, which spreads new streams over the replicas.

When the owning replica is gone (killed, or removed on scale-down) no replica holds the
stream any more; the call then goes to any replica, which answers ``StreamLostError``
because the id is not one of its own. So a lost stream is always reported and never scored
from somebody else's history. Multiplexed model ids were the other way to pin, but Serve
treats them as a preference and falls back to any replica, which would lose a stream's state
silently.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from rayrm.serve.streams import stream_owner

STREAM_METHODS = ("step", "step_many", "close", "stream_info")


def requested_stream(request: PendingRequest | None) -> str | None:
    """The stream id a pending call names (``step_many``: the first of its streams, which
    all share one owner), or None for calls not on a stream."""
    if request is None or request.metadata.call_method not in STREAM_METHODS:
        return None
    first = request.args[0] if request.args else None
    if isinstance(first, list) and first:
        first = first[0]
    return first if isinstance(first, str) else None


class StreamAffinityRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        stream_id = requested_stream(pending_request)
        if stream_id is not None:
            owner = stream_owner(stream_id)
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    return [[replica]]
        if not candidate_replicas:
            return []
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
