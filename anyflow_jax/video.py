"""Write generated videos: uint8 conversion, upscaling, mp4 / gif / npy files and a contact sheet.

Videos are arrays ``(F, H, W, C)`` (channels last) with values in ``[-1, 1]`` (the moving-digits
range; the model's raw output may leave it, values are clipped). ``C`` is 1 (grayscale) or 3 (RGB)
for the image formats; ``npy`` stores the raw float array whatever ``C`` is (e.g. latents).

- mp4: H.264 (libx264, yuv420p) through imageio's FFMPEG plugin (imageio-ffmpeg ships its own
  ffmpeg); grayscale is written as RGB; an odd height or width is padded by one edge row/column
  (yuv420p needs even sizes), so the file is ``(H + H % 2, W + W % 2)``;
- gif: written with imageio-ffmpeg's ffmpeg (lossless for grayscale, a per-video palette for RGB),
  looping. Not Pillow: Pillow's GIF writer merges identical consecutive frames, so a static video
  would come back with fewer frames than it has.

Every file is written under a temporary name in the target folder and renamed when complete,
so no half-written file ever has the final name.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

FORMATS = ("mp4", "gif", "npy")
IMAGE_FORMATS = ("mp4", "gif")

# contact-sheet layout (pixels)
SHEET_PAD = 8      # gap around the grid and between cells
FRAME_GAP = 2      # gap between the frames of one strip
LABEL_W = 80       # the row-label column on the left
HEADER_H = 20      # the column-label row on top
BACKGROUND = 255
TEXT = (0, 0, 0)


# ------------------------------------------------------------------------------ conversions
def to_uint8(video) -> np.ndarray:
    """``[-1, 1]`` -> ``[0, 255]`` (clipped, rounded); non-finite values become mid-gray."""
    v = np.nan_to_num(np.asarray(video, np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint((v + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale(video: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``(F, H, W, C)`` by an integer factor."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if scale == 1:
        return video
    return np.repeat(np.repeat(video, scale, axis=1), scale, axis=2)


def _check_image_video(video: np.ndarray) -> np.ndarray:
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3) or video.shape[0] < 1:
        raise ValueError(f"expected a uint8 video (F, H, W, 1|3), got {video.dtype} {video.shape}")
    return video


def _rgb(video: np.ndarray) -> np.ndarray:
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


# ------------------------------------------------------------------------------ files
def _no_fork_hook() -> None:
    # imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp (keeps Ctrl-C from reaching it),
    # which forces a Python-level fork of this multithreaded (JAX) process; JAX warns that this
    # may deadlock. This documented switch makes it a plain fork+exec (Ctrl-C then also stops
    # ffmpeg, which is what we want: the temporary file is removed either way).
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path`` (same extension), then rename."""
    folder, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    tmp = os.path.join(folder, f".{stem}.partial-{os.getpid()}{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_mp4(path: str, video: np.ndarray, fps: float = 8, quality: float = 8) -> None:
    """H.264 mp4 of a uint8 video ``(F, H, W, 1|3)``."""
    import imageio.v2 as iio2
    _no_fork_hook()
    v = _rgb(_check_image_video(video))
    ph, pw = v.shape[1] % 2, v.shape[2] % 2
    if ph or pw:
        v = np.pad(v, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")

    def write(tmp):
        writer = iio2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                 quality=quality, macro_block_size=2, ffmpeg_log_level="error")
        try:
            for frame in v:
                writer.append_data(np.ascontiguousarray(frame))
        finally:
            writer.close()

    write_atomic(path, write)


def write_gif(path: str, video: np.ndarray, fps: float = 8) -> None:
    """Looping gif of a uint8 video ``(F, H, W, 1|3)``, one gif frame per video frame."""
    import imageio_ffmpeg
    _no_fork_hook()
    v = _check_image_video(video)
    gray = v.shape[-1] == 1
    params = ["-loop", "0", "-f", "gif"]
    if not gray:  # one palette per video, computed from all its frames
        graph = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=none"
        params = ["-filter_complex", graph] + params

    def write(tmp):
        gen = imageio_ffmpeg.write_frames(tmp, (v.shape[2], v.shape[1]), fps=fps, codec="gif", quality=None,
                                          pix_fmt_in="gray" if gray else "rgb24",
                                          pix_fmt_out="gray" if gray else "pal8", macro_block_size=1,
                                          ffmpeg_log_level="error", output_params=params)
        gen.send(None)
        try:
            for frame in v:
                gen.send(np.ascontiguousarray(frame[..., 0] if gray else frame))
        finally:
            gen.close()

    write_atomic(path, write)


def write_npy(path: str, video) -> None:
    """The raw (float) video as ``.npy``."""
    arr = np.asarray(video)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    write_atomic(path, write)


def write_png(path: str, image) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


# ------------------------------------------------------------------------------ contact sheet
def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """All frames, or ``max_frames`` evenly spaced ones (first and last included)."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    if max_frames == 1:
        return [0]
    return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, max_frames)})


def sheet_size(num_rows: int, num_cols: int, frame_hw: tuple[int, int], frames_per_cell: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet; ``frame_hw`` is one (upscaled) frame."""
    fh, fw = frame_hw
    cell_w = frames_per_cell * fw + (frames_per_cell - 1) * FRAME_GAP
    return (LABEL_W + SHEET_PAD + num_cols * (cell_w + SHEET_PAD),
            HEADER_H + SHEET_PAD + num_rows * (fh + SHEET_PAD))


def _fit(draw, text: str, width: int, font) -> str:
    text = " ".join(str(text).split())  # one line: prompts may hold line breaks
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray]]], col_labels: Sequence[str], *,
                  max_frames: int = 8, corner: str = ""):
    """A PIL image: one row per ``(label, videos)``, one column per video (same shapes, uint8
    ``(F, H, W, 1|3)``, already upscaled); each cell is a strip of (every k-th) frame, left to right.
    Cell ``(i, j)`` frame ``k`` sits at ``x = LABEL_W + SHEET_PAD + j * (cell_w + SHEET_PAD) +
    k * (fw + FRAME_GAP)``, ``y = HEADER_H + SHEET_PAD + i * (fh + SHEET_PAD)``."""
    from PIL import Image, ImageDraw, ImageFont
    if not rows or not col_labels:
        raise ValueError("a contact sheet needs at least one row and one column")
    first = _check_image_video(rows[0][1][0])
    f, fh, fw, _ = first.shape
    idx = frame_indices(f, max_frames)
    cell_w = len(idx) * fw + (len(idx) - 1) * FRAME_GAP
    width, height = sheet_size(len(rows), len(col_labels), (fh, fw), len(idx))
    sheet = np.full((height, width, 3), BACKGROUND, np.uint8)
    for i, (_, videos) in enumerate(rows):
        if len(videos) != len(col_labels):
            raise ValueError(f"row {i} has {len(videos)} videos for {len(col_labels)} columns")
        y = HEADER_H + SHEET_PAD + i * (fh + SHEET_PAD)
        for j, video in enumerate(videos):
            video = _rgb(_check_image_video(video))
            if video.shape[:3] != first.shape[:3]:
                raise ValueError(f"all videos must have the shape {first.shape[:3]}, got {video.shape[:3]}")
            x0 = LABEL_W + SHEET_PAD + j * (cell_w + SHEET_PAD)
            for k, fi in enumerate(idx):
                x = x0 + k * (fw + FRAME_GAP)
                sheet[y:y + fh, x:x + fw] = video[fi]
    image = Image.fromarray(sheet, "RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def text_h(s):
        b = draw.textbbox((0, 0), s, font=font)
        return b[3] - b[1], b[1]

    for j, label in enumerate(col_labels):
        x0 = LABEL_W + SHEET_PAD + j * (cell_w + SHEET_PAD)
        s = _fit(draw, label, cell_w, font)
        th, top = text_h(s)
        draw.text((x0, max(0, (HEADER_H - th) // 2 - top)), s, fill=TEXT, font=font)
    for i, (label, _) in enumerate(rows):
        y = HEADER_H + SHEET_PAD + i * (fh + SHEET_PAD)
        s = _fit(draw, label, LABEL_W - 2 * SHEET_PAD, font)
        th, top = text_h(s)
        draw.text((SHEET_PAD, y + max(0, (fh - th) // 2) - top), s, fill=TEXT, font=font)
    if corner:
        s = _fit(draw, corner, LABEL_W - 2 * SHEET_PAD, font)
        th, top = text_h(s)
        draw.text((SHEET_PAD, max(0, (HEADER_H - th) // 2 - top)), s, fill=TEXT, font=font)
    return image
