"""Numerical parity of the Flax Wan DiT with diffusers' WanTransformer3DModel (fp32, CPU).

Weights are written by diffusers' ``save_pretrained`` and read by our loader, so the name table,
layout transforms and the network are checked together.
"""
import jax
import numpy as np
import pytest

from anyflow_jax.interop import reference
from anyflow_jax.interop.diffusers import load_transformer

TOL = 1e-4

# (config, latent shape (B, F, H, W)) - different heads, head dims (16 hits diffusers' RoPE
# slicing quirk, 12 and 8 do not), layer counts, odd frame counts, non-square grids, batch > 1,
# temporal patching and the no-cross-attn-norm variant.
CASES = [
    (dict(num_attention_heads=2, attention_head_dim=16, num_layers=2), (2, 3, 6, 8)),
    (dict(num_attention_heads=3, attention_head_dim=12, num_layers=1), (3, 5, 4, 10)),
    (dict(num_attention_heads=4, attention_head_dim=8, num_layers=3, cross_attn_norm=False), (1, 1, 8, 6)),
    (dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, patch_size=(2, 2, 2)), (2, 4, 6, 6)),
    # Wan2.1-1.3B widths (head dim 128: RoPE split 44/42/42), one layer, a small video
    (dict(num_attention_heads=12, attention_head_dim=128, num_layers=1, ffn_dim=8960, text_dim=4096, freq_dim=256,
          in_channels=16, out_channels=16, rope_max_seq_len=1024), (2, 3, 4, 6)),
]


def _base(cfg):
    out = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=40,
               rope_max_seq_len=32)
    out.update(cfg)
    return out


def _inputs(shape, seed=0, channels=4, text_dim=24, ctx_len=7):
    rng = np.random.RandomState(seed)
    b, f, h, w = shape
    x = rng.randn(b, f, h, w, channels).astype(np.float32)
    t = rng.rand(b, f).astype(np.float32)
    t[0, 0] = 1.0  # include both ends of the time range
    t[-1, -1] = 0.0
    ctx = rng.randn(b, ctx_len, text_dim).astype(np.float32)
    return x, t, ctx


@pytest.mark.parametrize("case", range(len(CASES)))
def test_teacher_matches_diffusers(case, tmp_path):
    cfg, shape = CASES[case]
    full = _base(cfg)
    tm = reference.random_diffusers_model(seed=case, scale=0.02 if full["text_dim"] > 1000 else 0.1, **full)
    tm.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    x, t, ctx = _inputs(shape, seed=case, channels=full["in_channels"], text_dim=full["text_dim"])
    ref = reference.torch_forward(tm, x, t, ctx)
    assert np.abs(ref).max() > 0.1  # a meaningful, non-trivial output
    for scan in (True, False):
        model, params = load_transformer(tmp_path / "ckpt", model_kwargs=dict(scan_layers=scan))
        assert not model.flow_map
        out = np.asarray(jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, None, c))(params, x, t, ctx))
        err = np.abs(out - ref).max()
        print(f"case {case} scan={scan}: max abs error {err:.3g}")
        assert out.shape == ref.shape
        assert err <= TOL, err


@pytest.mark.parametrize("deltatime_type", ["r", "t-r"])
def test_released_flow_map_student_matches_torch(deltatime_type, tmp_path):
    """A released-layout AnyFlow student (delta embedder + gate in config.json) against an
    independent PyTorch implementation of the two-time embedder on top of diffusers."""
    cfg, shape = CASES[0]
    tm = reference.add_flow_map_embedder(reference.random_diffusers_model(seed=7, **_base(cfg)),
                                         gate=0.25, deltatime_type=deltatime_type)
    reference.save_flow_map_model(tm, str(tmp_path / "student"))
    x, t, ctx = _inputs(shape, seed=3)
    r = t * np.random.RandomState(4).rand(*t.shape).astype(np.float32)
    ref = reference.torch_forward(tm, x, t, ctx, r=r)
    model, params = load_transformer(tmp_path / "student")
    assert model.flow_map and model.gate_value == 0.25 and model.deltatime_type == deltatime_type
    assert "delta_embedder" in params["condition_embedder"]
    out = np.asarray(model.apply({"params": params}, x, t, r, ctx))
    err = np.abs(out - ref).max()
    print(f"flow map ({deltatime_type}): max abs error {err:.3g}")
    assert err <= TOL, err
