"""transformers-format UMT5 text encoders (a diffusers Wan pipeline's ``text_encoder/``) -> Flax.

The folder is what transformers' ``UMT5EncoderModel.save_pretrained`` writes: ``config.json`` and
either one ``model.safetensors`` or shards ``model-0000x-of-0000y.safetensors`` listed in
``model.safetensors.index.json``. Only safetensors are read (no ``pytorch_model.bin``).

The mapping is one declarative table (:func:`param_table`): transformers name -> Flax path ->
layout transform. Loading is strict: every missing, unexpected or mis-shaped tensor is named in
one :class:`~anyflow_jax.checkpoints.diffusers.CheckpointError`, raised before anything is
converted. The one documented exception is the tied token embedding: ``UMT5EncoderModel`` holds
one embedding under two names, ``shared.weight`` and ``encoder.embed_tokens.weight``
(transformers saves ``shared.weight`` only; other writers may save either or both). Either name
is accepted; when both are present they must be equal, and the pair counts as one tensor.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from anyflow_jax.checkpoints.diffusers import (IDENTITY, LINEAR, CheckpointError, Transform, _progress, _set,
                                               expected_torch_shapes, layer_path, read_json_config)
from anyflow_jax.checkpoints.diffusers import _TensorStore as _DiffusersStore
from anyflow_jax.checkpoints.safetensors_io import SafetensorsError
from anyflow_jax.models.umt5 import UMT5Encoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # one tied tensor, two names
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "keep_wo_fp32")


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_name: str
    flax_path: tuple[str, ...]  # path inside the per-layer params (without the layer axis)
    transform: Transform
    layer: int | None = None  # encoder block index, or None for top-level parameters


def param_table(model: UMT5Encoder) -> list[Entry]:
    """The full transformers <-> Flax table for ``model`` (the embedding under ``shared.weight``)."""
    entries = [Entry("shared.weight", ("embed_tokens",), IDENTITY),
               Entry("encoder.final_layer_norm.weight", ("final_layer_norm", "scale"), IDENTITY)]
    ffn = ("wi_0", "wi_1", "wo") if model.is_gated_act else ("wi", "wo")
    for i in range(model.num_layers):
        p = f"encoder.block.{i}.layer"
        layer = [(f"{p}.0.layer_norm.weight", ("attn_norm", "scale"), IDENTITY),
                 (f"{p}.0.SelfAttention.relative_attention_bias.weight", ("attn", "relative_attention_bias"),
                  IDENTITY)]
        layer += [(f"{p}.0.SelfAttention.{n}.weight", ("attn", n, "kernel"), LINEAR) for n in ("q", "k", "v", "o")]
        layer.append((f"{p}.1.layer_norm.weight", ("ffn_norm", "scale"), IDENTITY))
        layer += [(f"{p}.1.DenseReluDense.{n}.weight", ("ffn", n, "kernel"), LINEAR) for n in ffn]
        entries += [Entry(n, path, tr, i) for n, path, tr in layer]
    return entries


def _flax_path(model: UMT5Encoder, entry: Entry) -> tuple[str, ...]:
    return layer_path(entry, model.scan_layers, "layers")


def _expected_shapes(model: UMT5Encoder) -> dict[str, tuple[int, ...]]:
    """transformers name -> torch shape, derived from the Flax parameter shapes."""
    return expected_torch_shapes(model, param_table(model), "layers", lambda e: e.torch_name)


# ----------------------------------------------------------------------------------- reading
def _TensorStore(path: str):
    """The tensors of a transformers safetensors folder (``model.safetensors`` or its index)."""
    return _DiffusersStore(path, weights_name=WEIGHTS_NAME, index_name=INDEX_NAME)


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a transformers UMT5 encoder folder."""
    return read_json_config(path, "transformers text encoder")[0]


def _fmt(names: list[str]) -> str:
    return f"{names[:10]}{' ...' if len(names) > 10 else ''}"


def load_text_encoder(path, *, dtype=jnp.float32, model_kwargs: Mapping[str, Any] | None = None,
                      progress: bool = False) -> tuple[UMT5Encoder, dict]:
    """Load a transformers-format UMT5 encoder folder as ``(model, params)``.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` + shards (a diffusers Wan pipeline's ``text_encoder/``).
      dtype: dtype of the returned parameters and the module's compute dtype (default float32;
        ``jnp.bfloat16`` halves the XXL encoder's 23 GB). ``None`` keeps each tensor's stored
        dtype and computes in float32.
      model_kwargs: runtime fields of :class:`UMT5Encoder` (``dtype`` = compute dtype,
        ``param_dtype``, ``scan_layers``, ``keep_wo_fp32``); they win over ``dtype``.
      progress: show a progress bar while reading tensors.

    Returns:
      ``(model, params)`` with ``model.apply({'params': params}, input_ids, attention_mask)``
      equal to transformers' ``UMT5EncoderModel(...).last_hidden_state``.
    """
    path = os.fspath(path)
    cfg = read_config(path)
    runtime = dict(model_kwargs or {})
    unknown = sorted(set(runtime) - set(_RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"model_kwargs may only set {_RUNTIME_FIELDS}; got {unknown}")
    if dtype is not None:
        runtime.setdefault("dtype", jnp.dtype(dtype))
        runtime.setdefault("param_dtype", jnp.dtype(dtype))
    try:
        model = UMT5Encoder.from_config(cfg, **runtime)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG_NAME}: {e}") from None
    try:
        store = _TensorStore(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None

    table = param_table(model)
    expected = _expected_shapes(model)
    present = store.names()
    embed_present = [n for n in EMBED_NAMES if n in present]
    needed = {k: v for k, v in expected.items() if k != EMBED_NAMES[0]}
    problems = []
    missing = sorted(set(needed) - present)
    if not embed_present:
        missing = [f"{EMBED_NAMES[0]} (or its tied copy {EMBED_NAMES[1]})"] + missing
    unexpected = sorted(present - set(needed) - set(EMBED_NAMES))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_fmt(unexpected)}")
    for name in sorted(set(needed) & present):
        if tuple(store.shape(name)) != tuple(needed[name]):
            problems.append(f"tensor {name!r} has shape {tuple(store.shape(name))}, expected {tuple(needed[name])}")
    for name in embed_present:
        want = expected[EMBED_NAMES[0]]
        if tuple(store.shape(name)) != tuple(want):
            problems.append(f"tensor {name!r} has shape {tuple(store.shape(name))}, expected {tuple(want)}")
    if problems:
        raise CheckpointError(f"{path} does not match a UMT5 encoder with its {CONFIG_NAME} "
                              f"({model.num_layers} layers, d_model {model.d_model}): " + "; ".join(problems))
    if len(embed_present) == 2 and not np.array_equal(store.read(EMBED_NAMES[0]), store.read(EMBED_NAMES[1])):
        raise CheckpointError(f"{path}: {EMBED_NAMES[0]} and {EMBED_NAMES[1]} differ; UMT5EncoderModel ties them "
                              "(one embedding), so this checkpoint is inconsistent")

    target = None if dtype is None else np.dtype(jnp.dtype(model.param_dtype))
    per_layer: dict[tuple[str, ...], list] = {}
    params: dict = {}
    for e in _progress(table, len(table), "loading text encoder", progress):
        src = embed_present[0] if e.torch_name == EMBED_NAMES[0] else e.torch_name
        arr = e.transform.to_flax(store.read(src))
        if target is not None and arr.dtype != target:
            arr = arr.astype(target)
        if e.layer is not None and model.scan_layers:
            per_layer.setdefault(e.flax_path, [None] * model.num_layers)[e.layer] = arr
        else:
            _set(params, _flax_path(model, e), jnp.asarray(arr))
    for sub, arrs in per_layer.items():
        _set(params, ("layers",) + sub, jnp.asarray(np.stack(arrs)))
    return model, params
