"""How an observation travels over HTTP: written once, used by the server and the client.

Two encodings of a step's body (``POST /streams/<id>/step``):

* raw: ``Content-Type: application/octet-stream``, the array's bytes in C order, and headers
  ``X-Shape: 96,96,3`` and ``X-Dtype: uint8`` (a frame) or ``X-Shape: 768`` and
  ``X-Dtype: float32`` (an embedding); X-Dtype defaults to uint8. No copy or text on
  either side: the fast path.
* JSON: ``{"frame": "<base64 of the bytes>", "shape": [96, 96, 3], "dtype": "uint8"}``, or
  ``{"embedding": [0.1, ...]}``. For callers that can only send text.

A frame is RGB uint8 [H, W, 3]; an embedding is float [D] with D the checkpoint's visual
dim (``GET /info``). Anything else is refused with 400 and says what arrived.

Many streams in one request (``POST /steps``, a vectorised environment stepping all its
copies at once): the same encodings of the stacked array [N, H, W, 3] or [N, D], with the
N stream ids in header ``X-Streams: id1,id2,...`` (raw) or in ``"streams": [...]`` (JSON).
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from rayrm.serve.errors import BadRequestError

RAW = "application/octet-stream"
DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16, "float64": np.float64}


def encode_observation(observation: np.ndarray, encoding: str = "raw") -> tuple[bytes, dict]:
    """(body, headers) of one step's request."""
    obs = np.ascontiguousarray(observation)
    if obs.dtype.name not in DTYPES:
        raise BadRequestError(f"dtype {obs.dtype} cannot be sent; use uint8 frames or float32")
    shape = ",".join(str(n) for n in obs.shape)
    if encoding == "raw":
        headers = {"Content-Type": RAW, "X-Shape": shape, "X-Dtype": obs.dtype.name}
        return obs.tobytes(), headers
    if encoding == "json":
        body = {
            "frame": base64.b64encode(obs.tobytes()).decode(),
            "shape": list(obs.shape),
            "dtype": obs.dtype.name,
        }
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    raise ValueError(f"unknown encoding {encoding!r}: raw or json")


def encode_steps(streams: list[str], observations: np.ndarray, encoding: str = "raw"):
    """(body, headers) of one ``POST /steps``: row i of ``observations`` for ``streams[i]``."""
    if len(streams) != len(observations):
        raise ValueError(f"{len(observations)} observations for {len(streams)} streams")
    body, headers = encode_observation(observations, encoding)
    if encoding == "raw":
        return body, {**headers, "X-Streams": ",".join(streams)}
    document = json.loads(body)
    document["streams"] = list(streams)
    return json.dumps(document).encode(), headers


def decode_steps(body: bytes, headers) -> tuple[list[str], np.ndarray]:
    """The stream ids and the stacked observations of one ``POST /steps``."""
    if _is_raw(headers):
        streams = [s for s in headers.get("x-streams", "").split(",") if s]
        observations = decode_observation(body, headers)
    else:
        document = parse_json(body)
        streams = document.get("streams")
        observations = _json_observation(document)
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise BadRequestError("a multi-stream step names its streams (X-Streams or 'streams')")
    if observations.ndim < 1 or len(observations) != len(streams):
        raise BadRequestError(
            f"{len(streams)} streams but observations of shape {list(observations.shape)}"
        )
    return streams, observations


def _is_raw(headers) -> bool:
    return headers.get("content-type", "").split(";")[0].strip() == RAW


def decode_observation(body: bytes, headers) -> np.ndarray:
    """The array a step's request carries; :class:`BadRequestError` naming what is wrong."""
    if _is_raw(headers):
        return _array(body, headers.get("x-shape"), headers.get("x-dtype", "uint8"), "header")
    return _json_observation(parse_json(body))


def _json_observation(document: dict) -> np.ndarray:
    if "embedding" in document:
        try:
            return np.asarray(document["embedding"], dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise BadRequestError(f"'embedding' is not a list of numbers: {err}") from None
    if "frame" not in document:
        raise BadRequestError("JSON body needs 'frame' (base64) or 'embedding'")
    try:
        data = base64.b64decode(document["frame"], validate=True)
    except (TypeError, binascii.Error) as err:
        raise BadRequestError(f"'frame' is not base64: {err}") from None
    shape = document.get("shape")
    shape = ",".join(str(n) for n in shape) if isinstance(shape, list) else shape
    return _array(data, shape, document.get("dtype", "uint8"), "field")


def parse_json(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequestError(f"malformed JSON: {err}") from None
    if not isinstance(document, dict):
        raise BadRequestError(f"expected a JSON object, got {type(document).__name__}")
    return document


def _array(data: bytes, shape: str | None, dtype: str | None, where: str) -> np.ndarray:
    names = ("X-Shape", "X-Dtype") if where == "header" else ("shape", "dtype")
    if not shape:
        raise BadRequestError(f"missing {names[0]} (e.g. 96,96,3 for a frame)")
    try:
        dims = tuple(int(n) for n in str(shape).split(","))
    except ValueError:
        raise BadRequestError(f"{names[0]} {shape!r} is not a list of integers") from None
    if dtype not in DTYPES:
        raise BadRequestError(f"{names[1]} {dtype!r} is not one of {', '.join(DTYPES)}")
    if any(n < 0 for n in dims):
        raise BadRequestError(f"{names[0]} {shape!r} has a negative size")
    expected = int(np.prod(dims)) * np.dtype(DTYPES[dtype]).itemsize
    if len(data) != expected:
        raise BadRequestError(
            f"{len(data)} bytes do not make a {dtype} array of shape {dims} ({expected} bytes)"
        )
    return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(dims)
