"""Data layer: Grain sources, the training pipeline and global batches (docs/data.md).

* :class:`MovingDigitsSource` - the embedded default (moving handwritten digits, class-conditioned
  through :func:`class_embeddings`, unconditional :func:`negative_embedding`).
* :class:`ArrayRecordLatentSource` / :func:`write_latent_records` - precomputed latents and text
  embeddings for real data.
* :func:`make_train_iterator` - shuffled, repeated, per-process batches; checkpointable state.
* :func:`global_batch` - per-process numpy batches to global ``jax.Array`` batches on a mesh.
"""
from anyflow_jax.data.digits import (
    DEFAULT_VIDEO_SHAPE,
    DIRECTION_NAMES,
    DIRECTIONS,
    NUM_CLASSES,
    SPLITS,
    MovingDigitsSource,
    class_embeddings,
    motion_params,
    negative_embedding,
    split_indices,
)
from anyflow_jax.data.pipeline import (
    TrainIterator,
    iterator_state_to_bytes,
    make_train_iterator,
    orbax_restore_args,
    orbax_save_args,
    restore_iterator_state,
)
from anyflow_jax.data.records import (
    ArrayRecordLatentSource,
    RecordFormatError,
    decode_sample,
    encode_sample,
    read_latent_records,
    resolve_record_paths,
    write_latent_records,
)
from anyflow_jax.data.sharding import batch_sharding, global_batch

__all__ = [
    "DEFAULT_VIDEO_SHAPE", "DIRECTION_NAMES", "DIRECTIONS", "NUM_CLASSES", "SPLITS",
    "MovingDigitsSource", "class_embeddings", "motion_params", "negative_embedding",
    "split_indices",
    "TrainIterator", "iterator_state_to_bytes", "make_train_iterator", "orbax_restore_args",
    "orbax_save_args", "restore_iterator_state",
    "ArrayRecordLatentSource", "RecordFormatError", "decode_sample", "encode_sample",
    "read_latent_records", "resolve_record_paths", "write_latent_records",
    "batch_sharding", "global_batch",
]
