"""Online rewards as a service: ``rayrm serve`` and :class:`RewardClient`.

RL with a learned reward calls the model at every environment step, from many actors at once.
``rayrm serve`` puts a checkpoint behind Ray Serve: streams (one per environment episode),
steps of all streams batched into one backbone and one model call, replicas pinned per stream,
HTTP on 127.0.0.1 and a Python client. See ``rayrm.serve.app`` for the API and
``docs/serve.md`` for the commands and measured load.
"""

from rayrm.serve.client import RewardClient
from rayrm.serve.errors import (
    BadRequestError,
    BodyTooLargeError,
    ServeError,
    ServerFullError,
    StreamLostError,
    UnknownStreamError,
)
from rayrm.serve.streams import StepResult, StreamTable

__all__ = [
    "BadRequestError",
    "BodyTooLargeError",
    "RewardClient",
    "ServeError",
    "ServerFullError",
    "StepResult",
    "StreamLostError",
    "StreamTable",
    "UnknownStreamError",
]
