"""Reading training videos: decode, resample to a fixed frame rate, resize and crop; captions files
and webdataset tar shards. Used by ``python -m anyflow_jax.prepare`` (see ``docs/prepare.md``).

Decoding goes through imageio's ffmpeg backend (``imageio_ffmpeg.read_frames``; the package ships
its own ffmpeg binary). Frames are streamed: only the frames the clip needs are kept, each resized
as soon as it arrives, and ffmpeg is stopped once the clip is complete, so a long 1080p video costs
no more memory than its clip.

**Resampling by timestamps.** ffmpeg hands out frames at the stream's constant rate ``src_fps``
(for variable-rate files its raw-video output duplicates or drops frames to that rate), so source
frame ``i`` covers the time ``[i / src_fps, (i + 1) / src_fps)``. Output frame ``j`` is at time
``j / fps`` and shows the source frame on screen at that moment::

    src_index(j) = floor(j * src_fps / fps)

(a tiny tolerance absorbs float error). With ``src_fps == fps`` every frame is kept; a faster
source drops frames, a slower one repeats them. The clip is the first ``num_frames`` output
frames, from the start of the video, as the reference's ``T2VTarDataset`` does; a video whose
last needed source frame does not exist is *too short*.

**Resize.** ``resize="crop"`` (the default) scales the frame, keeping its aspect ratio, until it
covers ``height x width`` and cuts the centre (one Pillow ``resize`` with a source box, bicubic,
antialiased when shrinking). ``resize="stretch"`` scales the whole frame to ``height x width``
(the reference resizes without cropping, which distorts other aspect ratios).

**Captions files** (folder inputs): JSONL, one object per line, ``{"video": "<path relative to the
videos folder>", "caption": "<text>"}``; or CSV with a header row naming the columns ``video`` and
``caption`` (case and surrounding spaces ignored; other columns ignored; standard CSV quoting, so
captions may hold commas, quotes and newlines). A ``caption`` that is a JSON list uses its first
element. Blank JSONL lines are ignored.

**Webdataset tars**: a sample is the group of members sharing a key, the member name up to the
first dot of its base name (``000123.mp4`` + ``000123.json`` -> key ``000123``). The video is the
member with a video extension (:data:`VIDEO_EXTENSIONS`), the caption comes from the JSON member:
its ``captions`` field, a string (used whole) or a list (its first element, ``captions[0]``, the
caption the reference trains on); without ``captions``, a string ``caption`` field.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tarfile
import tempfile
from typing import Iterable, Iterator

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
CAPTION_EXTENSIONS = (".jsonl", ".csv")

# Skip reasons (the ``reason`` field of the skipped-inputs file).
UNREADABLE = "unreadable"
TOO_SHORT = "too short"
NO_CAPTION = "no caption"
MISSING_VIDEO = "missing video"
DUPLICATE = "duplicate"
BAD_CAPTION_LINE = "bad captions line"
REASONS = (UNREADABLE, TOO_SHORT, NO_CAPTION, MISSING_VIDEO, DUPLICATE, BAD_CAPTION_LINE)


class SkipInput(Exception):
    """One input cannot become a training sample; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, " ".join(str(detail).split())
        super().__init__(f"{reason}: {self.detail}" if self.detail else reason)


# ------------------------------------------------------------------------------ frames
def source_indices(num_frames: int, src_fps: float, fps: float) -> np.ndarray:
    """Source frame index of each of ``num_frames`` output frames at ``fps`` (module docstring)."""
    if not (src_fps > 0 and math.isfinite(src_fps)):
        raise ValueError(f"source frame rate must be positive, got {src_fps!r}")
    j = np.arange(num_frames, dtype=np.float64)
    return np.floor(j * (float(src_fps) / float(fps)) + 1e-6).astype(np.int64)


def crop_box(src_w: int, src_h: int, width: int, height: int, resize: str = "crop") -> tuple:
    """The region ``(left, top, right, bottom)`` of a ``src_w x src_h`` frame (float pixels) that
    becomes the ``width x height`` output: the centred largest box of the output's aspect ratio
    for ``"crop"``, the whole frame for ``"stretch"``."""
    if resize == "stretch":
        return (0.0, 0.0, float(src_w), float(src_h))
    if resize != "crop":
        raise ValueError(f"resize must be 'crop' or 'stretch', got {resize!r}")
    scale = max(width / src_w, height / src_h)  # output pixels per source pixel
    bw, bh = width / scale, height / scale
    left, top = (src_w - bw) / 2.0, (src_h - bh) / 2.0
    return (left, top, left + bw, top + bh)


def resize_frame(frame: np.ndarray, height: int, width: int, resize: str = "crop") -> np.ndarray:
    """One uint8 frame ``(h, w, 3)`` -> ``(height, width, 3)`` (module docstring, "Resize")."""
    from PIL import Image
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(frame)
    img = Image.fromarray(np.ascontiguousarray(frame), mode="RGB")
    box = crop_box(w, h, width, height, resize)
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC, box=box))


def clip_from_frames(frames: Iterable[np.ndarray], src_fps: float, *, fps: float, num_frames: int,
                     height: int, width: int, resize: str = "crop") -> np.ndarray:
    """Resample and resize decoded frames (uint8 ``(h, w, 3)``, in order, at ``src_fps``) into the
    clip ``(num_frames, height, width, 3)`` uint8. Reads only as far as it needs; raises
    :class:`SkipInput` (too short) when the frames run out."""
    want = source_indices(num_frames, src_fps, fps)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    j, count = 0, 0
    for i, frame in enumerate(frames):
        count = i + 1
        if want[j] > i:
            continue
        small = resize_frame(frame, height, width, resize)
        while j < num_frames and want[j] == i:
            out[j] = small
            j += 1
        if j == num_frames:
            return out
    have = count / src_fps
    need = (int(want[-1]) + 1) / src_fps
    raise SkipInput(TOO_SHORT, f"{count} frames at {src_fps:g} fps ({have:.2f} s); {num_frames} frames at "
                               f"{fps:g} fps need {int(want[-1]) + 1} ({need:.2f} s)")


def _no_fork_hook() -> None:
    # As in anyflow_jax.video: imageio-ffmpeg would otherwise start ffmpeg through a Python-level
    # fork (preexec_fn), which JAX warns may deadlock a multithreaded process.
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def load_clip(path: str, *, fps: float = 16.0, num_frames: int = 81, height: int = 480, width: int = 832,
              resize: str = "crop") -> np.ndarray:
    """Decode the video file ``path`` into its training clip ``(num_frames, height, width, 3)``
    uint8 (module docstring). Raises :class:`SkipInput` for an unreadable or too short video."""
    import imageio_ffmpeg
    _no_fork_hook()
    try:
        gen = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    except Exception as e:  # noqa: BLE001 - any failure to start decoding
        raise SkipInput(UNREADABLE, _ffmpeg_message(e)) from None
    try:
        try:
            meta = next(gen)
        except Exception as e:  # noqa: BLE001 - ffmpeg could not read the header
            raise SkipInput(UNREADABLE, _ffmpeg_message(e)) from None
        src_fps = float(meta.get("fps") or 0.0)
        w, h = meta.get("size") or (0, 0)
        if not (src_fps > 0 and math.isfinite(src_fps)) or w < 1 or h < 1:
            raise SkipInput(UNREADABLE, f"no video stream with a frame rate and size (fps {meta.get('fps')}, "
                                        f"size {meta.get('size')})")
        frame_bytes = w * h * 3

        def frames() -> Iterator[np.ndarray]:
            for buf in gen:
                if len(buf) != frame_bytes:
                    raise SkipInput(UNREADABLE, f"truncated frame ({len(buf)} of {frame_bytes} bytes)")
                yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)

        try:
            return clip_from_frames(frames(), src_fps, fps=fps, num_frames=num_frames, height=height,
                                    width=width, resize=resize)
        except SkipInput:
            raise
        except Exception as e:  # noqa: BLE001 - a decoding error in the middle of the file
            raise SkipInput(UNREADABLE, _ffmpeg_message(e)) from None
    finally:
        gen.close()  # stops ffmpeg if the clip ended before the file did


def _ffmpeg_message(e: Exception) -> str:
    """The useful line of an imageio-ffmpeg error (its message appends all of ffmpeg's stderr)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    errors = [ln for ln in lines if "rror" in ln or "nvalid" in ln or "not found" in ln]
    head = lines[0]
    return f"{head} ({errors[-1]})" if errors and errors[-1] != head else head


# ------------------------------------------------------------------------------ inputs
@dataclasses.dataclass(frozen=True)
class VideoInput:
    """One candidate sample. ``key`` is stable and unique (the path relative to the videos folder,
    or ``<tar file name>/<sample key>``). ``caption`` is the captions file's text (None when the
    line has none); tar samples read theirs in :meth:`load_caption`."""
    key: str
    path: str                  # the video file, or the tar file
    caption: str | None = None
    member: str | None = None  # tar member of the video
    json_member: str | None = None  # tar member of the JSON metadata
    member_at: tuple | None = None  # (offset, size) of the video's bytes in a plain (uncompressed) tar
    json_at: tuple | None = None    # the same for the JSON member

    def load_caption(self) -> str:
        """The caption, reading it from the tar's JSON member if needed; :class:`SkipInput`
        (no caption) when there is none."""
        if self.member is None:
            caption = self.caption
        else:
            if self.json_member is None:
                raise SkipInput(NO_CAPTION, "no .json member")
            try:
                meta = json.loads(read_tar_member(self.path, self.json_member, self.json_at).decode("utf-8"))
            except (OSError, ValueError, tarfile.TarError) as e:
                raise SkipInput(NO_CAPTION, f"cannot read {self.json_member}: {e}") from None
            caption = caption_from_json(meta)
        if caption is None or not caption.strip():
            raise SkipInput(NO_CAPTION, "empty caption" if caption is not None else "no caption field")
        return caption

    def load_clip(self, tmp_dir: str | None = None, **kw) -> np.ndarray:
        """The training clip (see :func:`load_clip`); tar members go through a temporary file."""
        if self.member is None:
            return load_clip(self.path, **kw)
        try:
            data = read_tar_member(self.path, self.member, self.member_at)
        except (OSError, tarfile.TarError) as e:
            raise SkipInput(UNREADABLE, f"cannot read {self.member} from {self.path}: {e}") from None
        ext = os.path.splitext(self.member)[1] or ".mp4"
        fd, tmp = tempfile.mkstemp(suffix=ext, prefix="anyflow-prepare-", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return load_clip(tmp, **kw)
        finally:
            os.remove(tmp)


@dataclasses.dataclass
class Listing:
    """The inputs in their fixed order, and those skipped while listing (``(input, reason,
    detail)``)."""
    inputs: list[VideoInput]
    skipped: list[tuple[str, str, str]]


def caption_from_json(meta) -> str | None:
    """A webdataset sample's caption: ``captions`` (str, or list -> first element), else ``caption``."""
    if not isinstance(meta, dict):
        return None
    value = meta.get("captions", meta.get("caption"))
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def read_captions(path: str) -> tuple[list[tuple[int, str, object]], list[tuple[str, str, str]]]:
    """Parse a captions file: ``([(line, video, caption), ...], [(input, reason, detail), ...])``.

    ``caption`` is whatever the file holds (str, list, None); bad lines are returned as skips with
    the input named ``<file>:<line>``. Raises ``ValueError`` for a file that cannot be used at all
    (unknown extension, CSV without the ``video``/``caption`` columns, not UTF-8).
    """
    ext = os.path.splitext(path)[1].lower()
    name = os.path.basename(path)
    rows, bad = [], []
    try:
        with open(path, encoding="utf-8", newline="" if ext == ".csv" else None) as fh:
            if ext == ".jsonl":
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        bad.append((f"{name}:{n}", BAD_CAPTION_LINE, f"not JSON: {e}"))
                        continue
                    if not isinstance(obj, dict) or not isinstance(obj.get("video"), str) or not obj["video"]:
                        bad.append((f"{name}:{n}", BAD_CAPTION_LINE, 'expected an object with a "video" path'))
                        continue
                    rows.append((n, obj["video"], obj.get("caption")))
            elif ext == ".csv":
                reader = csv.reader(fh)
                header = next(reader, None)
                cols = [c.strip().lower() for c in header or []]
                if "video" not in cols or "caption" not in cols:
                    raise ValueError(f"{path}: the CSV header must name the columns video and caption, "
                                     f"got {header}")
                iv, ic = cols.index("video"), cols.index("caption")
                for row in reader:
                    n = reader.line_num
                    if not any(c.strip() for c in row):
                        continue
                    if len(row) <= max(iv, ic) or not row[iv].strip():
                        bad.append((f"{name}:{n}", BAD_CAPTION_LINE, f"expected columns video,caption, got {row}"))
                        continue
                    rows.append((n, row[iv].strip(), row[ic]))
            else:
                raise ValueError(f"{path}: captions must be a .jsonl or .csv file")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return rows, bad


def list_folder(videos_dir: str, captions_path: str) -> Listing:
    """Inputs of a videos folder with a captions file, in the captions file's order. Skips (with
    their reason): bad lines, videos listed twice (the first caption wins), listed videos that do
    not exist, and video files in the folder that no line names (no caption). A listed video
    with an empty caption stays an input and is skipped when processed, so every input counts."""
    rows, skipped = read_captions(captions_path)
    root = os.path.abspath(videos_dir)
    inputs: list[VideoInput] = []
    seen: set[str] = set()
    for n, video, caption in rows:
        key = os.path.normpath(video)
        path = video if os.path.isabs(video) else os.path.join(root, video)
        rel = os.path.relpath(os.path.abspath(path), root)
        if not rel.startswith(".."):
            key = rel
        if key in seen:
            skipped.append((key, DUPLICATE, f"listed again on line {n} of {os.path.basename(captions_path)}"))
            continue
        seen.add(key)
        if not os.path.exists(path) or os.path.isdir(path):
            skipped.append((key, MISSING_VIDEO, f"{path} does not exist" if not os.path.exists(path)
                            else f"{path} is a folder"))
            continue
        if isinstance(caption, list):
            caption = caption[0] if caption else None
        inputs.append(VideoInput(key=key, path=path, caption=caption if isinstance(caption, str) else None))
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(VIDEO_EXTENSIONS):
                key = os.path.relpath(os.path.join(folder, f), root)
                if key not in seen:
                    skipped.append((key, NO_CAPTION, "not in the captions file"))
    return Listing(inputs, skipped)


def webdataset_key(member_name: str) -> tuple[str, str]:
    """``("dir/000123", "mp4")`` for ``dir/000123.mp4`` (key up to the first dot of the base name)."""
    folder, base = os.path.split(member_name)
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def list_tars(tar_paths: list[str]) -> Listing:
    """Inputs of webdataset tar files, in the order given and member order within each. A key
    with a JSON but no video member is skipped (missing video); captions are read later."""
    names = {}
    for p in tar_paths:
        base = os.path.basename(p)
        if base in names:
            raise ValueError(f"two tar files have the name {base} ({names[base]} and {p}); sample keys "
                             f"are <tar name>/<key>, so tar names must be unique")
        names[base] = p
    inputs: list[VideoInput] = []
    skipped: list[tuple[str, str, str]] = []
    for p in tar_paths:
        tar_name = os.path.basename(p)
        groups: dict[str, dict[str, tuple]] = {}
        try:
            plain = _is_plain_tar(p)
            with tarfile.open(p) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = webdataset_key(m.name)
                    groups.setdefault(key, {})["." + ext] = (m.name, (m.offset_data, m.size) if plain else None)
        except (OSError, tarfile.TarError) as e:
            raise ValueError(f"{p}: not a readable tar file ({e})") from None
        for key, members in groups.items():
            sample_key = f"{tar_name}/{key}"
            video = next((members[e] for e in VIDEO_EXTENSIONS if e in members), None)
            if video is None:
                skipped.append((sample_key, MISSING_VIDEO, f"no video member ({', '.join(sorted(members))})"))
                continue
            js = members.get(".json", (None, None))
            inputs.append(VideoInput(key=sample_key, path=os.path.abspath(p), member=video[0], member_at=video[1],
                                     json_member=js[0], json_at=js[1]))
    return Listing(inputs, skipped)


def _is_plain_tar(path: str) -> bool:
    try:
        with tarfile.open(path, "r:"):
            return True
    except tarfile.ReadError:
        return False


def read_tar_member(tar_path: str, member: str, at: tuple | None = None) -> bytes:
    """The bytes of one member of a tar file: read directly at ``at = (offset, size)`` (plain tars,
    recorded while listing), else through ``tarfile`` (which scans the archive up to the member)."""
    if at is not None:
        offset, size = at
        with open(tar_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{member}: {tar_path} ends after {len(data)} of {size} bytes")
        return data
    with tarfile.open(tar_path) as tf:
        fh = tf.extractfile(member)
        if fh is None:
            raise tarfile.TarError(f"{member} is not a regular file")
        with fh:
            return fh.read()


def expand_tar_paths(paths: list[str]) -> list[str]:
    """Files as given; folders -> their ``*.tar`` files, sorted. ``ValueError`` for a missing path
    or a folder without tars."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith((".tar", ".tar.gz", ".tgz")))
            if not found:
                raise ValueError(f"--tars {p} holds no .tar files")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ValueError(f"--tars {p} does not exist")
    return out


def write_tar(path: str, members: dict[str, bytes]) -> None:
    """A plain tar file with the given members (in order); for tests and examples."""
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


__all__ = ["VIDEO_EXTENSIONS", "REASONS", "SkipInput", "source_indices", "crop_box", "resize_frame",
           "clip_from_frames", "load_clip", "VideoInput", "Listing", "caption_from_json", "read_captions",
           "list_folder", "webdataset_key", "list_tars", "read_tar_member", "expand_tar_paths", "write_tar"]
