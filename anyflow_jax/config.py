"""The run configuration: a typed schema with every default in one place.

Experiments are ``ml_collections`` files (``configs/*.py``) that start from
:func:`default_config` and change what they need; the command line overrides any field
(``--config.train.steps=10``). The trainer reads the result once with :func:`parse` into a
:class:`RunConfig` of dataclasses: unknown fields, wrong types and impossible values fail there,
before anything is loaded or compiled, with one message naming the field (and the closest
known field when it looks like a typo).

``config.model`` is the network's diffusers-style ``config.json`` plus runtime fields
(``dtype``, ``attention_impl``, ``scan_layers``, ``remat_policy``) and is checked by the model
itself; ``config.loss``/``config.critic_loss`` are checked against the stage objective's options
(:mod:`anyflow_jax.stages`).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections

from anyflow_jax import stages as stage_registry
from anyflow_jax.errors import RunError


@dataclasses.dataclass(frozen=True)
class InitConfig:
    student: str = ""  # a previous stage's workdir, an Orbax model checkpoint or a diffusers folder
    teacher: str = ""
    critic: str = ""  # default: a copy of the teacher
    use_ema: bool = True  # start from a workdir's EMA weights (else its raw weights)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: whatever the other axes leave
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    critic_update_ratio: int = 1  # stages with a critic: generator update every N critic updates
    tensorboard: bool = True
    # fail when a larger share of the parameters would be replicated on a mesh that shards them
    # (fsdp x tensor > 1): a logical axis without a rule. Measured: toy 0.7-4%, Wan2.1-1.3B 0.03%.
    max_unsharded_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    decay: float = 0.999
    warmup_steps: int = 1000


# the learning-rate schedules of OptimConfig.schedule (training/optim.py's lr_schedule)
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    trainable_patterns: tuple = ()  # regexes on parameter paths; empty = everything
    # after the warmup: "constant" (the reference's), or "cosine" / "linear" decay to 0 at update
    # decay_steps (0: train.steps); ours, not the reference's
    schedule: str = "constant"
    decay_steps: int = 0

    def optimizer_kwargs(self) -> dict[str, Any]:
        return dict(lr=self.lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, eps=self.eps,
                    warmup_steps=self.warmup_steps, grad_clip=self.grad_clip, **self.schedule_kwargs())

    def schedule_kwargs(self) -> dict[str, Any]:
        return dict(schedule=self.schedule, decay_steps=self.decay_steps)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Train LoRA adapters on a frozen base instead of the network's own weights (docs/lora.md).

    ``targets``: the adapted linears of the trained network, a named set of
    :data:`anyflow_jax.lora.WAN_TARGETS` (``teacher``, ``critic``, ``student``) or a list of
    reference module-name patterns (``attn1.to_q``, ``time_embedder``, ...); empty: ``student`` for
    a flow-map student, else ``teacher``. ``critic_targets``: the same for stage 2's critic
    (empty: ``critic``). ``alpha`` 0 means ``rank`` (scale 1). With LoRA on,
    ``optim.trainable_patterns`` select among the adapter factors (paths such as
    ``blocks/attn1/to_q/kernel/lora_A``); empty: all of them. ``train_in_full``: parameter paths
    of the student's modules trained in full next to its adapters (``far_patch_embedding`` in the
    FAR stages, as the reference; each leaf an offset from the frozen base,
    :class:`anyflow_jax.lora.DenseDelta`).
    """
    enabled: bool = False
    rank: int = 256  # the reference's rank and alpha (scale alpha / rank = 1)
    alpha: float = 256.0
    targets: tuple = ()
    critic_targets: tuple = ()
    train_in_full: tuple = ()  # module paths of the student trained in full next to its adapters

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "moving_digits"  # or "array_record" (precomputed latents, docs/data.md)
    global_batch_size: int = 16
    seed: int = 0
    worker_count: int = 0
    # moving digits (the embedded default)
    num_samples: int = 8192
    split: str = "train"
    num_frames: int = 8
    height: int = 16
    width: int = 16
    context_length: int = 4
    text_dim: int = 32
    # array_record
    paths: tuple = ()
    negative_embedding: str = ""  # .npy of the negative prompt's text embedding


DATA_SOURCES = ("moving_digits", "array_record")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluators in the training loop (``anyflow_jax/training/evaluators.py``)."""
    every: int = 0  # evaluate every N steps and at the last step; 0: never
    steps: tuple = (1, 4, 32)  # sampler step counts (one compiled program for all of them)
    conditions: tuple = ()  # condition names (toy: class0..class9); empty: all of the run's
    contexts: str = ""  # .npz of named (L, D) text embeddings, for runs without named conditions
    prompts_file: str = ""  # one prompt per line, encoded once with eval.pipeline's UMT5 (prompt0, prompt1, ...)
    pipeline: str = ""  # a Wan2.1 diffusers pipeline folder: text encoder for prompts_file, VAE to decode latents
    num_samples: int = 1  # videos per condition
    seed: int = 0  # noise and sampler keys (the same at every evaluation)
    guidance: float = 0.0  # 0: the sampler's default (teacher 3, flow map and consistency 1)
    videos: bool = True  # write an mp4 per video besides samples.npz and the contact sheet
    metrics: bool = False  # moving digits: FD, accuracy and ODE distance at every step count
    metrics_samples: int = 64
    reference_steps: int = 32  # teacher ODE steps of the ODE-distance reference
    classifier_dir: str = ""  # the metrics' classifier (trained once there); default <workdir>/eval/classifier
    classifier_steps: int = 1500


@dataclasses.dataclass(frozen=True)
class RunConfig:
    stage: str
    seed: int = 0
    init: InitConfig = InitConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    ema: EmaConfig = EmaConfig()
    optim: OptimConfig = OptimConfig()
    critic_optim: OptimConfig | None = None  # stages with a critic; default: optim
    loss: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    critic_loss: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    lora: LoraConfig = LoraConfig()

    @property
    def record(self) -> stage_registry.Stage:
        return stage_registry.get(self.stage)


_SECTIONS = {"init": InitConfig, "mesh": MeshConfig, "train": TrainConfig, "ema": EmaConfig, "optim": OptimConfig,
             "critic_optim": OptimConfig, "data": DataConfig, "eval": EvalConfig, "lora": LoraConfig}
_FREE = ("loss", "critic_loss", "model")  # checked by the objective / the model


# ------------------------------------------------------------------------------------ defaults
def _section_dict(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        v = f.default
        # eval's sequences stay tuples, so the command line can set them: --config.eval.steps='(1, 4)'
        out[f.name] = list(v) if isinstance(v, tuple) and cls is not EvalConfig else v
    return out


def default_config(stage: str) -> ml_collections.ConfigDict:
    """The config of ``stage`` with every default: the schema's, then the stage record's
    (its loss options and reference settings)."""
    record = stage_registry.get(stage)
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    for name, cls in _SECTIONS.items():
        if name == "critic_optim":
            continue
        c[name] = ml_collections.ConfigDict(_section_dict(cls))
    c.loss = ml_collections.ConfigDict(_plain(record.loss_defaults))
    for dotted, value in record.config_defaults.items():
        set_field(c, dotted, value)
    if record.has_critic:
        c.critic_loss = ml_collections.ConfigDict(_plain(record.critic_loss_defaults))
        c.critic_optim = ml_collections.ConfigDict(c.optim.to_dict())
    c.model = ml_collections.ConfigDict()
    return c


def _plain(d: Mapping[str, Any]) -> dict:
    return {k: (_plain(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, tuple) else v))
            for k, v in d.items()}


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """``config.a.b = value`` for ``dotted='a.b'``; the field must exist."""
    node = config
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        if p not in node or not hasattr(node[p], "keys"):
            raise RunError(f"config.{'.'.join(parts[:i + 1])} is not a config section")
        node = node[p]
    if parts[-1] not in node:
        raise RunError(unknown_field_message(".".join(parts[:-1]), parts[-1], list(node.keys())))
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError):  # a ConfigDict keeps each field's type
        old = node[parts[-1]]
        raise RunError(f"config.{dotted} must be of type {type(old).__name__} (like {old!r}), got {value!r}") from None


def unknown_field_message(section: str, name: str, known) -> str:
    prefix = f"config.{section}." if section else "config."
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"{prefix}{name} is not a config field{hint}"


# ------------------------------------------------------------------------------------ parsing
def _coerce(field: str, value: Any, default: Any, annotation: str) -> Any:
    """Check ``value`` against the field's type (from its default / annotation)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RunError(f"{field} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and "float" not in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RunError(f"{field} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunError(f"{field} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise RunError(f"{field} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise RunError(f"{field} must be a list, got {value!r}")
        return tuple(value)
    return value


def _section(name: str, cls, node) -> Any:
    if node is None:
        return cls()
    if not hasattr(node, "keys"):
        raise RunError(f"config.{name} must be a section (a ConfigDict), got {node!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in fields:
            raise RunError(unknown_field_message(name, key, fields))
    kw = {}
    for fname, f in fields.items():
        if fname in node and node[fname] is not None:
            kw[fname] = _coerce(f"config.{name}.{fname}", node[fname], f.default, str(f.type))
    return cls(**kw)


def parse(config: Any) -> RunConfig:
    """Validate an ``ml_collections`` config (or a plain mapping) into a :class:`RunConfig`.

    Checks that need no devices and no files: the stage exists, every field is known and of the
    right type, values are in range, the loss options are options of the stage's objective, and
    the starting checkpoints the stage needs are named. Raises :class:`RunError` naming the field.
    """
    if config is None:
        raise RunError("no config given (--config configs/<x>.py[:arg])")
    if not hasattr(config, "keys"):
        raise RunError(f"the config must be a ConfigDict, got {type(config).__name__}")
    known = {"stage", "seed", *_SECTIONS, *_FREE}
    for key in config.keys():
        if key not in known:
            raise RunError(unknown_field_message("", key, known))
    record = stage_registry.get(config.get("stage"))
    seed = _coerce("config.seed", config.get("seed", 0), 0, "int")
    sections = {name: _section(name, cls, config.get(name)) for name, cls in _SECTIONS.items()
                if name != "critic_optim"}
    critic_optim = None
    if record.has_critic:
        critic_optim = _section("critic_optim", OptimConfig, config.get("critic_optim")) \
            if config.get("critic_optim") is not None else sections["optim"]
    free = {}
    for name in _FREE:
        node = config.get(name)
        if node is not None and not hasattr(node, "keys"):
            raise RunError(f"config.{name} must be a section (a ConfigDict), got {node!r}")
        free[name] = dict(node.to_dict() if hasattr(node, "to_dict") else (node or {}))
    steps = sections["train"].steps
    if not sections["optim"].decay_steps:
        sections["optim"] = dataclasses.replace(sections["optim"], decay_steps=steps)
    if critic_optim is not None and not critic_optim.decay_steps:
        critic_optim = dataclasses.replace(critic_optim, decay_steps=steps)
    run = RunConfig(stage=record.name, seed=seed, critic_optim=critic_optim,
                    loss=record.loss_options(free["loss"]),
                    critic_loss=record.loss_options(free["critic_loss"], critic=True) if record.has_critic else {},
                    model=free["model"], **sections)
    _check_values(run)
    return run


def _check_values(c: RunConfig) -> None:
    record = c.record
    positive = {"train.steps": c.train.steps, "train.log_every": c.train.log_every,
                "train.checkpoint_every": c.train.checkpoint_every, "train.keep_checkpoints": c.train.keep_checkpoints,
                "train.critic_update_ratio": c.train.critic_update_ratio,
                "data.global_batch_size": c.data.global_batch_size}
    for field, value in positive.items():
        if value < 1:
            raise RunError(f"config.{field} must be >= 1, got {value}")
    if not 0.0 <= c.train.max_unsharded_fraction <= 1.0:
        raise RunError(f"config.train.max_unsharded_fraction must be in [0, 1], got {c.train.max_unsharded_fraction}")
    for name, o in (("optim", c.optim), ("critic_optim", c.critic_optim)):
        if o is None:
            continue
        if not o.lr > 0:
            raise RunError(f"config.{name}.lr must be positive, got {o.lr}")
        if o.warmup_steps < 0:
            raise RunError(f"config.{name}.warmup_steps must be >= 0, got {o.warmup_steps}")
        if o.schedule not in LR_SCHEDULES:
            raise RunError(f"config.{name}.schedule must be one of {', '.join(LR_SCHEDULES)}, "
                           f"got {o.schedule!r}")
        if o.schedule != "constant" and o.decay_steps <= o.warmup_steps:
            raise RunError(f"config.{name}.schedule={o.schedule!r} decays to 0 at config.{name}.decay_steps "
                           f"({o.decay_steps}), which must be larger than config.{name}.warmup_steps "
                           f"({o.warmup_steps})")
    if not 0.0 <= c.ema.decay <= 1.0:
        raise RunError(f"config.ema.decay must be in [0, 1], got {c.ema.decay}")
    e = c.eval
    if e.every < 0:
        raise RunError(f"config.eval.every must be >= 0 (0: no periodic evaluation), got {e.every}")
    if not e.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in e.steps):
        raise RunError(f"config.eval.steps must be positive integers, got {list(e.steps)}")
    for field in ("num_samples", "metrics_samples", "reference_steps", "classifier_steps"):
        if getattr(e, field) < 1:
            raise RunError(f"config.eval.{field} must be >= 1, got {getattr(e, field)}")
    if e.guidance != 0.0 and e.guidance < 1.0:
        raise RunError(f"config.eval.guidance must be >= 1 (0: the sampler's default), got {e.guidance}")
    if e.prompts_file and not e.pipeline:
        raise RunError("config.eval.prompts_file needs config.eval.pipeline (a pipeline folder with the text encoder)")
    if e.prompts_file and e.contexts:
        raise RunError("config.eval: give either prompts_file or contexts, not both")
    if e.every and e.metrics and c.data.source != "moving_digits":
        raise RunError("config.eval.metrics needs moving-digits data (its classifier is trained on those videos)")
    _check_lora(c)
    if c.data.source not in DATA_SOURCES:
        raise RunError(f"config.data.source={c.data.source!r}: expected one of {DATA_SOURCES}")
    if not record.random_init and not c.init.student:
        raise RunError(f"config.init.student is empty: stage {record.name!r} starts from a checkpoint "
                       "(a previous stage's workdir, an Orbax model checkpoint or a diffusers folder)")
    if record.needs_teacher and not c.init.teacher:
        raise RunError(f"config.init.teacher is empty: stage {record.name!r} needs a frozen teacher checkpoint")


def _check_lora(c: RunConfig) -> None:
    lo = c.lora
    if lo.rank < 1:
        raise RunError(f"config.lora.rank must be >= 1, got {lo.rank}")
    if lo.alpha < 0:
        raise RunError(f"config.lora.alpha must be positive (0: the rank), got {lo.alpha}")
    from anyflow_jax.lora import WAN_TARGETS
    for field in ("targets", "critic_targets"):
        value = getattr(lo, field)
        if any(not isinstance(v, str) or not v for v in value):
            raise RunError(f"config.lora.{field} must be a target set ({', '.join(sorted(WAN_TARGETS))}) or "
                           f"module-name patterns (strings), got {list(value)}")
        named = [v for v in value if v in WAN_TARGETS]
        if named and len(value) > 1:
            raise RunError(f"config.lora.{field}: a named target set ({named[0]!r}) stands alone, got {list(value)}")
    if lo.enabled and c.record.random_init and not c.init.student:
        raise RunError(f"config.lora.enabled: stage {c.stage!r} starts from random weights here (config.init.student is "
                       "empty); LoRA adapts a pretrained base (and Wan's zero-initialised output head would never "
                       "move), so give config.init.student or set config.lora.enabled=False")
    if any(not isinstance(v, str) or not v for v in lo.train_in_full):
        raise RunError(f"config.lora.train_in_full must be parameter paths of modules (strings such as "
                       f"'far_patch_embedding'), got {list(lo.train_in_full)}")
    if lo.critic_targets and not c.record.has_critic:
        raise RunError(f"config.lora.critic_targets is set but stage {c.stage!r} has no critic")


__all__ = ["RunConfig", "InitConfig", "LoraConfig", "MeshConfig", "TrainConfig", "EmaConfig", "OptimConfig", "DataConfig", "EvalConfig",
           "default_config", "parse", "set_field", "unknown_field_message", "DATA_SOURCES"]
