"""LoRA adapters of a Wan transformer <-> the PyTorch ecosystem (docs/lora.md).

Two exports of a trained adapter set (:mod:`anyflow_jax.lora`) and one import:

- :func:`save_merged_transformer`: base + adapters merged, written as a diffusers transformer
  folder by :func:`~anyflow_jax.checkpoints.diffusers.save_transformer` (what the reference's
  release conversion ``convert_lora_into_base.py`` produces; atomic, like every saver here).
- :func:`save_peft_adapter`: the adapters alone as diffusers' LoRA file
  (``pytorch_lora_weights.safetensors``), which diffusers loads onto ``WanTransformer3DModel``
  with PEFT: ``transformer.load_lora_adapter(folder, weight_name=LORA_WEIGHTS_NAME,
  prefix="transformer")`` or ``WanPipeline.load_lora_weights(folder)``. Tensors are
  ``transformer.<module>.lora_A.weight`` ``(r, in)`` and ``transformer.<module>.lora_B.weight``
  ``(out, r)`` (PEFT's torch layout, the transposes of ours); the header metadata
  ``lora_adapter_metadata`` holds the ``LoraConfig`` (``r``, ``lora_alpha``, ``target_modules``,
  ...) prefixed by ``transformer.``, as diffusers' own ``save_lora_weights`` writes it, so a
  scale ``alpha / r`` other than 1 survives the trip.
- :func:`load_peft_adapter`: such a file back into our adapter pytree, strictly: every
  missing, unexpected or mis-shaped tensor is named in one :class:`CheckpointError`. Keys with
  the ``transformer.`` prefix, PEFT's own ``base_model.model.`` prefix, or none are read.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import lora
from anyflow_jax.checkpoints.diffusers import CheckpointError, atomic_directory, save_transformer
from anyflow_jax.checkpoints.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

__all__ = ["LORA_WEIGHTS_NAME", "METADATA_KEY", "save_merged_transformer", "save_peft_adapter", "load_peft_adapter",
           "peft_state_dict"]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key for the LoraConfig
PREFIX = "transformer"
_PREFIXES = ("transformer.", "base_model.model.", "")


def save_merged_transformer(path, model, base_params, adapters, *, dtype=None, overwrite: bool = False,
                            progress: bool = False) -> None:
    """Export ``base_params`` + ``adapters`` merged (``W + (alpha/r) A @ B``, in fp32 when the
    base is fp32) as a diffusers transformer folder (``save_transformer``: atomic, sharded above
    5 GiB; ``dtype`` casts the written tensors, e.g. ``jnp.bfloat16`` for a release)."""
    merged = jax.jit(lora.merge)(base_params, adapters)
    save_transformer(path, model, merged, dtype=dtype, overwrite=overwrite, progress=progress)


def _module_index(model) -> dict[tuple[tuple[str, ...], int | None], str]:
    return {(p, layer): m for m, (p, layer) in lora.wan_linear_modules(model).items()}


def peft_state_dict(model, adapters, *, dtype=None) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, lora_config)``: the adapters as diffusers/PEFT LoRA tensors (names with the
    ``transformer.`` prefix, torch layout) and the ``LoraConfig`` fields that describe them."""
    index = _module_index(model)
    modules = lora.wan_linear_modules(model)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas, problems = {}, {}, []
    full = [p for p, lw in lora._flat_adapters(adapters) if isinstance(lw, lora.DenseDelta)]
    if full:
        raise CheckpointError(f"these adapters also train {', '.join('/'.join(p) for p in full)} in full, which a "
                              "LoRA file cannot hold (diffusers loads LoRA factors only): export the merged "
                              "transformer (save_merged_transformer) instead")
    for path, lw in lora._flat_adapters(adapters):
        a = np.asarray(jax.device_get(lw.lora_A))
        b = np.asarray(jax.device_get(lw.lora_B))
        if dtype is not None:
            a, b = a.astype(np.dtype(jnp.dtype(dtype))), b.astype(np.dtype(jnp.dtype(dtype)))
        stacked = (path, 0) in index
        names = ([(index[(path, i)], i) for i in range(a.shape[0])] if stacked
                 else [(index[(path, None)], None)] if (path, None) in index else [])
        if not names:
            problems.append("/".join(path))
            continue
        for module, i in names:
            ai, bi = (a[i], b[i]) if i is not None else (a, b)
            tensors[f"{PREFIX}.{module}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            tensors[f"{PREFIX}.{module}.lora_B.weight"] = np.ascontiguousarray(bi.T)
            ranks[module], alphas[module] = lw.rank, float(lw.alpha)
    if problems:
        raise CheckpointError(f"adapters on parameters that are not linear layers of this Wan model "
                              f"(known: {len(modules)} linears): {problems}")
    if not tensors:
        raise CheckpointError("no adapters to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": r,
        "lora_alpha": alpha,
        # exact module names: PEFT matches a name equal to, or ending in ".<name>"
        "target_modules": sorted(ranks),
        # per-module exceptions, anchored regexes of whole module names (PEFT >= 0.14 semantics)
        "rank_pattern": {f"^{m}$": v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {f"^{m}$": v for m, v in sorted(alphas.items()) if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
    }
    return tensors, config


def save_peft_adapter(path, model, adapters, *, dtype=None, overwrite: bool = False) -> None:
    """Write ``adapters`` of ``model`` as a diffusers LoRA folder: ``path/pytorch_lora_weights.
    safetensors`` (see the module docstring for the format). The folder appears atomically.
    ``dtype`` casts the tensors (default: as stored, fp32)."""
    tensors, config = peft_state_dict(model, adapters, dtype=dtype)
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}

    def write(tmp):
        write_safetensors(os.path.join(tmp, LORA_WEIGHTS_NAME), sorted(tensors.items()), metadata=metadata)

    atomic_directory(path, write, overwrite=overwrite)


def _open(path) -> SafetensorsFile:
    path = os.fspath(path)
    if os.path.isdir(path):
        single = os.path.join(path, LORA_WEIGHTS_NAME)
        if not os.path.isfile(single):
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(found) != 1:
                raise CheckpointError(f"{path}: expected {LORA_WEIGHTS_NAME} (or one .safetensors file); found {found}")
            single = os.path.join(path, found[0])
        path = single
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such LoRA file or folder")
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def _alpha_for(config: dict, module: str, rank: int) -> float:
    import re
    for pat, v in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat.lstrip('^').rstrip('$')})$", module):
            return float(v)
    if "lora_alpha" in config:
        return float(config["lora_alpha"])
    return float(rank)  # diffusers' reading of a file without metadata: alpha = r (scale 1)


def load_peft_adapter(path, model, targets: str | Sequence | None = None, *, dtype=jnp.float32):
    """Read a diffusers/PEFT LoRA file (or a folder holding one) into adapters for ``model``.

    ``targets``: what the file must hold, as for :func:`anyflow_jax.lora.wan_targets` (a target
    set name, module-name patterns or ``Target``s; default ``'student'`` for a flow-map model,
    else ``'teacher'``). Strict: every missing, unexpected or mis-shaped tensor (``lora_A`` must be
    ``(r, in)``, ``lora_B`` ``(out, r)``, one ``r`` per module) is named in one
    :class:`CheckpointError`, raised before anything is converted. ``alpha`` comes from the
    ``lora_adapter_metadata`` header (``lora_alpha`` / ``alpha_pattern``); without it, ``alpha =
    r`` as diffusers assumes. Returns the adapter pytree (scan-stacked kernels stacked).
    """
    f = _open(path)
    if targets is not None and not isinstance(targets, str):
        targets = list(targets)
    if targets is None or isinstance(targets, str) or (targets and isinstance(targets[0], str)):
        try:
            targets = lora.wan_targets(model, targets)
        except lora.LoraError as e:
            raise CheckpointError(f"{f.path}: {e}") from None
    targets = list(targets)
    base = lora._unboxed(model.abstract_params())
    modules = lora.wan_linear_modules(model)

    keys = list(f.keys())
    prefix = next((p for p in _PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
    if prefix is None:
        prefix = max(_PREFIXES[:-1], key=lambda p: sum(k.startswith(p) for k in keys))
    present = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    unexpected = sorted(k for k in keys if not k.startswith(prefix))

    raw_meta = f.metadata.get(METADATA_KEY)
    config = {}
    if raw_meta:
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f.path}: header {METADATA_KEY} is not JSON ({e})") from None
        config = {k[len(PREFIX) + 1:]: v for k, v in meta.items() if k.startswith(PREFIX + ".")} or meta

    want: dict[str, tuple[int, int]] = {}  # module -> (in, out)
    for t in targets:
        path = lora._norm_path(t)
        shape = tuple(lora._kernel(base, path).shape)
        names = t.modules if isinstance(t, lora.Target) and t.modules else [
            m for m, (p, _) in sorted(modules.items(), key=lambda kv: kv[1][1] or 0) if p == path]
        if not names:
            raise CheckpointError(f"LoRA target {'/'.join(path)} is not a linear layer of this Wan model")
        for m in names:
            want[m] = shape[-2:]
    expected = {f"{m}.lora_{ab}.weight" for m in want for ab in "AB"}
    missing = sorted(expected - set(present))
    unexpected += sorted(prefix + k for k in set(present) - expected)
    problems, ranks = [], {}
    for m, (fan_in, fan_out) in want.items():
        ka, kb = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        if ka not in present or kb not in present:
            continue
        sa, sb = tuple(f.shape(present[ka])), tuple(f.shape(present[kb]))
        r = sa[0] if len(sa) == 2 else None
        if len(sa) != 2 or sa[1] != fan_in:
            problems.append(f"{present[ka]} has shape {sa}, expected (r, {fan_in})")
        if len(sb) != 2 or sb[0] != fan_out or (r is not None and sb[1] != r):
            problems.append(f"{present[kb]} has shape {sb}, expected ({fan_out}, {r if r is not None else 'r'})")
        ranks[m] = r
    if missing:
        problems.insert(0, f"missing tensors ({len(missing)}): {[prefix + k for k in missing]}")
    if unexpected:
        problems.insert(len(missing) > 0, f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if problems:
        raise CheckpointError(f"{f.path} does not match LoRA targets {sorted(want)[:3]}... of this Wan model "
                              f"({len(want)} modules): " + "; ".join(problems))

    target_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None

    def read(key):
        arr = f.read(present[key])
        return arr.astype(target_dtype) if target_dtype is not None else arr

    out: dict = {}
    for t in targets:
        path = lora._norm_path(t)
        names = [m for m in want if modules[m][0] == path]
        names.sort(key=lambda m: modules[m][1] or 0)
        alphas = {_alpha_for(config, m, ranks[m]) for m in names}
        if len(alphas) != 1 or len({ranks[m] for m in names}) != 1:
            raise CheckpointError(f"{f.path}: the layers of {'/'.join(path)} ({names[0]} ...) have different "
                                  f"ranks or alphas; a scan-stacked kernel needs one of each")
        a = [read(f"{m}.lora_A.weight").T for m in names]
        b = [read(f"{m}.lora_B.weight").T for m in names]
        stacked = modules[names[0]][1] is not None
        a = np.stack(a) if stacked else a[0]
        b = np.stack(b) if stacked else b[0]
        lora._set_new(out, path, lora.LoraWeights(jnp.asarray(a), jnp.asarray(b), alphas.pop()))
    return out
