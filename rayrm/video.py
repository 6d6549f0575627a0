"""Frames to pictures: labels drawn on frames, mp4 files, contact sheets.

mp4s are written through the ffmpeg binary that the ``imageio-ffmpeg`` wheel ships (no system
ffmpeg; the reference pipeline shelled out to one). Text is drawn with Pillow's built-in font,
so nothing here needs a display or a font file. Used by ``rayrm annotate-video`` and by evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT_COLOR = (255, 255, 0)
BOX_COLOR = (0, 0, 0)


def upscale(frames: np.ndarray, min_size: int) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the smaller side reaches ``min_size``
    (64x64 synthetic frames are too small to read); frames already large enough are kept."""
    height, width = frames.shape[-3:-1]
    factor = max(1, -(-min_size // min(height, width)))
    if factor == 1:
        return frames
    return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def _font(height: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(11, height // 12))


def draw_label(frame: np.ndarray, text: str) -> np.ndarray:
    """A copy of the uint8 [H, W, 3] frame with ``text`` on a black box in the top-left."""
    image = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(image)
    font = _font(frame.shape[0])
    pad = max(2, frame.shape[0] // 80)
    left, top, right, bottom = draw.textbbox((pad, pad), text, font=font)
    draw.rectangle((0, 0, right + pad, bottom + pad), fill=BOX_COLOR)
    draw.text((pad, pad), text, font=font, fill=TEXT_COLOR)
    return np.asarray(image)


def numbered_frames(frames: np.ndarray, min_size: int, start: int = 0) -> Iterable[np.ndarray]:
    """Each frame upscaled and labelled "Frame: i" (docs/recipe.md#stages)."""
    for i, frame in enumerate(frames):
        yield draw_label(upscale(frame, min_size), f"Frame: {start + i}")


def _even(frame: np.ndarray) -> np.ndarray:
    """H.264 with yuv420p needs even sides: pad one black row / column where needed."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)))


def write_mp4(path: str, frames: Iterable[np.ndarray], fps: int = 10) -> int:
    """Write uint8 RGB frames (all the same size) as an H.264 mp4; returns the frame count.

    Written under a temporary name and renamed, so a crash never leaves a truncated video."""
    import imageio_ffmpeg  # only the processes that write videos need it

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial.mp4"
    writer, count = None, 0
    try:
        for frame in frames:
            frame = _even(np.ascontiguousarray(frame, dtype=np.uint8))
            if writer is None:
                height, width = frame.shape[:2]
                writer = imageio_ffmpeg.write_frames(
                    tmp,
                    (width, height),
                    fps=fps,
                    codec="libx264",
                    pix_fmt_out="yuv420p",
                    macro_block_size=1,
                    output_params=["-movflags", "+faststart"],  # plays while loading in a browser
                    ffmpeg_log_level="error",
                )
                writer.send(None)
            writer.send(frame.tobytes())
            count += 1
    finally:
        if writer is not None:
            writer.close()
    if count == 0:
        raise ValueError(f"{path}: no frames to write")
    os.replace(tmp, path)
    return count


def count_mp4_frames(path: str) -> int:
    """Frames in a video, by decoding it (what a player would show)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    next(reader)  # metadata
    return sum(1 for _ in reader)


def contact_sheet(frames: np.ndarray, every: int, columns: int, min_size: int) -> np.ndarray:
    """Every ``every``-th frame (and the last), numbered, tiled ``columns`` wide: uint8 image."""
    picks = list(range(0, len(frames), max(1, every)))
    if picks[-1] != len(frames) - 1:
        picks.append(len(frames) - 1)
    # Tiles are smaller than video frames: a sheet is for an overview.
    tiles = [draw_label(upscale(frames[i], min_size // 2), str(i)) for i in picks]
    height, width = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    gap = 2
    sheet = np.full(
        (rows * (height + gap) + gap, min(columns, len(tiles)) * (width + gap) + gap, 3),
        255,
        np.uint8,
    )
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        y, x = gap + r * (height + gap), gap + c * (width + gap)
        sheet[y : y + height, x : x + width] = tile
    return sheet


def write_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, optimize=True)
