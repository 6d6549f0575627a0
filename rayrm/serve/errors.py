"""What can go wrong with a served request: one exception class per HTTP status.

The replicas raise these, the HTTP front turns them into ``{"error": message}`` with their
status, and :class:`rayrm.serve.RewardClient` raises the same classes again on either path
(HTTP or a Ray Serve handle), so callers catch ``StreamLostError`` wherever they run.
"""

from __future__ import annotations


class ServeError(Exception):
    """A request the server refuses; ``status`` is its HTTP status."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the class across Ray's pickling of exceptions
        return (type(self), (self.message,))


class BadRequestError(ServeError):
    """Malformed JSON, a frame of the wrong shape or dtype, a prompt the encoder can't take."""

    status = 400


class UnknownStreamError(ServeError):
    """The replica that made this stream id has no such stream: never opened, or closed."""

    status = 404


class BodyTooLargeError(ServeError):
    status = 413


class StreamLostError(ServeError):
    """The replica that held the stream is gone (killed, or removed on scale-down): its
    history is lost with it. Open a new stream; no reward is ever computed without it."""

    status = 410


class ServerFullError(ServeError):
    """The replica holds ``serve.max_streams`` open streams; close some or add replicas."""

    status = 503


ERRORS_BY_STATUS = {
    cls.status: cls
    for cls in (
        BadRequestError,
        UnknownStreamError,
        BodyTooLargeError,
        StreamLostError,
        ServerFullError,
    )
}
