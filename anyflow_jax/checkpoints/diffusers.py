"""diffusers-format Wan2.1 / AnyFlow transformer checkpoints <-> Flax (model, params).

A diffusers transformer directory holds ``config.json`` and either one
``diffusion_pytorch_model.safetensors`` or shards listed in
``diffusion_pytorch_model.safetensors.index.json``. Released AnyFlow students use the same
layout plus ``condition_embedder.delta_embedder.*`` tensors and ``gate_value`` /
``deltatime_type`` in ``config.json``; released AnyFlow-FAR students (``FAR_Wan_Transformer3DModel``
with ``init_far_model``) add ``far_patch_embedding.*`` and ``compressed_patch_size`` /
``full_chunk_limit`` / ``chunk_partition`` and load as
:class:`~anyflow_jax.models.far_wan.FarWanTransformer3D`.

The mapping is one declarative table (:func:`param_table`): diffusers name -> Flax path ->
layout transform. Loading is strict: any missing, unexpected or mis-shaped tensor is an error
that names it, raised before anything is converted. Given a mesh (or shardings), loading
streams: each device's block of each parameter is read from the files on its own and placed
on that device, so no whole host copy of the model is made. Saving writes into a temporary sibling
directory and renames it into place, so an interrupted export never leaves a half-written
checkpoint at the destination.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.checkpoints.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from anyflow_jax.models.far_wan import FarWanTransformer3D, far_model_like, make_far_model
from anyflow_jax.models.wan import WanTransformer3D

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_KNOWN_CLASSES = ("WanTransformer3DModel", "FAR_Wan_Transformer3DModel")
_RUNTIME_FIELDS = ("dtype", "attention_impl", "scan_layers", "remat_policy")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (names every offending tensor)."""


# ----------------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class Transform:
    """Layout transform between a PyTorch tensor and a Flax parameter (per layer).

    ``source_index`` (optional) serves sharded loads: given a block of the Flax parameter (a
    tuple of slices, one per axis) it returns ``(torch_index, post)``, the block of the PyTorch
    tensor to read so that ``to_flax(torch_tensor[torch_index])[post]`` is that Flax block
    (``post`` None: nothing left to cut). Without it a sharded load reads the whole tensor.
    """
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    source_index: Callable[[tuple[slice, ...]], tuple[tuple[slice, ...], tuple[slice, ...] | None]] | None = None


IDENTITY = Transform("identity", lambda a: a, lambda a: a, lambda s: tuple(s), lambda idx: (tuple(idx), None))
# torch Linear weight (out, in)  <->  Flax kernel (in, out): a Flax block [i, o] is torch [o, i].T
LINEAR = Transform("linear", lambda a: a.T, lambda a: a.T, lambda s: (s[1], s[0]),
                   lambda idx: ((idx[1], idx[0]), None))


def _conv3d(patch_size: tuple[int, int, int], in_channels: int) -> Transform:
    # torch Conv3d weight (D, C, pt, ph, pw)  <->  Flax patch Dense kernel (pt*ph*pw*C, D)
    pt, ph, pw = patch_size

    def to_flax(a):
        return a.transpose(2, 3, 4, 1, 0).reshape(pt * ph * pw * in_channels, a.shape[0])

    def to_torch(a):
        return a.reshape(pt, ph, pw, in_channels, a.shape[-1]).transpose(4, 3, 0, 1, 2)

    def source_index(idx):
        # the output features D are one torch axis; the merged (pt, ph, pw, C) rows are cut after
        full = slice(None)
        return (idx[1], full, full, full, full), (idx[0], full)

    return Transform("conv3d", to_flax, to_torch, lambda s: (s[1], in_channels, pt, ph, pw), source_index)


@dataclasses.dataclass(frozen=True)
class Entry:
    diffusers_name: str
    flax_path: tuple[str, ...]  # path inside the per-layer params (without the layer axis)
    transform: Transform
    layer: int | None = None  # block index, or None for top-level parameters


def _linear(prefix: str, path: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], Transform]]:
    return [(f"{prefix}.weight", path + ("kernel",), LINEAR), (f"{prefix}.bias", path + ("bias",), IDENTITY)]


def param_table(model: WanTransformer3D) -> list[Entry]:
    """The full diffusers <-> Flax table for ``model`` (its mode and layer count)."""
    top: list[tuple[str, tuple[str, ...], Transform]] = [
        ("patch_embedding.weight", ("patch_embedding", "kernel"), _conv3d(model.patch_size, model.in_channels)),
        ("patch_embedding.bias", ("patch_embedding", "bias"), IDENTITY),
        ("scale_shift_table", ("scale_shift_table",), IDENTITY),
    ]
    if isinstance(model, FarWanTransformer3D):  # FAR: the compressed patch embedding of older context
        top += [("far_patch_embedding.weight", ("far_patch_embedding", "kernel"),
                 _conv3d(model.compressed_patch_size, model.in_channels)),
                ("far_patch_embedding.bias", ("far_patch_embedding", "bias"), IDENTITY)]
    top += _linear("proj_out", ("proj_out",))
    ce = ("condition_embedder",)
    embedders = ["time_embedder"] + (["delta_embedder"] if model.flow_map else [])
    for emb in embedders:
        for lin in ("linear_1", "linear_2"):
            top += _linear(f"condition_embedder.{emb}.{lin}", ce + (emb, lin))
    top += _linear("condition_embedder.time_proj", ce + ("time_proj",))
    for lin in ("linear_1", "linear_2"):
        top += _linear(f"condition_embedder.text_embedder.{lin}", ce + ("text_embedder", lin))

    block: list[tuple[str, tuple[str, ...], Transform]] = []
    for attn in ("attn1", "attn2"):
        for proj, flax_name in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out_0")):
            block += _linear(f"{attn}.{proj}", (attn, flax_name))
        for norm in ("norm_q", "norm_k"):
            block.append((f"{attn}.{norm}.weight", (attn, norm, "scale"), IDENTITY))
    if model.cross_attn_norm:
        block += [("norm2.weight", ("norm2", "scale"), IDENTITY), ("norm2.bias", ("norm2", "bias"), IDENTITY)]
    block += _linear("ffn.net.0.proj", ("ffn", "net_0"))
    block += _linear("ffn.net.2", ("ffn", "net_2"))
    block.append(("scale_shift_table", ("scale_shift_table",), IDENTITY))

    entries = [Entry(n, p, tr) for n, p, tr in top]
    for i in range(model.num_layers):
        entries += [Entry(f"blocks.{i}.{n}", p, tr, i) for n, p, tr in block]
    return entries


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def layer_path(entry, scan_layers: bool, stack: str) -> tuple[str, ...]:
    """Our parameter path of a name-table entry: a per-layer entry lives under ``stack`` (the
    scan-stacked layers, layer index on the leading axis) or ``<stack>_<layer>`` (unrolled)."""
    if entry.layer is None:
        return entry.flax_path
    return ((stack,) if scan_layers else (f"{stack}_{entry.layer}",)) + entry.flax_path


def expected_torch_shapes(model, table, stack: str, name: Callable[[Any], str]) -> dict[str, tuple[int, ...]]:
    """PyTorch name (``name(entry)``) -> torch shape of every entry of ``table``, derived from the
    model's abstract Flax parameters (a scan-stacked entry without its layer axis)."""
    from flax import linen as nn
    abstract = nn.meta.unbox(model.abstract_params())
    out = {}
    for e in table:
        shape = tuple(_get(abstract, layer_path(e, model.scan_layers, stack)).shape)
        if e.layer is not None and model.scan_layers:
            shape = shape[1:]
        out[name(e)] = e.transform.torch_shape(shape)
    return out


def _flax_path(model: WanTransformer3D, entry: Entry) -> tuple[str, ...]:
    return layer_path(entry, model.scan_layers, "blocks")


def _expected_shapes(model: WanTransformer3D) -> dict[str, tuple[int, ...]]:
    """diffusers name -> torch shape, derived from the Flax parameter shapes."""
    return expected_torch_shapes(model, param_table(model), "blocks", lambda e: e.diffusers_name)


# ----------------------------------------------------------------------------------- reading
class _TensorStore:
    """All tensors of a safetensors folder, by name, read lazily: one weights file, or an index
    and its shards (diffusers names by default; transformers folders pass theirs)."""

    def __init__(self, path: str, *, weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME):
        index_path = os.path.join(path, index_name)
        single = os.path.join(path, weights_name)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path) as fh:
                    weight_map = json.load(fh)["weight_map"]
                weight_map = {str(k): str(v) for k, v in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
            for fname in sorted(set(weight_map.values())):
                fpath = os.path.join(path, fname)
                if not os.path.isfile(fpath):
                    raise CheckpointError(f"{path}: shard {fname} listed in {index_name} is missing")
                self.files[fname] = SafetensorsFile(fpath)
            for name, fname in weight_map.items():
                if name not in self.files[fname].entries:
                    raise CheckpointError(f"{path}: tensor {name!r} listed in {index_name} is not in {fname}")
                self.where[name] = fname
            for fname, f in self.files.items():
                extra = sorted(set(f.keys()) - set(weight_map))
                if extra:
                    raise CheckpointError(f"{path}: {fname} holds tensors not listed in the index: {extra[:5]}")
        else:
            candidates = [single] if os.path.isfile(single) else sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(candidates) != 1:
                other = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
                hint = f" (PyTorch pickles {other} are not read; convert them to safetensors)" if other else ""
                raise CheckpointError(
                    f"{path}: expected {weights_name} or {index_name}; found "
                    f"{[os.path.basename(c) for c in candidates] or 'no safetensors files'}{hint}")
            fname = os.path.basename(candidates[0])
            self.files[fname] = SafetensorsFile(candidates[0])
            self.where = {name: fname for name in self.files[fname].keys()}

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].read(name)

    def dtype(self, name: str) -> np.dtype:
        return self.files[self.where[name]].dtype(name)

    def read_slice(self, name: str, index) -> np.ndarray:
        return self.files[self.where[name]].read_slice(name, index)

    def read_flax_block(self, name: str, transform: Transform, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``index`` of ``transform.to_flax(tensor)``, reading only what it needs
        (the whole tensor when the transform has no ``source_index``)."""
        if transform.source_index is None:
            return transform.to_flax(self.read(name))[tuple(index)]
        src, post = transform.source_index(tuple(index))
        arr = transform.to_flax(self.read_slice(name, src))
        return arr if post is None else arr[tuple(post)]


def read_json_config(path, what: str) -> tuple[dict[str, Any], str]:
    """``(config, config path)`` of the folder ``path``'s ``config.json``; ``what`` names the
    expected folder in the errors (e.g. "diffusers transformer")."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a {what} folder)")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: not a {what} folder (no {CONFIG_NAME})")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    return cfg, cfg_path


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a diffusers transformer directory, checked for its class."""
    cfg, cfg_path = read_json_config(path, "diffusers transformer")
    cls = cfg.get("_class_name")
    if cls not in _KNOWN_CLASSES:
        raise CheckpointError(f"{cfg_path}: _class_name={cls!r} is not a Wan transformer (expected one of {_KNOWN_CLASSES})")
    return cfg


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="tensor")


def load_transformer(path, *, dtype=jnp.float32, flow_map: bool | None = None,
                     gate_value: float | None = None, deltatime_type: str | None = None,
                     far: bool | None = None, far_fields: Mapping[str, Any] | None = None,
                     model_kwargs: Mapping[str, Any] | None = None, progress: bool = False,
                     mesh=None, rules=None, shardings=None):
    """Load a diffusers-format Wan2.1 / AnyFlow transformer directory as ``(model, params)``.

    Args:
      path: directory with ``config.json`` and safetensors weights (single file or sharded).
      dtype: dtype of the returned parameters (default float32). ``None`` keeps each tensor's
        stored dtype (bf16 stays bf16).
      flow_map: ``None`` follows the checkpoint (AnyFlow student if it has a delta embedder);
        ``True`` on a teacher checkpoint builds a new flow-map student whose delta embedder is a
        copy of the time embedder (the reference's ``setup_flowmap_model``); ``False`` requires a
        teacher checkpoint.
      gate_value, deltatime_type: flow-map settings for a new student (defaults 0.25, ``'r'``);
        a released student's ``config.json`` values are used otherwise.
      far: ``None`` follows the checkpoint: a ``FAR_Wan_Transformer3DModel`` with
        ``init_far_model`` (the released ``AnyFlow-FAR-Wan2.1-*`` layout: ``far_patch_embedding``
        tensors, ``compressed_patch_size`` / ``full_chunk_limit`` / ``chunk_partition`` in
        ``config.json``) loads as a :class:`~anyflow_jax.models.far_wan.FarWanTransformer3D`, any
        other as a :class:`WanTransformer3D`. ``True`` on a non-FAR checkpoint builds a new FAR
        network whose ``far_patch_embedding`` is ``patch_embedding`` trilinearly resized (the
        reference's ``setup_far_model``; ``far_fields`` sets its ``compressed_patch_size``,
        ``full_chunk_limit``, ``chunk_partition``; with ``mesh``/``shardings`` the resize runs on
        the devices and the new leaves are placed with the FAR network's shardings). ``False``
        requires a non-FAR checkpoint.
      model_kwargs: runtime fields of :class:`WanTransformer3D` (``dtype`` = compute dtype,
        ``attention_impl``, ``scan_layers``, ``remat_policy``).
      progress: show a progress bar while reading tensors.
      mesh, rules: load straight onto ``mesh`` with the parameter shardings that the logical
        ``rules`` give (default ``parallel.DEFAULT_RULES``; see :func:`parallel.param_shardings`).
        Each parameter is built with ``jax.make_array_from_callback``: every device's shard is
        read from the safetensors file as that block alone (layout transforms applied to the
        block, scan-stacked layers assembled block by block) and converted to ``dtype`` there,
        so the host never holds a whole copy of the model, nor of any one tensor.
      shardings: instead of ``mesh``/``rules``, a tree of ``jax.sharding.Sharding`` shaped like
        the params.

    Returns:
      ``(model, params)`` with ``model.apply({'params': params}, latents, t, r, context)``;
      without ``mesh``/``shardings`` the params are arrays on the default device.
    """
    if shardings is not None and (mesh is not None or rules is not None):
        raise ValueError("pass either shardings or mesh (with rules), not both")
    if rules is not None and mesh is None:
        raise ValueError("rules need a mesh")
    path = os.fspath(path)
    cfg = read_config(path)
    try:
        store = _TensorStore(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    has_delta = any(n.startswith("condition_embedder.delta_embedder.") for n in store.names())
    ckpt_is_student = has_delta
    if flow_map is None:
        flow_map = ckpt_is_student
    if ckpt_is_student and not flow_map:
        raise CheckpointError(f"{path}: this is a flow-map (AnyFlow) checkpoint with a delta embedder; "
                              "it cannot be loaded as a teacher (flow_map=False)")
    new_student = flow_map and not ckpt_is_student
    cfg_model = {k: v for k, v in cfg.items() if k not in ("gate_value", "deltatime_type")}
    overrides: dict[str, Any] = {"flow_map": flow_map}
    if flow_map:
        overrides["gate_value"] = float(gate_value if gate_value is not None else cfg.get("gate_value", 0.25))
        overrides["deltatime_type"] = deltatime_type or cfg.get("deltatime_type", "r")
    runtime = dict(model_kwargs or {})
    unknown = sorted(set(runtime) - set(_RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"model_kwargs may only set {_RUNTIME_FIELDS}; got {unknown}")
    if dtype is not None:
        runtime.setdefault("dtype", jnp.dtype(dtype))
    ckpt_is_far = bool(cfg.get("init_far_model")) or "far_patch_embedding.weight" in store.names()
    if far is None:
        far = ckpt_is_far
    if ckpt_is_far and not far:
        raise CheckpointError(f"{path}: this is a FAR (chunk-causal) checkpoint with far_patch_embedding; "
                              "it cannot be loaded as a bidirectional Wan transformer (far=False)")
    new_far = far and not ckpt_is_far
    if far_fields and not new_far:
        raise ValueError("far_fields only apply when far=True builds a new FAR network from a non-FAR checkpoint")
    try:
        if ckpt_is_far:
            model = FarWanTransformer3D.from_config(cfg_model, **overrides, **runtime)
        else:
            cfg_model = {k: v for k, v in cfg_model.items() if k != "init_far_model"}
            model = WanTransformer3D.from_config(cfg_model, **overrides, **runtime)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG_NAME}: {e}") from None

    table = param_table(model)
    expected = _expected_shapes(model)
    needed = dict(expected)
    if new_student:  # the delta embedder is created from the time embedder, not read
        needed = {k: v for k, v in needed.items() if ".delta_embedder." not in k}
    present = store.names()
    problems = []
    missing = sorted(set(needed) - present)
    unexpected = sorted(present - set(needed))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for name in sorted(set(needed) & present):
        if tuple(store.shape(name)) != tuple(needed[name]):
            problems.append(f"tensor {name!r} has shape {tuple(store.shape(name))}, expected {tuple(needed[name])}")
    if problems:
        raise CheckpointError(f"{path} does not match a {'flow-map' if flow_map else 'teacher'} Wan transformer "
                              f"with config {CONFIG_NAME}: " + "; ".join(problems))

    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    if mesh is not None or shardings is not None:
        far_sh = None
        if new_far:  # the new FAR network's shardings; far_patch_embedding is made on the devices
            if shardings is None:
                from anyflow_jax import parallel
                far_abstract = far_model_like(model, **dict(far_fields or {})).abstract_params()
                shardings = parallel.param_shardings(far_abstract, mesh, parallel.DEFAULT_RULES if rules is None
                                                     else rules)
            shardings = dict(shardings)
            if "far_patch_embedding" not in shardings:
                raise ValueError("shardings of a new FAR network (far=True) must include far_patch_embedding")
            far_sh = shardings.pop("far_patch_embedding")
        params = _load_sharded(model, table, store, new_student, target, mesh, rules, shardings, progress)
        if new_far:
            model, params = make_far_model(model, params, shardings=far_sh, **dict(far_fields or {}))
        return model, params
    per_layer: dict[tuple[str, ...], list] = {}
    params: dict = {}
    for e in _progress(table, len(table), "loading", progress):
        src = e.diffusers_name
        if new_student and ".delta_embedder." in src:
            src = src.replace(".delta_embedder.", ".time_embedder.")
        arr = e.transform.to_flax(store.read(src))
        if target is not None and arr.dtype != target:
            arr = arr.astype(target)
        if e.layer is not None and model.scan_layers:
            per_layer.setdefault(e.flax_path, [None] * model.num_layers)[e.layer] = arr
        else:
            _set(params, _flax_path(model, e), jnp.asarray(arr))
    for sub, arrs in per_layer.items():
        _set(params, ("blocks",) + sub, jnp.asarray(np.stack(arrs)))
    if new_far:
        model, params = make_far_model(model, params, **dict(far_fields or {}))
    return model, params


def _block_key(index, shape) -> tuple[tuple[int, int], ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    return tuple(ix.indices(dim)[:2] for ix, dim in zip(index, shape))


def _load_sharded(model: WanTransformer3D, table: list[Entry], store: _TensorStore, new_student: bool,
                  target, mesh, rules, shardings, progress: bool):
    """The params of ``model`` as global arrays, each device's shard read on its own (see
    :func:`load_transformer`)."""
    from flax import linen as nn
    from anyflow_jax import parallel

    boxed = model.abstract_params()
    abstract = nn.meta.unbox(boxed)
    if shardings is None:
        shardings = parallel.param_shardings(boxed, mesh, parallel.DEFAULT_RULES if rules is None else rules)
    # flax path -> [(layer or None, source tensor name, transform)]; scan-stacked layers share a path
    plan: dict[tuple[str, ...], list[tuple[int | None, str, Transform]]] = {}
    for e in table:
        src = e.diffusers_name
        if new_student and ".delta_embedder." in src:  # the new delta embedder starts as the time embedder
            src = src.replace(".delta_embedder.", ".time_embedder.")
        if e.layer is not None and model.scan_layers:
            plan.setdefault(("blocks",) + e.flax_path, []).append((e.layer, src, e.transform))
        else:
            plan[_flax_path(model, e)] = [(None, src, e.transform)]
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    have = {tuple(k.key for k in path) for path, _ in
            jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_sharding)[0]}
    if have != set(plan):
        wrong = sorted("/".join(p) for p in set(plan) ^ have)
        raise ValueError(f"shardings do not match the model's parameters: {wrong[:10]}")

    params: dict = {}
    for path, items in _progress(plan.items(), len(plan), "loading", progress):
        shape = tuple(_get(abstract, path).shape)
        sharding = _get(shardings, path)
        if not is_sharding(sharding):
            raise ValueError(f"shardings/{'/'.join(path)}: not a jax.sharding.Sharding ({type(sharding).__name__})")
        stacked = items[0][0] is not None
        sources = [src for _, src, _ in sorted(items, key=lambda it: it[0] or 0)]
        transform = items[0][2]
        dt = target if target is not None else np.result_type(*(store.dtype(src) for src in sources))
        last: list = [None, None]  # devices holding the same block (replicas) share one read
        # make_array_from_callback asks for the devices' blocks in the order of this map and
        # places them all at once; each block is put on its device as soon as it is read instead
        # (when the index asked for is the one expected next), so only one block at a time is on
        # the host rather than every device's block of the parameter
        order = iter([] if sharding.is_fully_replicated else sharding.addressable_devices_indices_map(shape).items())

        def block(index, shape=shape, sources=sources, transform=transform, stacked=stacked, dt=dt, last=last,
                  order=order):
            key = _block_key(index, shape)
            if key == last[0]:
                out = last[1]
            else:
                last[0] = last[1] = None
                idx = tuple(slice(a, b) for a, b in key)
                if stacked:
                    out = np.empty(tuple(b - a for a, b in key), dt)
                    for j, layer in enumerate(range(*key[0])):
                        out[j] = store.read_flax_block(sources[layer], transform, idx[1:])
                else:
                    out = store.read_flax_block(sources[0], transform, idx)
                    out = np.ascontiguousarray(out.astype(dt, copy=False))
                last[0], last[1] = key, out
            device, expected = next(order, (None, None))
            if device is not None and _block_key(expected, shape) == key:
                return jax.device_put(out, device)
            return out

        _set(params, path, jax.make_array_from_callback(shape, sharding, block, dtype=dt))
        last.clear()
    return params


# ----------------------------------------------------------------------------------- writing
class _LazyTensor:
    """A parameter converted to its PyTorch layout only when written (one at a time)."""

    def __init__(self, arr, layer, transform, dtype):
        self._arr, self._layer, self._transform = arr, layer, transform
        self.dtype = np.dtype(jnp.dtype(dtype if dtype is not None else arr.dtype))
        shape = arr.shape[1:] if layer is not None else arr.shape
        self.shape = tuple(transform.torch_shape(tuple(shape)))
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        arr = self._arr if self._layer is None else self._arr[self._layer]
        arr = np.asarray(jax.device_get(arr)).astype(self.dtype, copy=False)
        return np.ascontiguousarray(self._transform.to_torch(arr))


def _torch_tensors(model: WanTransformer3D, params, dtype) -> list[tuple[str, _LazyTensor]]:
    out = []
    for e in param_table(model):
        layer = e.layer if (e.layer is not None and model.scan_layers) else None
        out.append((e.diffusers_name, _LazyTensor(_get(params, _flax_path(model, e)), layer, e.transform, dtype)))
    return out


def check_params(model: WanTransformer3D, params) -> None:
    """Raise :class:`CheckpointError` naming every parameter whose path or shape is off."""
    from flax import linen as nn
    want = nn.meta.unbox(model.abstract_params())
    want_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    have_flat = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = []
    if set(want_flat) - set(have_flat):
        problems.append(f"missing parameters: {sorted(set(want_flat) - set(have_flat))[:10]}")
    if set(have_flat) - set(want_flat):
        problems.append(f"unexpected parameters: {sorted(set(have_flat) - set(want_flat))[:10]}")
    for k in sorted(set(want_flat) & set(have_flat)):
        if tuple(want_flat[k]) != tuple(have_flat[k]):
            problems.append(f"parameter {k} has shape {tuple(have_flat[k])}, expected {tuple(want_flat[k])}")
    if problems:
        raise CheckpointError("parameters do not match the model: " + "; ".join(problems))


def atomic_directory(dest: str, write: Callable[[str], None], *, overwrite: bool = False) -> None:
    """Run ``write(tmpdir)`` then move ``tmpdir`` to ``dest`` in one rename.

    Nothing appears at ``dest`` unless ``write`` succeeds (parent folders created here are removed
    again on failure). An existing ``dest`` is an error unless ``overwrite``; then it is replaced
    only after the new content is complete. The new folder gets the user's umask like any folder
    made with ``mkdir`` (``0o755`` under umask ``0o022``).
    """
    dest = os.path.abspath(os.fspath(dest))
    parent = os.path.dirname(dest)
    if os.path.exists(dest) and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise FileExistsError(f"{dest} already exists and is not a folder (overwrite replaces folders only)")
    created = []  # parent folders made here, innermost first
    probe = parent
    while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        created.append(probe)
        probe = os.path.dirname(probe)

    def remove_created():
        for d in created:
            try:
                os.rmdir(d)
            except OSError:
                break

    def new_dir(prefix):
        # mkdir's mode 0o777 less the umask (or the parent's default ACL), like any folder a user
        # makes; tempfile.mkdtemp would give 0o700
        for _ in range(100):
            path = os.path.join(parent, prefix + os.urandom(6).hex())
            try:
                os.mkdir(path, 0o777)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary name in {parent}")

    try:
        os.makedirs(parent, exist_ok=True)
        tmp = new_dir(f".{os.path.basename(dest)}.tmp-")
    except OSError as e:
        remove_created()
        raise OSError(f"cannot write to {parent}: {e.strerror or e}") from None
    try:
        write(tmp)
        if os.path.exists(dest):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=parent)
            os.rename(dest, os.path.join(old, "x"))
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created()
        raise


def save_transformer(path, model: WanTransformer3D, params, *, dtype=None,
                     max_shard_bytes: int = 5 * 1024 ** 3, overwrite: bool = False,
                     progress: bool = False) -> None:
    """Export ``params`` of ``model`` as a diffusers-format transformer directory.

    Teachers load in diffusers with ``WanTransformer3DModel.from_pretrained``; flow-map students
    are written in the released AnyFlow layout (``delta_embedder`` tensors, ``gate_value`` and
    ``deltatime_type`` in ``config.json``). ``dtype=None`` keeps each parameter's dtype. Files
    larger than ``max_shard_bytes`` are split into shards with an index. The directory appears
    atomically.
    """
    check_params(model, params)
    tensors = _torch_tensors(model, params, dtype)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tensors), desc="exporting", unit="tensor")
    on_tensor = (lambda _: bar.update(1)) if bar is not None else None

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
            json.dump(model.to_config(), fh, indent=2)
        shards: list[list[tuple[str, np.ndarray]]] = [[]]
        size = 0
        for name, arr in tensors:
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, arr))
            size += arr.nbytes
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, WEIGHTS_NAME), shards[0], on_tensor=on_tensor)
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(os.path.join(tmp, fname), shard, on_tensor=on_tensor)
            weight_map.update({name: fname for name, _ in shard})
        with open(os.path.join(tmp, INDEX_NAME), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)

    try:
        atomic_directory(path, write, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------------- the other parts
# The text encoder and the VAE of a diffusers Wan2.1 pipeline have their own loaders
# (checkpoints/text_encoder.py, checkpoints/vae.py), which build on this module; they are
# re-exported here lazily so that ``from anyflow_jax.interop.diffusers import load_text_encoder,
# load_vae`` sits next to ``load_transformer``.
_PARTS = {"load_text_encoder": "anyflow_jax.checkpoints.text_encoder", "load_vae": "anyflow_jax.checkpoints.vae"}


def __getattr__(name):
    if name in _PARTS:
        import importlib
        return getattr(importlib.import_module(_PARTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
