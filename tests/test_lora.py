"""LoRA adapters (anyflow_jax/lora.py) and their PyTorch interop (anyflow_jax/checkpoints/lora.py):
PEFT's initialisation leaves the base exactly; gradients and optimizer state exist for the adapter
factors only and the base stays bit for bit; merged and PEFT exports load in diffusers and match
our output; PEFT files import back exactly and strictly; adapter factors shard like their kernel.
"""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from model_testlib import perturbed
from anyflow_jax import lora, losses, parallel
from anyflow_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from anyflow_jax.interop import reference
from anyflow_jax.interop.diffusers import (CheckpointError, load_peft_adapter, load_transformer,
                                           save_merged_transformer, save_peft_adapter)
from anyflow_jax.models.wan import WanTransformer3D, make_apply_fn

CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
RANK, ALPHA = 4, 8.0  # scale alpha / r = 2, so a dropped or inverted scale shows


def _inputs(b=2, f=3, h=4, w=6, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(b, f, h, w, 4).astype(np.float32)
    t = rng.rand(b, f).astype(np.float32)
    r = (t * rng.rand(b, f)).astype(np.float32)
    ctx = rng.randn(b, 5, 16).astype(np.float32)
    return x, t, r, ctx


def _trained(adapters, seed=0, scale=0.1):
    """Adapters as after training: B (and A) moved away from their initial values."""
    return perturbed(adapters, seed, scale)


_FORWARD = {}


def _forward(model, with_lora: bool):
    """One jitted forward per model config: ``f(base, ...)`` or ``f(LoraParams(adapters, base), ...)``
    (the tests share compilations instead of tracing a new wrapper each time)."""
    key = (json.dumps(model.to_config(), sort_keys=True), model.scan_layers, with_lora)
    if key not in _FORWARD:
        fn = make_apply_fn(model)
        _FORWARD[key] = jax.jit(lora.lora_apply(fn) if with_lora else fn)
    return _FORWARD[key]


def _rel(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def student():
    """(our flow-map model, random base params with no trivial tensor)."""
    model = WanTransformer3D(**CFG, flow_map=True)
    return model, perturbed(model.init_params(jax.random.key(0)), 1, 0.1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(torch model, folder, our model, our params) of one random diffusers teacher."""
    path = tmp_path_factory.mktemp("lora_teacher") / "transformer"
    tm = reference.random_diffusers_model(seed=1, **CFG)
    tm.save_pretrained(path, safe_serialization=True)
    model, params = load_transformer(path)
    return tm, path, model, params


# ------------------------------------------------------------------------------ targets and init
def test_wan_targets_follow_reference_names_and_sizes():
    teacher = WanTransformer3D(**CFG)
    student = WanTransformer3D(**CFG, flow_map=True, scan_layers=False)
    t_targets = lora.wan_targets(teacher)
    assert [t.path for t in t_targets] == [("blocks", "attn1", n, "kernel") for n in ("to_q", "to_k", "to_v", "to_out_0")] \
        + [("blocks", "ffn", "net_0", "kernel"), ("blocks", "ffn", "net_2", "kernel")]
    assert t_targets[3].modules == ("blocks.0.attn1.to_out.0", "blocks.1.attn1.to_out.0")
    assert t_targets[4].modules == ("blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.0.proj")
    s_modules = sorted(m for t in lora.wan_targets(student) for m in t.modules)
    assert len(s_modules) == 2 * 6 + 4  # unrolled: one target per layer, plus 2 x 2 embedder linears
    assert "condition_embedder.delta_embedder.linear_2" in s_modules
    assert not any("attn2" in m or "time_proj" in m or "text_embedder" in m for m in s_modules)
    with pytest.raises(lora.LoraError, match="delta_embedder.*teacher"):
        lora.wan_targets(teacher, "student")
    # the reference's counted trainable sizes (spec 4.1: about 256M for 1.3B, 807M for 14B)
    wan13 = WanTransformer3D(num_attention_heads=12, ffn_dim=8960, num_layers=30, flow_map=True)
    n13 = lora.count_params(lora.abstract_adapters(wan13.abstract_params(), lora.wan_targets(wan13), 256))
    assert n13 == 256 * (30 * (8 * 1536 + 2 * (1536 + 8960)) + 2 * (256 + 1536 + 2 * 1536)) == 258_080_768
    wan14 = WanTransformer3D()
    n14 = lora.count_params(lora.abstract_adapters(wan14.abstract_params(), lora.wan_targets(wan14, "critic"), 256))
    assert n14 == 807_403_520


def test_fresh_adapter_is_the_base_bit_for_bit(student):
    model, base = student
    targets = lora.wan_targets(model)
    adapters = lora.init_adapters(jax.random.key(3), base, targets, RANK, ALPHA)
    # PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform, a = sqrt(5)), B = 0
    q = adapters["blocks"]["attn1"]["to_q"]["kernel"]
    assert q.lora_A.shape == (2, 24, RANK) and q.lora_B.shape == (2, RANK, 24) and q.alpha == ALPHA
    a = np.asarray(q.lora_A)
    assert np.abs(a).max() <= 1 / math.sqrt(24) and np.abs(a).max() > 0.8 / math.sqrt(24)
    assert not np.any(np.asarray(q.lora_B))
    assert len(lora.adapter_paths(adapters)) == len(targets) == 10
    assert len(jax.tree_util.tree_leaves(adapters)) == 20
    merged = lora.merge(base, adapters)
    jax.tree_util.tree_map(lambda m, b: np.testing.assert_array_equal(np.asarray(m), np.asarray(b)), merged, base)

    x, t, r, ctx = _inputs()
    plain = _forward(model, False)(base, x, t, r, ctx)
    with_lora = _forward(model, True)(lora.LoraParams(adapters, base), x, t, r, ctx)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(plain))
    # ... and a trained adapter changes the output
    moved = _forward(model, True)(lora.LoraParams(_trained(adapters), base), x, t, r, ctx)
    assert np.abs(np.asarray(moved) - np.asarray(plain)).max() > 1e-2


def test_merge_formula_and_errors():
    rng = np.random.RandomState(0)
    base = {"a": {"kernel": jnp.asarray(rng.randn(3, 5, 7), jnp.float32), "bias": jnp.ones(7)},
            "b": {"kernel": jnp.asarray(rng.randn(7, 2), jnp.float32)}}
    ad = _trained(lora.init_adapters(jax.random.key(0), base, ["a/kernel", ("b", "kernel")], 2, alpha=3.0), 1, 1.0)
    merged = lora.merge(base, ad)
    la, lb = ad["a"]["kernel"], ad["b"]["kernel"]
    want_a = np.asarray(base["a"]["kernel"]) + 1.5 * np.einsum("lir,lro->lio", np.asarray(la.lora_A), np.asarray(la.lora_B))
    np.testing.assert_allclose(np.asarray(merged["a"]["kernel"]), want_a, rtol=1e-6, atol=1e-6)
    want_b = np.asarray(base["b"]["kernel"]) + 1.5 * np.asarray(lb.lora_A) @ np.asarray(lb.lora_B)
    np.testing.assert_allclose(np.asarray(merged["b"]["kernel"]), want_b, rtol=1e-6, atol=1e-6)
    assert merged["a"]["bias"] is base["a"]["bias"]  # untouched leaves are the base's own arrays
    with pytest.raises(lora.LoraError, match="'a/bias' has shape"):
        lora.init_adapters(jax.random.key(0), base, ["a/bias"], 2)
    with pytest.raises(lora.LoraError, match="'c/kernel' is not a parameter"):
        lora.init_adapters(jax.random.key(0), base, ["c/kernel"], 2)
    with pytest.raises(lora.LoraError, match="listed twice"):
        lora.init_adapters(jax.random.key(0), base, ["a/kernel", ("a", "kernel")], 2)
    wrong = {"b": {"kernel": lora.LoraWeights(jnp.zeros((5, 2)), jnp.zeros((2, 2)), 1.0)},
             "x": {"kernel": lb}}
    with pytest.raises(lora.LoraError) as e:
        lora.merge(base, wrong)
    assert "b/kernel: lora_A (5, 2) @ lora_B (2, 2)" in str(e.value) and "x/kernel: not a parameter" in str(e.value)
    # plain {lora_A, lora_B} dicts (a checkpoint restored without a target) become adapters again
    plain = {"a": {"kernel": {"lora_A": la.lora_A, "lora_B": la.lora_B}}, "b": {"kernel": {"lora_A": lb.lora_A, "lora_B": lb.lora_B}}}
    assert jax.tree_util.tree_structure(lora.as_adapters(plain, 3.0)) == jax.tree_util.tree_structure(ad)


# ------------------------------------------------------------------------------ training
def test_gradients_and_optimizer_state_only_for_adapters_base_unchanged():
    model = WanTransformer3D(**CFG)
    base = perturbed(model.init_params(jax.random.key(0)), 1, 0.1)
    base_copy = jax.tree_util.tree_map(lambda x: np.array(x), base)
    adapters = lora.init_adapters(jax.random.key(1), base, lora.wan_targets(model, "teacher"), RANK, ALPHA)
    fn = lora.lora_apply(make_apply_fn(model))
    x, _, _, ctx = _inputs()
    batch = {"x0": x, "context": ctx}

    def loss(ad, base, key):
        return losses.flow_matching_loss(fn, lora.LoraParams(ad, base), batch, key, text_dropout=0.0)[0]

    tx = optax.adamw(1e-2)
    opt_state = tx.init(adapters)
    n_state = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(opt_state))
    assert n_state == 2 * lora.count_params(adapters) + 1  # mu, nu of the factors and the step count

    @jax.jit
    def step(ad, opt_state, base, key):
        g = jax.grad(loss)(ad, base, key)
        updates, opt_state = tx.update(g, opt_state, ad)
        return optax.apply_updates(ad, updates), opt_state, g

    new, opt_state, grads = step(adapters, opt_state, base, jax.random.key(2))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 2 * 6  # lora_A and lora_B of the six attention / FFN kernels, nothing else
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        if name.endswith("lora_A"):  # B = 0 at the start: dA = dW' B^T vanishes exactly (as in PEFT)
            assert not np.any(np.asarray(g)), name
        else:
            assert np.abs(np.asarray(g)).max() > 0, name
    new, opt_state, _ = step(new, opt_state, base, jax.random.key(3))
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, base_copy)
    q0, q2 = adapters["blocks"]["attn1"]["to_q"]["kernel"], new["blocks"]["attn1"]["to_q"]["kernel"]
    assert np.abs(np.asarray(q2.lora_B)).max() > 0 and q2.alpha == ALPHA
    assert np.abs(np.asarray(q2.lora_A) - np.asarray(q0.lora_A)).max() > 0  # moves once B is non-zero


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_in_network_merge_equals_merge_outside(scan_layers):
    """``network_apply`` (each layer merges its own kernel, one scanned layer at a time) gives the
    values and adapter gradients of merging the whole base up front (``lora_apply``), for a
    scanned and an unrolled student under full remat, embedder adapters included; a fresh adapter
    is the plain network (no ``lora`` collection) exactly."""
    model = WanTransformer3D(**CFG, flow_map=True, scan_layers=scan_layers, remat_policy="full")
    # random leaves from the shapes alone (no compiled init: this test stays at two compilations)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
    base = perturbed(zeros(nn.meta.unbox(model.abstract_params())), 1, 0.3)
    targets = lora.wan_targets(model)
    adapters = _trained(zeros(lora.abstract_adapters(base, targets, RANK, ALPHA)), 2)
    fresh = jax.tree_util.tree_map(lambda lw: lora.LoraWeights(lw.lora_A, jnp.zeros_like(lw.lora_B), lw.alpha),
                                   adapters, is_leaf=lambda x: isinstance(x, lora.LoraWeights))
    x, t, r, ctx = _inputs(f=2, h=4, w=4)
    outside, inside = lora.lora_apply(make_apply_fn(model)), lora.network_apply(model)

    @jax.jit
    def run(adapters, fresh, base):
        def value_and_grad(fn):
            def loss(ad):
                u = fn(lora.LoraParams(ad, base), x, t, r, ctx)
                return jnp.sum(jnp.sin(3.0 * u)), u
            return jax.value_and_grad(loss, has_aux=True)(adapters)
        return (value_and_grad(outside), value_and_grad(inside),
                inside(lora.LoraParams(fresh, base), x, t, r, ctx), make_apply_fn(model)(base, x, t, r, ctx))

    ((l_out, u_out), g_out), ((l_in, u_in), g_in), u_fresh, u_plain = run(adapters, fresh, base)
    assert np.abs(np.asarray(u_out)).max() > 0.1
    np.testing.assert_allclose(u_in, u_out, rtol=1e-5, atol=1e-6)  # bit-identical on XLA:CPU
    np.testing.assert_allclose(l_in, l_out, rtol=1e-5)
    assert jax.tree_util.tree_structure(g_in) == jax.tree_util.tree_structure(g_out)
    assert len(jax.tree_util.tree_leaves(g_in)) == 2 * len(targets)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_in), jax.tree_util.tree_leaves(g_out)):
        b = np.asarray(b)
        assert np.abs(b).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(u_fresh, u_plain)
    with pytest.raises(lora.LoraError, match="not a parameter of the base"):
        inside(lora.LoraParams({"nope": adapters["condition_embedder"]}, base), x, t, r, ctx)


# ------------------------------------------------------------------------------ interop
@pytest.mark.slow
def test_merged_export_matches_diffusers(teacher, tmp_path):
    from diffusers import WanTransformer3DModel
    _, _, model, base = teacher
    adapters = _trained(lora.init_adapters(jax.random.key(0), base, lora.wan_targets(model), RANK, ALPHA), 2)
    save_merged_transformer(tmp_path / "merged", model, base, adapters)
    tm = WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    x, t, _, ctx = _inputs()
    ours = np.asarray(_forward(model, True)(lora.LoraParams(adapters, base), x, t, t, ctx))
    plain = np.asarray(_forward(model, False)(base, x, t, t, ctx))
    theirs = reference.torch_forward(tm, x, t, ctx)
    assert _rel(plain, theirs) > 1e-2  # the adapters matter ...
    assert _rel(ours, theirs) <= 1e-4  # ... and diffusers sees them merged
    _, reread = load_transformer(tmp_path / "merged")
    jax.tree_util.tree_map(np.testing.assert_array_equal, reread, jax.jit(lora.merge)(base, adapters))


@pytest.mark.slow
@pytest.mark.parametrize("flow_map", [False, True])
def test_peft_adapter_loads_onto_diffusers_base(teacher, tmp_path, flow_map):
    tm, folder, model, base = teacher
    if flow_map:  # AnyFlow student: PEFT adapters also on the time and delta embedders
        tm = reference.add_flow_map_embedder(reference.random_diffusers_model(seed=4, **CFG), gate=0.25)
        reference.save_flow_map_model(tm, tmp_path / "student")
        model, base = load_transformer(tmp_path / "student")
    else:
        from diffusers import WanTransformer3DModel
        tm = WanTransformer3DModel.from_pretrained(folder).eval()  # a fresh copy, not the fixture's
    adapters = _trained(lora.init_adapters(jax.random.key(5), base, lora.wan_targets(model), RANK, ALPHA), 3)
    save_peft_adapter(tmp_path / "peft", model, adapters)
    f = SafetensorsFile(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    assert f.shape("transformer.blocks.1.attn1.to_q.lora_A.weight") == (RANK, 24)
    assert f.shape("transformer.blocks.1.ffn.net.0.proj.lora_B.weight") == (32, RANK)
    meta = json.loads(f.metadata["lora_adapter_metadata"])
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == ALPHA

    tm.load_lora_adapter(str(tmp_path / "peft"), weight_name="pytorch_lora_weights.safetensors",
                         prefix="transformer", adapter_name="trained")
    x, t, r, ctx = _inputs(seed=1)
    r = r if flow_map else t
    ours = np.asarray(_forward(model, True)(lora.LoraParams(adapters, base), x, t, r, ctx))
    plain = np.asarray(_forward(model, False)(base, x, t, r, ctx))
    theirs = reference.torch_forward(tm, x, t, ctx, r if flow_map else None)
    assert _rel(plain, theirs) > 1e-2
    assert _rel(ours, theirs) <= 1e-4
    n_lora = sum(1 for n, _ in tm.named_parameters() if "lora_" in n)
    assert n_lora == 2 * (2 * 6 + (4 if flow_map else 0))


def test_peft_import_roundtrip_exact_across_layouts(student, tmp_path):
    model, base = student
    adapters = _trained(lora.init_adapters(jax.random.key(1), base, lora.wan_targets(model), RANK, ALPHA), 4)
    save_peft_adapter(tmp_path / "peft", model, adapters)
    back = load_peft_adapter(tmp_path / "peft", model)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(adapters)  # alpha included
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, adapters)
    # the same file onto the unrolled (scan_layers=False) model: per-layer adapters, same values
    unrolled = model.clone(scan_layers=False)
    per_layer = load_peft_adapter(tmp_path / "peft" / "pytorch_lora_weights.safetensors", unrolled)
    np.testing.assert_array_equal(np.asarray(per_layer["blocks_1"]["ffn"]["net_2"]["kernel"].lora_B),
                                  np.asarray(adapters["blocks"]["ffn"]["net_2"]["kernel"].lora_B[1]))
    save_peft_adapter(tmp_path / "peft2", unrolled, per_layer)
    a, b = (SafetensorsFile(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("peft", "peft2"))
    assert set(a.keys()) == set(b.keys()) and a.metadata == b.metadata
    for k in a.keys():
        np.testing.assert_array_equal(a.read(k), b.read(k))
    with pytest.raises(FileExistsError):
        save_peft_adapter(tmp_path / "peft", model, adapters)


def test_bad_peft_file_is_one_clear_error(tmp_path):
    model = WanTransformer3D(**CFG)
    base = model.init_params(jax.random.key(0))
    adapters = lora.init_adapters(jax.random.key(1), base, lora.wan_targets(model), RANK)
    save_peft_adapter(tmp_path / "good", model, adapters)
    f = SafetensorsFile(tmp_path / "good" / "pytorch_lora_weights.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    del tensors["transformer.blocks.0.attn1.to_k.lora_B.weight"]
    tensors["transformer.blocks.1.attn2.to_q.lora_A.weight"] = np.zeros((RANK, 24), np.float32)
    tensors["transformer.blocks.1.ffn.net.2.lora_A.weight"] = np.zeros((RANK, 31), np.float32)
    os.makedirs(tmp_path / "bad")
    write_safetensors(str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"), sorted(tensors.items()),
                      metadata=f.metadata)
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(tmp_path / "bad", model)
    msg = str(e.value)
    assert "missing tensors (1): ['transformer.blocks.0.attn1.to_k.lora_B.weight']" in msg
    assert "unexpected tensors (1): ['transformer.blocks.1.attn2.to_q.lora_A.weight']" in msg
    assert "transformer.blocks.1.ffn.net.2.lora_A.weight has shape (4, 31), expected (r, 32)" in msg
    with pytest.raises(CheckpointError, match="match no linear layer"):
        load_peft_adapter(tmp_path / "good", model, "student")
    # a teacher adapter file onto a student: the embedder adapters are missing
    with pytest.raises(CheckpointError, match="missing tensors \\(8\\).*delta_embedder"):
        load_peft_adapter(tmp_path / "good", model.clone(flow_map=True))


# ------------------------------------------------------------------------------ sharding
def test_adapters_shard_like_their_kernels(student):
    model, base = student
    boxed = model.abstract_params()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    adapters = _trained(lora.init_adapters(jax.random.key(1), base, lora.wan_targets(model), RANK, ALPHA), 2)
    names = lora.adapter_logical_names(boxed, adapters)
    assert names["blocks"]["attn1"]["to_q"]["kernel"].lora_A == ("layers", "embed", "lora_rank")
    assert names["blocks"]["ffn"]["net_2"]["kernel"].lora_B == ("layers", "lora_rank", "embed")
    sh = lora.adapter_shardings(adapters, boxed, mesh)
    want = {  # kernel (in, out) names -> A (in, rank), B (rank, out)
        ("blocks", "attn1", "to_q"): (P(None, "fsdp", None), P(None, None, "tensor")),  # (embed, heads)
        ("blocks", "attn1", "to_out_0"): (P(None, "tensor", None), P(None, None, "fsdp")),  # (heads, embed)
        ("blocks", "ffn", "net_0"): (P(None, "fsdp", None), P(None, None, "tensor")),  # (embed, mlp)
        ("condition_embedder", "time_embedder", "linear_1"): (P(None, None), P(None, "tensor")),  # (freq, mlp)
        ("condition_embedder", "delta_embedder", "linear_2"): (P("tensor", None), P(None, "fsdp")),  # (mlp, embed)
    }
    for path, (pa, pb) in want.items():
        s = sh
        for k in path + ("kernel",):
            s = s[k]
        assert (s.lora_A.spec, s.lora_B.spec) == (pa, pb), path
    base_sh = parallel.param_shardings(boxed, mesh)
    merged = jax.jit(lora.merge, out_shardings=base_sh)(jax.device_put(base, base_sh), jax.device_put(adapters, sh))
    kernel = merged["blocks"]["attn1"]["to_q"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor") and len(kernel.addressable_shards) == 8
    q = adapters["blocks"]["attn1"]["to_q"]["kernel"]
    want = np.asarray(base["blocks"]["attn1"]["to_q"]["kernel"]) + 2.0 * np.einsum(
        "lir,lro->lio", np.asarray(q.lora_A), np.asarray(q.lora_B))
    np.testing.assert_allclose(np.asarray(kernel), want, rtol=1e-5, atol=1e-6)
    # adapters can be created directly sharded
    fresh = jax.jit(lambda k: lora.init_adapters(k, boxed, lora.wan_targets(model), RANK, ALPHA), out_shardings=sh)(jax.random.key(0))
    assert fresh["blocks"]["ffn"]["net_0"]["kernel"].lora_B.sharding.spec == P(None, None, "tensor")


# ------------------------------------------------------------------------------ leaves trained in full
def test_leaves_trained_in_full_next_to_the_adapters(tmp_path):
    """The FAR stages' ``far_patch_embedding`` is trained in full next to the LoRA adapters (the
    reference's ``param_names_to_optimize``): a zero :class:`lora.DenseDelta` per leaf, the merged
    leaf ``base + delta``. A fresh one is the base bit for bit; its gradient is the network's
    gradient in that leaf; the in-network merge equals the merge outside, values and gradients;
    it shards like its leaf; a LoRA file refuses it."""
    from anyflow_jax.models.far_wan import FarWanTransformer3D
    model = FarWanTransformer3D(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                text_dim=8, freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=64,
                                flow_map=True, chunk_partition=(1, 2, 1), full_chunk_limit=1)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)  # noqa: E731
    boxed = model.abstract_params()
    base = perturbed(zeros(nn.meta.unbox(boxed)), 1, 0.3)
    full = lora.full_paths(base, ["far_patch_embedding"])
    assert full == [("far_patch_embedding", "bias"), ("far_patch_embedding", "kernel")]
    targets = lora.wan_targets(model)
    fresh = lora.init_adapters(jax.random.key(1), base, targets, RANK, ALPHA, full=full)
    fpe = fresh["far_patch_embedding"]
    assert isinstance(fpe["kernel"], lora.DenseDelta) and not np.any(np.asarray(fpe["kernel"].delta))
    n_full = sum(int(np.prod(base["far_patch_embedding"][k].shape)) for k in ("kernel", "bias"))
    assert lora.count_params(fresh) == lora.count_params(lora.split_full(fresh)[0]) + n_full
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora.merge(base, fresh), base)
    adapters = _trained(fresh, 2)
    merged = lora.merge(base, adapters)
    np.testing.assert_array_equal(merged["far_patch_embedding"]["kernel"], base["far_patch_embedding"]["kernel"]
                                  + adapters["far_patch_embedding"]["kernel"].delta)

    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 8, 8, 4).astype(np.float32)  # 3 chunks, the first two compressed context
    t = np.concatenate([np.zeros((2, 3)), rng.rand(2, 1)], 1).astype(np.float32)
    ctx = rng.randn(2, 3, 8).astype(np.float32)
    plain = make_apply_fn(model)
    outside, inside = lora.lora_apply(plain), lora.network_apply(model)

    def loss_of(fn):
        return lambda p: jnp.sum(jnp.sin(3.0 * fn(p, x, t, 0.5 * t, ctx)))

    @jax.jit
    def run(adapters, base):
        g_out = jax.grad(lambda ad: loss_of(outside)(lora.LoraParams(ad, base)))(adapters)
        g_in = jax.grad(lambda ad: loss_of(inside)(lora.LoraParams(ad, base)))(adapters)
        g_plain = jax.grad(loss_of(plain))(lora.merge(base, adapters))
        return g_out, g_in, g_plain

    g_out, g_in, g_plain = run(adapters, base)
    for k in ("kernel", "bias"):
        want = np.asarray(g_plain["far_patch_embedding"][k])
        assert np.abs(want).max() > 1e-3, k  # the compressed context reaches the loss
        np.testing.assert_allclose(g_out["far_patch_embedding"][k].delta, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(g_in["far_patch_embedding"][k].delta, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    a = np.asarray(g_in["blocks"]["attn1"]["to_q"]["kernel"].lora_B)
    np.testing.assert_allclose(a, g_out["blocks"]["attn1"]["to_q"]["kernel"].lora_B, rtol=1e-4, atol=1e-5 * np.abs(a).max())

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sh = lora.adapter_shardings(adapters, boxed, mesh)
    assert sh["far_patch_embedding"]["kernel"].delta.spec == parallel.param_shardings(
        boxed, mesh)["far_patch_embedding"]["kernel"].spec
    restored = lora.as_adapters(jax.tree_util.tree_map(np.asarray, {"far_patch_embedding": {
        "kernel": {"delta": fpe["kernel"].delta}}}), ALPHA)
    assert isinstance(restored["far_patch_embedding"]["kernel"], lora.DenseDelta)
    with pytest.raises(CheckpointError, match="far_patch_embedding/bias, far_patch_embedding/kernel in full"):
        save_peft_adapter(str(tmp_path / "peft"), model, adapters)
    with pytest.raises(lora.LoraError, match="both LoRA targets and trained in full"):
        lora.init_adapters(jax.random.key(1), base, targets, RANK, ALPHA, full=[targets[0].path])
    with pytest.raises(lora.LoraError, match="'nope' names no parameter"):
        lora.full_paths(base, ["nope"])
