"""mp4 streams through PyAV (whose wheel bundles FFmpeg): encode frames, probe a file, and
decode a time range of it, for LeRobot v3 videos (several episodes one after another in a
file, each found by its ``from_timestamp``).

Files are opened through ``rayrm.data.storage`` (a pyarrow random-access file that PyAV reads
as a Python file object), so local paths and object-store URLs take the same code path.

Why PyAV and not Ray Data's ``read_lerobot`` (Ray 2.60): that reader imports the ``lerobot``
package and decodes with ``torchcodec``, neither of which the project depends on (lerobot
pulls in its own torch, datasets and hub stack, torchcodec needs a matching FFmpeg on the
system); it also yields its own columns (state, action, stats), not the blocks the embedding
pipeline packs. PyAV decodes the same files with nothing else installed.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from rayrm.data import storage
from rayrm.errors import UserError

DEFAULT_CODEC = "libx264"  # LeRobot's writers default to libsvtav1; any codec FFmpeg reads works
PIXEL_FORMAT = "yuv420p"  # what LeRobot writes; needs even frame sizes
# LeRobot's default ``tolerance_s``: how far a decoded frame's time may be from t / fps.
TIMESTAMP_TOLERANCE_S = 1e-4

# What PyAV raises for files it cannot read (FFmpegError subclasses OSError and ValueError).
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


class VideoTooShortError(UserError):
    """The file ends before the last frame the episode needs."""


def encode_mp4(frames: Iterable[np.ndarray], fps: int, codec: str = DEFAULT_CODEC) -> bytes:
    """uint8 [H, W, 3] frames, in order, as an mp4 file in memory; frame i at time i / fps."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = None
        for i, frame in enumerate(frames):
            if stream is None:
                stream = _video_stream(container, frame.shape, fps, codec)
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            image.pts = i
            image.time_base = Fraction(1, fps)
            container.mux(stream.encode(image))
        if stream is None:
            raise ValueError("no frames to encode")
        container.mux(stream.encode())  # flush the encoder
    return buffer.getvalue()


def _video_stream(container, shape: tuple[int, ...], fps: int, codec: str):
    height, width = shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"{PIXEL_FORMAT} needs even frame sizes, got {height}x{width}")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
    stream.time_base = Fraction(1, fps)
    if codec == "libx264":
        stream.options = {"crf": "10", "g": str(2 * fps)}  # near-lossless, a keyframe per 2 s
    return stream


@dataclass(frozen=True)
class VideoFacts:
    width: int
    height: int
    duration_s: float  # end of the last frame: its time plus one frame period


def codec_name(data: bytes) -> str:
    """The decoder name of an encoded mp4's video stream ("h264", "av1", ...), as LeRobot
    records it in ``info.json`` (``video.codec``)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return container.streams.video[0].codec_context.name


def probe(path: str) -> VideoFacts:
    """Size and duration of the first video stream; reads the header only (and, when the
    header has no duration, the packet index)."""
    with storage.open_input(path) as raw, av.open(raw, mode="r") as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        duration = _duration_s(container, stream)
        return VideoFacts(width=ctx.width, height=ctx.height, duration_s=duration)


def _duration_s(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    last = max(p.pts + (p.duration or 0) for p in container.demux(stream) if p.pts is not None)
    return float(last * stream.time_base)


def decode_range(
    path: str, from_timestamp: float, num_frames: int, fps: float
) -> Iterator[np.ndarray]:
    """Frames ``t = 0 .. num_frames - 1`` at ``from_timestamp + t / fps`` as uint8 [H, W, 3],
    in order. Seeks to the keyframe before ``from_timestamp`` and decodes forward, as
    LeRobot's pyav backend does; raises :class:`VideoTooShortError` when the stream ends
    first, ValueError when a frame is missing or off its time by more than the tolerance."""
    expected = 0
    with storage.open_input(path) as raw, av.open(raw, mode="r") as container:
        stream = container.streams.video[0]
        if from_timestamp > 0:
            offset = int(from_timestamp / stream.time_base)
            container.seek(offset, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            t = round((frame.time - from_timestamp) * fps)
            if t < 0:
                continue
            if t != expected or abs(frame.time - from_timestamp - t / fps) > TIMESTAMP_TOLERANCE_S:
                raise ValueError(
                    f"frame {expected} (at {from_timestamp + expected / fps:.4f} s) is missing: "
                    f"the next frame decoded is at {frame.time:.4f} s"
                )
            yield frame.to_ndarray(format="rgb24")
            expected += 1
            if expected == num_frames:
                return
    raise VideoTooShortError(
        f"video ends after {expected} of the episode's {num_frames} frames "
        f"(from {from_timestamp:.4f} s at {fps:g} fps)"
    )
