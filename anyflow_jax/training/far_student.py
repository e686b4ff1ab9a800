"""The trained network of a FAR stage (``Stage.student_is_far``; docs/far.md).

A FAR stage trains the chunk-causal network of :mod:`anyflow_jax.models.far_wan`. Its starting
point is normally a bidirectional checkpoint (the reference starts causal stage 1 from base Wan2.1;
the toy from its teacher run): the trainer turns it into a FAR network with
:func:`~anyflow_jax.models.far_wan.make_far_model` (``far_patch_embedding`` trilinearly resized
from ``patch_embedding``), after the flow-map conversion. The FAR fields (``chunk_partition``,
``full_chunk_limit``, ``compressed_patch_size``; the ``FAR_Wan_Transformer3DModel`` config.json
names) come from ``config.model`` (absent: the released networks' values). A FAR starting point
(a FAR run or a released FAR checkpoint) is used as it is.
"""
from __future__ import annotations

from typing import Any, Mapping

from anyflow_jax.errors import RunError
from anyflow_jax.models.far_wan import FarWanTransformer3D, far_model_like, make_far_model

FAR_FIELDS = ("compressed_patch_size", "full_chunk_limit", "chunk_partition")


def far_fields(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The FAR fields set in ``config.model`` (sequences as tuples)."""
    out = {}
    for k in FAR_FIELDS:
        if k in model_config and model_config[k] is not None:
            v = model_config[k]
            out[k] = tuple(int(x) for x in v) if k != "full_chunk_limit" else int(v)
    return out


def to_far(record, cfg, model, params) -> tuple[Any, Any, str | None]:
    """``(model, params, note)``: the student of ``record``'s stage as the FAR network when the
    stage trains one (``note`` says so; ``None`` when nothing changed). A FAR starting point
    for a bidirectional stage is an error."""
    is_far = isinstance(model, FarWanTransformer3D)
    if not record.student_is_far:
        if is_far:
            raise RunError(f"incompatible checkpoint: stage {record.name!r} trains a bidirectional network but "
                           "config.init.student is a FAR (chunk-causal) network")
        return model, params, None
    if is_far:
        return model, params, None
    if params is None:
        raise RunError(f"stage {record.name!r} trains a FAR network made from its starting checkpoint "
                       "(config.init.student); it cannot start from random weights")
    fields = far_fields(cfg.model)
    try:
        model, params = make_far_model(model, params, **fields)
    except ValueError as e:
        raise RunError(f"config.model: {e}") from None
    return model, params, (f"student: new FAR network (chunk_partition {list(model.chunk_partition)}, "
                           f"full_chunk_limit {model.full_chunk_limit}, far_patch_embedding resized from "
                           "patch_embedding)")


def abstract_student(record, cfg, model):
    """The stage's student module without parameters (deviceless compilation): ``model`` as the
    FAR network when the stage trains one."""
    if not record.student_is_far or isinstance(model, FarWanTransformer3D):
        return model
    try:
        return far_model_like(model, **far_fields(cfg.model))
    except (TypeError, ValueError) as e:
        raise RunError(f"config.model: {e}") from None


__all__ = ["FAR_FIELDS", "far_fields", "to_far", "abstract_student"]
