"""The embedded default: a toy Wan DiT sized for a laptop CPU (moving-digits videos).

The toy "latents" are the videos themselves (1 channel, 16x16 pixels, 8 frames); the
"text embeddings" are rows of a fixed class-embedding table. ``configs/`` files build on this.
"""
from __future__ import annotations

import ml_collections


def toy_model_config() -> ml_collections.ConfigDict:
    """diffusers-style config of the toy DiT (plus runtime fields)."""
    return ml_collections.ConfigDict(dict(
        patch_size=(1, 4, 4),  # coarse patches keep the toy at 128 tokens per video (CPU speed)
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        text_dim=32,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
        # runtime
        dtype="float32",
        attention_impl="xla",
        scan_layers=True,
        remat_policy="none",
    ))


def toy_video_shape() -> tuple[int, int, int, int]:
    """(F, H, W, C) of the toy videos."""
    return (8, 16, 16, 1)


# ------------------------------------------------------------------------------------ training
_REFERENCE_STUDENT_LOSS = dict(  # stage-1 objective (anyflow-reference.md section 4)
    shift=5.0, diffusion_ratio=0.5, consistency_ratio=0.25, derivative="central", delta=0.005,
    fuse_guidance_scale=3.0, text_dropout=0.1, weighting="beta08", adaptive_rescale=True)


def _common(stage: str) -> ml_collections.ConfigDict:
    from anyflow_jax.training.stages import check_stage
    check_stage(stage)
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.init = ml_collections.ConfigDict(dict(student="", teacher="", critic="", use_ema=True))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.train = ml_collections.ConfigDict(dict(steps=1000, log_every=10, checkpoint_every=500, keep_checkpoints=2,
                                             async_checkpointing=True, critic_update_ratio=1, tensorboard=True))
    c.ema = ml_collections.ConfigDict(dict(decay=0.999, warmup_steps=1000))
    c.optim = ml_collections.ConfigDict(dict(lr=5e-5, b1=0.9, b2=0.95, weight_decay=0.0, eps=1e-8, warmup_steps=1000,
                                             grad_clip=1.0, trainable_patterns=[]))
    if stage == "teacher":
        c.loss = ml_collections.ConfigDict(dict(shift=5.0, text_dropout=0.1))
    elif stage == "flow_map":
        c.loss = ml_collections.ConfigDict(dict(_REFERENCE_STUDENT_LOSS))
    elif stage == "on_policy":
        c.loss = ml_collections.ConfigDict(dict(
            steps_list=[2, 4, 8, 16, 50], shift=5.0, stop_prefix_grad=False, real_guidance_scale=3.0,
            dmd_weight=1.0, cotrain_forward=True, flow_map_options=dict(_REFERENCE_STUDENT_LOSS)))
        c.critic_loss = ml_collections.ConfigDict(dict(steps_list=[2, 4, 8, 16, 50], shift=5.0))
        c.optim.update(dict(lr=2e-6, b1=0.0, b2=0.999, warmup_steps=0))
        c.critic_optim = ml_collections.ConfigDict(dict(c.optim.to_dict()))
        c.ema.update(dict(decay=0.99, warmup_steps=200))
        c.train.steps = 1200
    else:  # consistency baseline (not part of the reference; rCM-style comparison model)
        c.loss = ml_collections.ConfigDict(dict(num_discretization_steps=32, shift=5.0, teacher_guidance_scale=3.0))
    return c


def toy_data_config() -> ml_collections.ConfigDict:
    f, h, w, ch = toy_video_shape()
    return ml_collections.ConfigDict(dict(source="moving_digits", global_batch_size=16, seed=0, worker_count=0,
                                          num_frames=f, height=h, width=w, context_length=4, text_dim=32))


# Time shift of the toy. The reference's k = 5 suits 480p Wan latents (~30k tokens); on 16x16
# toy videos it puts almost all training and sampling at high noise, and the teacher never
# learns digit shapes (measured: conditional accuracy 0.14 at k = 5 vs 0.29 at k = 1 after
# 1000 teacher steps). The toy therefore uses k = 1 in every stage; the Wan configs keep 5.
TOY_SHIFT = 1.0


def toy_config(stage: str) -> ml_collections.ConfigDict:
    """The embedded default for ``stage`` (see configs/toy.py)."""
    c = _common(stage)
    c.model = toy_model_config()
    c.data = toy_data_config()
    c.train.update(dict(log_every=50, checkpoint_every=200))
    c.loss.shift = TOY_SHIFT
    if stage == "on_policy":
        c.loss.flow_map_options["shift"] = TOY_SHIFT
        c.critic_loss.shift = TOY_SHIFT
    root = "runs/toy"
    if stage == "teacher":
        c.optim.update(dict(lr=1e-3, b2=0.99, warmup_steps=50))
        c.ema.update(dict(decay=0.99, warmup_steps=50))
        c.train.steps = 2000
    elif stage == "flow_map":
        c.init.student = f"{root}/teacher"
        c.optim.update(dict(lr=3e-4, b2=0.99, warmup_steps=20))
        c.ema.update(dict(decay=0.99, warmup_steps=20))
        c.train.steps = 400
    elif stage == "on_policy":
        c.init.student = f"{root}/flow_map"
        c.init.teacher = f"{root}/teacher"
        c.loss.steps_list = [2, 4, 8, 16, 32]
        c.critic_loss.steps_list = [2, 4, 8, 16, 32]
        c.optim.update(dict(lr=2e-5))
        c.critic_optim.update(dict(lr=2e-5))
        c.ema.update(dict(decay=0.99, warmup_steps=20))
        c.train.steps = 200
    else:
        c.init.student = f"{root}/teacher"
        c.init.teacher = f"{root}/teacher"
        c.optim.update(dict(lr=3e-4, b2=0.99, warmup_steps=20))
        c.ema.update(dict(decay=0.99, warmup_steps=20))
        c.train.steps = 400
    return c


WAN_SIZES = {
    # architecture (diffusers config.json of Wan2.1-T2V) and the reference's per-size settings
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                 global_batch=32, iters={"teacher": 6000, "flow_map": 6000, "on_policy": 1200, "consistency": 6000},
                 mesh=dict(data=1, fsdp=-1, tensor=1)),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                global_batch=16, iters={"teacher": 4000, "flow_map": 4000, "on_policy": 1200, "consistency": 4000},
                mesh=dict(data=1, fsdp=-1, tensor=4)),
}

# The reference's LoRA targets, as Flax path patterns (here trained in full; see configs/wan_t2v.py).
_ATTN_FFN = [r"attn1/to_(q|k|v|out_0)/", r"ffn/net_(0|2)/"]
_EMBEDDERS = [r"condition_embedder/(time|delta)_embedder/"]


def wan_config(size: str, stage: str) -> ml_collections.ConfigDict:
    if size not in WAN_SIZES:
        raise ValueError(f"unknown Wan size {size!r}; expected one of {sorted(WAN_SIZES)}")
    s = WAN_SIZES[size]
    c = _common(stage)
    c.model = ml_collections.ConfigDict(dict(
        patch_size=(1, 2, 2), num_attention_heads=s["num_attention_heads"], attention_head_dim=s["attention_head_dim"],
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=s["ffn_dim"], num_layers=s["num_layers"],
        gate_value=0.25, deltatime_type="r",
        dtype="bfloat16", attention_impl="cudnn", scan_layers=True, remat_policy="full"))
    c.data = ml_collections.ConfigDict(dict(source="array_record", paths=[], negative_embedding="",
                                            global_batch_size=s["global_batch"], seed=0, worker_count=4))
    c.mesh = ml_collections.ConfigDict(s["mesh"])
    c.train.update(dict(steps=s["iters"][stage], log_every=10, checkpoint_every=500, keep_checkpoints=3))
    c.optim.trainable_patterns = list(_ATTN_FFN) + (list(_EMBEDDERS) if stage in ("flow_map", "on_policy") else [])
    if stage == "on_policy":
        c.critic_optim.trainable_patterns = list(_ATTN_FFN)
        c.loss.dmd_batch_size = None
    if stage == "consistency":
        c.optim.update(dict(lr=2e-6, b1=0.0, b2=0.999, warmup_steps=0))
        c.ema.update(dict(decay=0.99, warmup_steps=200))
    return c
