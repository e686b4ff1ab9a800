"""Moving digits: the embedded default data set (the toy results: docs/results.md).

scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1797 images of
8x8 pixels, values 0..16, no download) animated into short videos: one digit moving with a
constant velocity on a small canvas and bouncing off its walls. The videos stand in for VAE
latents (channels-last ``(F, H, W, C)``, values in ``[-1, 1]``, background ``-1``), and a fixed
random class-embedding table stands in for text embeddings.

Everything is a pure function of ``(seed, split, index)``: sample ``i`` draws its digit image,
start position and velocity from ``np.random.default_rng([seed, i])``; there is no other state.

Motion model. The digit's top-left corner ``p = (row, col)`` lives on the integer grid
``[0, H - 8] x [0, W - 8]`` (the whole 8x8 digit always lies inside the canvas). The velocity is
one of 8 compass directions times a speed in ``{1, 2}`` pixels per frame. Frame ``f`` shows the
digit at ``reflect(p0 + f * v)``, where ``reflect`` folds the straight line back into the range
(a wall bounce). Positions stay integers, so frames are exact copies of the digit (no blur).
"""
from __future__ import annotations

import functools
import operator
from typing import Any

import numpy as np

DIGIT_SIZE = 8
NUM_CLASSES = 10
DEFAULT_VIDEO_SHAPE = (8, 16, 16, 1)
DEFAULT_CONTEXT_LENGTH = 4
DEFAULT_TEXT_DIM = 32
DEFAULT_NUM_SAMPLES = 8192

SPLITS = ("train", "test", "all")
# Fraction of each class's images held out for the 'test' split, and the (fixed, seed-independent)
# seed of the split: the same images are held out whatever the data seed, so a classifier trained
# on 'train' videos can be evaluated on 'test' videos of unseen handwriting.
TEST_FRACTION = 0.2
_SPLIT_SEED = 20240607

# Compass directions as (d_row, d_col) unit steps; the index is the motion class.
# Rows grow downwards, so "N" (index 2) moves up the image.
DIRECTIONS = np.array(
    [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)], dtype=np.int64)
DIRECTION_NAMES = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
SPEEDS = (1, 2)

# Stream tags mixed into the embedding seeds so that class and negative rows never coincide.
_CLASS_TAG, _NEGATIVE_TAG = 0, 1


# --------------------------------------------------------------------------- conditioning

def class_embeddings(num_classes: int = NUM_CLASSES, length: int = DEFAULT_CONTEXT_LENGTH,
                     dim: int = DEFAULT_TEXT_DIM, seed: int = 0) -> np.ndarray:
    """The fixed class-embedding table standing in for text embeddings: ``(num_classes, length, dim)``.

    Entries are i.i.d. standard normal (unit scale, like layer-normed text-encoder outputs),
    float32, a pure function of ``(num_classes, length, dim, seed)``.
    """
    _check_positive(num_classes=num_classes, length=length, dim=dim)
    rng = np.random.default_rng([seed, _CLASS_TAG, num_classes, length, dim])
    return rng.standard_normal((num_classes, length, dim)).astype(np.float32)


def negative_embedding(length: int = DEFAULT_CONTEXT_LENGTH, dim: int = DEFAULT_TEXT_DIM,
                       seed: int = 0) -> np.ndarray:
    """The negative (unconditional) embedding, ``(1, length, dim)`` float32.

    A separate fixed standard-normal row, drawn from its own seed stream (so it differs from
    every class row), rather than zeros: like a real negative-prompt embedding it is an ordinary
    non-zero "prompt" the network has to learn to treat as unconditional (classifier-free
    guidance trains it by replacing the context with it at some rate).
    """
    _check_positive(length=length, dim=dim)
    rng = np.random.default_rng([seed, _NEGATIVE_TAG, length, dim])
    return rng.standard_normal((1, length, dim)).astype(np.float32)


# --------------------------------------------------------------------------- images and splits

@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: only the moving-digits source needs sklearn
    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0   # [0, 16] -> [-1, 1], background -1
    images.setflags(write=False)
    labels = d.target.astype(np.int32)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of the images used by ``split`` ('train', 'test' or 'all').

    Stratified and fixed: for every class, a fixed permutation of its images puts
    ``round(TEST_FRACTION * n_class)`` in 'test' and the rest in 'train'. 'all' is every image.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    _, labels = _digits()
    if split == "all":
        out = np.arange(len(labels))
    else:
        rng = np.random.default_rng(_SPLIT_SEED)
        chosen = []
        for c in range(NUM_CLASSES):
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_test = int(round(TEST_FRACTION * len(idx)))
            chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
        out = np.sort(np.concatenate(chosen))
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------- motion

def _reflect(x: np.ndarray, hi: int) -> np.ndarray:
    """Fold positions on a straight line into ``[0, hi]`` (elastic bounces off both walls)."""
    if hi == 0:
        return np.zeros_like(x)
    period = 2 * hi
    q = np.mod(x, period)
    return np.where(q <= hi, q, period - q)


def _draw(seed: int, index: int, num_images: int, video_shape) -> dict[str, Any]:
    """All random choices of sample ``index``, in a fixed draw order."""
    frames, height, width, _ = video_shape
    rng = np.random.default_rng([seed, index])
    image_pos = int(rng.integers(num_images))
    hi = np.array([height - DIGIT_SIZE, width - DIGIT_SIZE], dtype=np.int64)
    start = np.array([rng.integers(hi[0] + 1), rng.integers(hi[1] + 1)], dtype=np.int64)
    direction = int(rng.integers(len(DIRECTIONS)))
    speed = int(SPEEDS[rng.integers(len(SPEEDS))])
    velocity = DIRECTIONS[direction] * speed
    f = np.arange(frames, dtype=np.int64)[:, None]
    positions = np.stack([_reflect(start[0] + f[:, 0] * velocity[0], int(hi[0])),
                          _reflect(start[1] + f[:, 0] * velocity[1], int(hi[1]))], axis=-1)
    return dict(image_pos=image_pos, start=start, velocity=velocity, direction=direction,
                speed=speed, positions=positions)


class MovingDigitsSource:
    """Grain random-access source of moving-digit videos (``grain.MapDataset.source(src)``).

    ``src[i]`` is ``dict(latents=float32 (F, H, W, C), label=int32 (), context=float32 (L, D))``:
    the video, its digit class and that class's row of :func:`class_embeddings`.
    ``src.negative_context`` is :func:`negative_embedding` ``(1, L, D)``.

    Args:
      num_samples: ``len(src)``; the videos are generated on the fly, so any size is fine.
      seed: data seed; ``(seed, index)`` determines the sample.
      split: 'train', 'test' (held-out handwriting, see :func:`split_indices`) or 'all'.
      video_shape: ``(F, H, W, C)``; ``H, W >= 8``; channels repeat the grey video.
      context_length, text_dim, embedding_seed: shape and seed of the conditioning table.
    """

    def __init__(self, num_samples: int = DEFAULT_NUM_SAMPLES, *, seed: int = 0,
                 split: str = "train", video_shape=DEFAULT_VIDEO_SHAPE,
                 context_length: int = DEFAULT_CONTEXT_LENGTH, text_dim: int = DEFAULT_TEXT_DIM,
                 embedding_seed: int = 0):
        video_shape = tuple(int(s) for s in video_shape)
        if len(video_shape) != 4:
            raise ValueError(f"video_shape must be (F, H, W, C), got {video_shape}")
        frames, height, width, channels = video_shape
        if frames < 1 or channels < 1:
            raise ValueError(f"video_shape {video_shape}: frames and channels must be >= 1")
        if height < DIGIT_SIZE or width < DIGIT_SIZE:
            raise ValueError(f"video_shape {video_shape}: the canvas must be at least "
                             f"{DIGIT_SIZE}x{DIGIT_SIZE} (the digit size)")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.split = split
        self.video_shape = video_shape
        self.image_indices = split_indices(split)   # validates the split name
        self.embeddings = class_embeddings(NUM_CLASSES, context_length, text_dim, embedding_seed)
        self.negative_context = negative_embedding(context_length, text_dim, embedding_seed)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def fingerprint(self) -> str:
        """Identifies the data (checked when an iterator state is restored)."""
        return repr(self)

    def __repr__(self) -> str:
        return (f"MovingDigitsSource(num_samples={self.num_samples}, seed={self.seed}, "
                f"split={self.split!r}, video_shape={self.video_shape})")

    def _index(self, index) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an integer, got {index!r}") from None
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self!r} (valid: 0..{self.num_samples - 1})")
        return i % self.num_samples

    def motion(self, index) -> dict[str, Any]:
        """Motion parameters of sample ``index``.

        ``start`` (2,) and ``velocity`` (2,) as (row, col) pixels / pixels per frame,
        ``positions`` (F, 2) the digit's top-left corner in every frame (after bounces),
        ``direction`` the initial compass direction class in ``0..7`` (see ``DIRECTION_NAMES``),
        ``speed`` in ``SPEEDS``, and ``image_index`` into ``sklearn.datasets.load_digits()``.
        """
        p = _draw(self.seed, self._index(index), len(self.image_indices), self.video_shape)
        p["image_index"] = int(self.image_indices[p.pop("image_pos")])
        return p

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        m = self.motion(index)
        images, labels = _digits()
        digit = images[m["image_index"]]
        frames, height, width, channels = self.video_shape
        video = np.full((frames, height, width), -1.0, dtype=np.float32)
        for f, (r, c) in enumerate(m["positions"]):
            video[f, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] = digit
        label = labels[m["image_index"]]
        return dict(
            latents=np.repeat(video[..., None], channels, axis=-1),
            label=np.asarray(label, dtype=np.int32),
            context=self.embeddings[label].copy(),
        )


def motion_params(index: int, *, seed: int = 0, split: str = "train",
                  video_shape=DEFAULT_VIDEO_SHAPE, num_samples: int = DEFAULT_NUM_SAMPLES) -> dict:
    """:meth:`MovingDigitsSource.motion` without building a source by hand."""
    return MovingDigitsSource(num_samples, seed=seed, split=split, video_shape=video_shape).motion(index)


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
