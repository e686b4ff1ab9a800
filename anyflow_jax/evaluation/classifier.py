"""A small video classifier for the moving-digits benchmark, trained on real videos only.

It plays the role Inception plays for FID: its penultimate embedding is the feature space of
the Fréchet distance, and its digit head judges whether a generated video shows the requested
digit. It never sees a generated video: it is trained on ``MovingDigitsSource(split='train')``
videos and its held-out accuracy is measured on ``split='test'`` videos, whose handwriting
(digit images) it has never seen.

Architecture (``VideoClassifier``), input ``(B, F, H, W, C)`` in about ``[-1, 1]``, shifted by +1
so that the background is 0:

1. ``Conv (3, 3, 3)`` x ``width`` + ReLU, stride 1: space-time features at full resolution (where
   a 1-2 pixel per frame motion is visible). It is a 2-D ``3 x 3`` convolution over the channels
   of frames ``f-1, f, f+1`` stacked (the same operator as a 3-D convolution with 'SAME'
   padding; XLA's CPU 3-D convolution is ~50x slower);
2. ``Conv (3, 3)`` x ``2 width``, stride 2, per frame + ReLU;
3. ``Conv (3, 3)`` x ``4 width``, stride 2, per frame + ReLU (receptive field 9x9 pixels, more
   than the 8x8 digit);
4. max over space per frame (where the digit is does not matter, what it is does);
5. flatten over time (frame order matters: the motion label is the *initial* direction, and the
   digit may bounce later) -> ``Dense(embed_dim)`` + ReLU = the **embedding** (the features);
6. two linear heads: digit class (10) and motion direction (8, ``DIRECTION_NAMES``).

The motion label is not always identifiable: a digit that starts against a wall and moves into
it shows the same video as one moving away from it. :func:`motion_bayes_accuracy` gives the best
accuracy any classifier can reach (about 0.84 for 16x16 canvases), for reading the motion head's
held-out accuracy.

Training: Adam on the sum of the two cross-entropies, a fixed number of steps on a fixed set of
training videos. Everything is a pure function of the :class:`ClassifierConfig` (data seed,
init seed, shuffling seed), so the same config gives the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from anyflow_jax import fileio

NUM_DIGITS = 10
NUM_DIRECTIONS = 8
FORMAT = "anyflow-video-classifier/1"
PARAMS_FILE = "classifier.msgpack"
META_FILE = "classifier.json"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines a trained classifier (it is stored next to the weights)."""
    video_shape: tuple[int, int, int, int] = (8, 16, 16, 1)
    width: int = 16
    embed_dim: int = 64
    train_samples: int = 16384
    train_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    test_samples: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "video_shape", tuple(int(s) for s in self.video_shape))
        if len(self.video_shape) != 4 or min(self.video_shape) < 1:
            raise ValueError(f"video_shape must be (F, H, W, C) with positive sizes, got {self.video_shape}")
        for name in ("width", "embed_dim", "train_samples", "train_steps", "batch_size", "test_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["video_shape"] = list(self.video_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "video_shape" else v) for k, v in d.items() if k in names})


class VideoClassifier(nn.Module):
    """Returns ``(digit_logits (B, 10), motion_logits (B, 8), embedding (B, embed_dim))``."""
    width: int = 16
    embed_dim: int = 64

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32) + 1.0   # background 0
        b, f = x.shape[:2]
        w = self.width
        conv = lambda feats, name, stride: nn.Conv(feats, (3, 3), strides=(stride, stride), padding="SAME", name=name)
        x = _per_frame(conv(w, "st_conv", 1), nn.relu, _temporal_stack(x))
        x = _per_frame(conv(2 * w, "conv1", 2), nn.relu, x)
        x = _per_frame(conv(4 * w, "conv2", 2), nn.relu, x)
        x = jnp.max(x, axis=(2, 3))                 # (B, F, 4w): translation invariant per frame
        x = x.reshape(b, -1)                        # keep the frame order
        emb = nn.relu(nn.Dense(self.embed_dim, name="embed")(x))
        return (nn.Dense(NUM_DIGITS, name="digit_head")(emb),
                nn.Dense(NUM_DIRECTIONS, name="motion_head")(emb), emb)


def _temporal_stack(x):
    """``(B, F, H, W, C) -> (B, F, H, W, 3C)``: frames ``f-1, f, f+1`` side by side (zeros beyond the
    ends), so that a 2-D ``k x k`` convolution on the result is a ``3 x k x k`` space-time
    convolution with 'SAME' padding (XLA's CPU 3-D convolution is ~50x slower than this)."""
    z = jnp.zeros_like(x[:, :1])
    prev = jnp.concatenate([z, x[:, :-1]], axis=1)
    nxt = jnp.concatenate([x[:, 1:], z], axis=1)
    return jnp.concatenate([prev, x, nxt], axis=-1)


def _per_frame(conv, act, x):
    b, f = x.shape[:2]
    y = act(conv(x.reshape((b * f,) + x.shape[2:])))
    return y.reshape((b, f) + y.shape[1:])


# ------------------------------------------------------------------------------------- data
def real_videos(num: int, *, split: str, seed: int, video_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num`` real moving-digit videos of ``split``: (videos (N, F, H, W, C), digits (N,), directions (N,))."""
    from anyflow_jax.data import MovingDigitsSource
    src = MovingDigitsSource(num, seed=seed, split=split, video_shape=tuple(video_shape))
    videos = np.empty((num,) + tuple(video_shape), np.float32)
    digits = np.empty((num,), np.int32)
    directions = np.empty((num,), np.int32)
    for i in range(num):
        s = src[i]
        videos[i], digits[i] = s["latents"], s["label"]
        directions[i] = src.motion(i)["direction"]
    return videos, digits, directions


def motion_bayes_accuracy(video_shape) -> float:
    """The highest motion-direction accuracy any classifier can reach on moving digits of this
    shape: videos with equal digit positions in every frame are indistinguishable, so the best
    guess for such a group is its most frequent initial direction (start, direction and speed
    are uniform and independent, as in ``MovingDigitsSource``)."""
    import collections
    import itertools
    from anyflow_jax.data.digits import DIGIT_SIZE, DIRECTIONS, SPEEDS, _reflect
    frames, height, width, _ = (int(s) for s in video_shape)
    hr, hc = height - DIGIT_SIZE, width - DIGIT_SIZE
    f = np.arange(frames)
    groups: dict = collections.defaultdict(collections.Counter)
    for r, c, d, s in itertools.product(range(hr + 1), range(hc + 1), range(len(DIRECTIONS)), SPEEDS):
        v = DIRECTIONS[d] * s
        key = tuple(_reflect(r + f * v[0], hr)) + tuple(_reflect(c + f * v[1], hc))
        groups[key][d] += 1
    total = (hr + 1) * (hc + 1) * len(DIRECTIONS) * len(SPEEDS)
    return float(sum(max(cnt.values()) for cnt in groups.values()) / total)


# Data seeds of the classifier's videos, offset from the config seed so that they never coincide
# with the generator's training data (data seed 0) or with each other.
_TRAIN_DATA_OFFSET, _TEST_DATA_OFFSET = 1000, 2000


# ------------------------------------------------------------------------------------- model
class TrainedClassifier:
    """A trained :class:`VideoClassifier` with its config and held-out accuracies."""

    def __init__(self, config: ClassifierConfig, params: Any, metrics: dict | None = None):
        self.config = config
        self.params = params
        self.metrics = dict(metrics or {})
        self.module = VideoClassifier(width=config.width, embed_dim=config.embed_dim)
        self._apply = jax.jit(self.module.apply)
        self.from_cache = False   # True when loaded from disk

    @property
    def held_out_accuracy(self) -> dict:
        """``{'digit': float, 'motion': float}`` on held-out ('test' split) real videos."""
        return dict(self.metrics.get("held_out_accuracy", {}))

    def predict(self, videos, batch_size: int = 256) -> dict[str, np.ndarray]:
        """``{'digit_logits', 'motion_logits', 'features'}`` as numpy arrays, in batches."""
        videos = np.asarray(videos, np.float32)
        want = self.config.video_shape
        if videos.ndim != 5 or tuple(videos.shape[1:]) != want:
            raise ValueError(f"the classifier takes videos of shape (N,) + {want}, got {videos.shape}")
        outs = {"digit_logits": [], "motion_logits": [], "features": []}
        n = videos.shape[0]
        for s in range(0, n, batch_size):
            chunk = videos[s:s + batch_size]
            pad = batch_size - chunk.shape[0] if n > batch_size else 0   # one compiled shape
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            d, m, e = self._apply({"params": self.params}, chunk)
            k = chunk.shape[0] - pad
            outs["digit_logits"].append(np.asarray(d)[:k])
            outs["motion_logits"].append(np.asarray(m)[:k])
            outs["features"].append(np.asarray(e)[:k])
        return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in outs.items()}

    def features(self, videos, batch_size: int = 256) -> np.ndarray:
        return self.predict(videos, batch_size)["features"].astype(np.float64)

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str) -> None:
        """Write ``classifier.msgpack`` and ``classifier.json`` into ``directory`` (each atomically:
        a temporary sibling, then ``os.replace``; the JSON is written last, so a reader that finds
        it finds complete weights)."""
        os.makedirs(directory, exist_ok=True)
        fileio.atomic_write_bytes(os.path.join(directory, PARAMS_FILE), serialization.to_bytes(self.params))
        meta = {"format": FORMAT, "config": self.config.to_dict(), **self.metrics}
        fileio.atomic_write_bytes(os.path.join(directory, META_FILE), (json.dumps(meta, indent=2) + "\n").encode())

    @classmethod
    def load(cls, directory: str) -> "TrainedClassifier":
        with open(os.path.join(directory, META_FILE)) as fh:
            meta = json.load(fh)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: not a {FORMAT} classifier (format {meta.get('format')!r})")
        config = ClassifierConfig.from_dict(meta["config"])
        template = _init_params(config)
        with open(os.path.join(directory, PARAMS_FILE), "rb") as fh:
            params = serialization.from_bytes(template, fh.read())
        metrics = {k: v for k, v in meta.items() if k not in ("format", "config")}
        clf = cls(config, params, metrics)
        clf.from_cache = True
        return clf


def _init_params(config: ClassifierConfig):
    module = VideoClassifier(width=config.width, embed_dim=config.embed_dim)
    x = jnp.zeros((1,) + config.video_shape, jnp.float32)
    return module.init(jax.random.key(config.seed), x)["params"]


def train_classifier(config: ClassifierConfig = ClassifierConfig(), *, verbose: bool = False) -> TrainedClassifier:
    """Train on real 'train'-split videos; measure digit and motion accuracy on 'test'-split videos."""
    t0 = time.perf_counter()
    shape = config.video_shape
    x_train, y_digit, y_motion = real_videos(config.train_samples, split="train",
                                             seed=config.seed + _TRAIN_DATA_OFFSET, video_shape=shape)
    module = VideoClassifier(width=config.width, embed_dim=config.embed_dim)
    params = _init_params(config)
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.train_steps, alpha=0.05))
    opt_state = tx.init(params)

    def loss_fn(p, x, yd, ym):
        d, m, _ = module.apply({"params": p}, x)
        ld = optax.softmax_cross_entropy_with_integer_labels(d, yd).mean()
        lm = optax.softmax_cross_entropy_with_integer_labels(m, ym).mean()
        return ld + lm, (ld, lm)

    @jax.jit
    def step(p, s, x, yd, ym):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, yd, ym)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(config.seed)
    n, b = config.train_samples, min(config.batch_size, config.train_samples)
    order = rng.permutation(n)
    pos = 0
    loss = None
    for i in range(config.train_steps):
        if pos + b > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + b]
        pos += b
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_digit[idx], y_motion[idx])
        if verbose and (i + 1) % 100 == 0:
            print(f"classifier step {i + 1}/{config.train_steps}: loss {float(loss):.4f}", flush=True)
    train_seconds = time.perf_counter() - t0

    clf = TrainedClassifier(config, params)
    x_test, t_digit, t_motion = real_videos(config.test_samples, split="test",
                                            seed=config.seed + _TEST_DATA_OFFSET, video_shape=shape)
    out = clf.predict(x_test)
    clf.metrics = {
        "held_out_accuracy": {
            "digit": float(np.mean(out["digit_logits"].argmax(-1) == t_digit)),
            "motion": float(np.mean(out["motion_logits"].argmax(-1) == t_motion)),
        },
        "held_out_samples": int(config.test_samples),
        "motion_bayes_accuracy": motion_bayes_accuracy(shape),
        "final_train_loss": float(loss) if loss is not None else None,
        "train_seconds": float(train_seconds),
    }
    return clf


def load_or_train(directory: str | None, config: ClassifierConfig, *, verbose: bool = False) -> TrainedClassifier:
    """The classifier cached in ``directory`` if it was trained with exactly ``config``, else
    train one (and cache it there when ``directory`` is given)."""
    if directory and os.path.exists(os.path.join(directory, META_FILE)):
        try:
            clf = TrainedClassifier.load(directory)
            if clf.config == config:
                return clf
        except (OSError, ValueError, KeyError, TypeError):
            pass   # a stale or foreign cache: retrain and overwrite it
    clf = train_classifier(config, verbose=verbose)
    if directory:
        clf.save(directory)
    return clf
