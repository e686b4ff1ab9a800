"""The Flax UMT5 encoder and its loader against transformers' UMT5EncoderModel (fp32, CPU).

Weights are written by transformers' ``save_pretrained`` and read by our loader, so the name
table, layout transforms and the network are checked together.
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from text_testlib import load_torch_text_encoder, make_tiny_text_encoder

from anyflow_jax.checkpoints.diffusers import CheckpointError
from anyflow_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from anyflow_jax.checkpoints.text_encoder import load_text_encoder
from anyflow_jax.models.umt5 import UMT5Encoder, relative_position_buckets

torch = pytest.importorskip("torch")

TOL = 1e-4  # relative: max |ours - transformers| / max |transformers|
VOCAB = 300

# name -> (make_tiny_text_encoder kwargs, sequence lengths)
CASES = {
    # 2 layers, gated-gelu (UMT5's FFN), max distance 16 < 40 tokens: the far buckets are used
    "gated_gelu_long": (dict(), (7, 40)),
    # 3 layers, plain ReLU FFN, inner dim 2 x 12 != d_model, default 32 buckets / distance 128
    "relu_3_layers": (dict(num_layers=3, num_heads=2, d_kv=12, d_ff=40, feed_forward_proj="relu",
                           relative_attention_num_buckets=32, relative_attention_max_distance=128), (20,)),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("umt5") / "text_encoder", vocab_size=VOCAB, seed=0)


def _inputs(length, seed=0, vocab=VOCAB):
    """Batch of 3: no padding, padded after 60% of the tokens, a single token."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, size=(3, length)).astype(np.int64)
    mask = np.ones((3, length), np.int64)
    mask[1, int(0.6 * length):] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0  # pad id, as the tokenizer writes it
    return ids, mask


def _apply(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask)


def _torch_out(tm, ids, mask):
    with torch.no_grad():
        return tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.float().numpy()


def _rel_err(out, ref):
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case, tmp_path):
    kwargs, lengths = CASES[case]
    path = make_tiny_text_encoder(tmp_path / "te", vocab_size=VOCAB, seed=1, **kwargs)
    tm = load_torch_text_encoder(path)
    for scan in (True, False):
        model, params = load_text_encoder(path, model_kwargs=dict(scan_layers=scan))
        assert model.num_layers == tm.config.num_layers and model.is_gated_act == tm.config.is_gated_act
        fn = jax.jit(functools.partial(_apply, model))
        for length in (lengths if scan else lengths[-1:]):  # unrolled: the longest only (compile time)
            ids, mask = _inputs(length, seed=length)
            ref = _torch_out(tm, ids, mask)
            out = np.asarray(fn(params, ids, mask))
            assert out.shape == ref.shape == (3, length, model.d_model) and out.dtype == np.float32
            err = _rel_err(out, ref)
            print(f"{case} scan={scan} L={length}: relative max error {err:.3g}")
            assert err <= TOL, err
            if scan:  # the padding mask matters: unmasked attention gives a different result
                unmasked = np.asarray(fn(params, ids, np.ones_like(mask)))
                assert _rel_err(unmasked[1], ref[1]) > 1e-2


def test_position_bias_matters(tiny_dir):
    """Every layer has its own relative position bias (UMT5, unlike T5): zeroing layer 1's table
    alone changes the result."""
    model, params = load_text_encoder(tiny_dir)
    ids, mask = _inputs(40)
    fn = jax.jit(lambda p: model.apply({"params": p}, ids, mask))
    out = np.asarray(fn(params))
    layers = dict(params["layers"])
    attn = dict(layers["attn"])
    attn["relative_attention_bias"] = attn["relative_attention_bias"].at[1].set(0.0)  # layer 1 only
    layers["attn"] = attn
    out2 = np.asarray(fn(dict(params, layers=layers)))
    assert _rel_err(out2, out) > 1e-2


@pytest.mark.parametrize("buckets,distance,length", [(32, 128, 600), (8, 16, 50), (6, 20, 70)])
def test_buckets_match_transformers(buckets, distance, length):
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention
    attn = UMT5Attention(UMT5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance,
                                    d_model=8, d_kv=2, num_heads=4), has_relative_attention_bias=True)
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    ours = relative_position_buckets(length, length, buckets, distance)
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() == 0 and ours.max() == buckets - 1  # both halves, up to the far bucket


def test_bf16_compute(tiny_dir):
    tm = load_torch_text_encoder(tiny_dir)
    model, params = load_text_encoder(tiny_dir, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    ids, mask = _inputs(40)
    ref = _torch_out(tm, ids, mask)
    out = model.apply({"params": params}, ids, mask)
    assert out.dtype == jnp.bfloat16
    err = _rel_err(out, ref)
    # transformers' own bf16 run of the same weights, for scale
    tb = load_torch_text_encoder(tiny_dir, dtype=torch.bfloat16)
    err_torch = _rel_err(_torch_out(tb, ids, mask), ref)
    print(f"bf16 relative max error: ours {err:.3g}, transformers bf16 {err_torch:.3g}")
    assert 1e-4 < err < 0.05  # really computed in bf16, and close
    assert err <= 1.5 * err_torch + 1e-3


# ----------------------------------------------------------------------------------- loader
def _rewrite(src, dst, edit):
    """Copy a checkpoint folder with its tensors passed through ``edit(dict) -> dict``."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    f = SafetensorsFile(os.path.join(src, "model.safetensors"))
    tensors = edit({k: f.read(k) for k in f.keys()})
    write_safetensors(os.path.join(dst, "model.safetensors"), list(tensors.items()))
    return dst


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))


def test_loader_names_every_bad_tensor(tiny_dir, tmp_path):
    miss = "encoder.block.1.layer.0.SelfAttention.k.weight"
    extra = "encoder.block.2.layer.0.layer_norm.weight"
    shaped = "encoder.block.0.layer.1.DenseReluDense.wo.weight"

    def drop(t):
        del t[miss]
        return t

    def add(t):
        return dict(t, **{extra: np.ones(32, np.float32)})

    def reshape(t):
        return dict(t, **{shaped: np.zeros((32, 47), np.float32)})

    for i, (edit, names) in enumerate([(drop, [miss]), (add, [extra]), (reshape, [shaped, "(32, 47)", "(32, 48)"]),
                                       (lambda t: reshape(add(drop(t))), [miss, extra, shaped])]):
        bad = _rewrite(tiny_dir, tmp_path / f"bad{i}", edit)
        with pytest.raises(CheckpointError) as info:
            load_text_encoder(bad)
        for name in names:
            assert name in str(info.value)

    def no_embedding(t):
        del t["shared.weight"]
        return t

    with pytest.raises(CheckpointError, match="missing.*shared.weight"):
        load_text_encoder(_rewrite(tiny_dir, tmp_path / "noemb", no_embedding))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_text_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        os.makedirs(tmp_path / "empty")
        shutil.copy(os.path.join(tiny_dir, "config.json"), tmp_path / "empty")
        load_text_encoder(tmp_path / "empty")


def test_config_mismatch_and_wrong_model_type(tiny_dir, tmp_path):
    bad = tmp_path / "t5"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
    with pytest.raises(CheckpointError, match=r"missing tensors.*encoder\.block\.2\."):
        load_text_encoder(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="t5")))
    with pytest.raises(CheckpointError, match="model_type='t5'"):
        load_text_encoder(bad)


def test_tied_embedding_names(tiny_dir, tmp_path):
    _, ref = load_text_encoder(tiny_dir)

    def renamed(t):
        t["encoder.embed_tokens.weight"] = t.pop("shared.weight")
        return t

    def both(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"].copy()
        return t

    def untied(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"] + 1.0
        return t

    for edit in (renamed, both):
        _, params = load_text_encoder(_rewrite(tiny_dir, tmp_path / edit.__name__, edit))
        _assert_trees_equal(params, ref)
    with pytest.raises(CheckpointError, match="differ"):
        load_text_encoder(_rewrite(tiny_dir, tmp_path / "untied", untied))


def test_sharded_checkpoint(tiny_dir, tmp_path):
    sharded = make_tiny_text_encoder(tmp_path / "sharded", vocab_size=VOCAB, seed=0, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    _, single = load_text_encoder(tiny_dir)
    _, params = load_text_encoder(sharded)
    _assert_trees_equal(params, single)
    # a shard the index names but the folder lacks is named
    with open(os.path.join(sharded, "model.safetensors.index.json")) as fh:
        victim = max(json.load(fh)["weight_map"].values())
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(CheckpointError, match=victim):
        load_text_encoder(sharded)


# ----------------------------------------------------------------------------------- sharding
def test_xxl_parameters_shard_with_the_dit_rules():
    """umt5-xxl (Wan's encoder) shapes: every parameter has logical names the DiT's rule table
    knows, and the big matrices are split over fsdp x tensor."""
    from anyflow_jax import parallel
    model = UMT5Encoder()  # google/umt5-xxl defaults
    boxed = model.abstract_params()
    names = parallel.logical_names(boxed)  # fails on any parameter without names
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn_unbox(boxed)))
    assert abs(n - 5.68e9) < 0.01e9, n
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    shardings = parallel.param_shardings(boxed, mesh)

    def spec(*path):
        return tuple(_get(shardings, path).spec)

    assert spec("layers", "attn", "q", "kernel") == (None, "fsdp", "tensor")
    assert spec("layers", "attn", "o", "kernel") == (None, "tensor", "fsdp")
    assert spec("layers", "ffn", "wo", "kernel") == (None, "tensor", "fsdp")
    assert spec("layers", "attn", "relative_attention_bias") == (None, None, "tensor")
    assert spec("embed_tokens") == (None, "fsdp")
    assert _get(names, ("final_layer_norm", "scale")) == ("norm",)
    replicated = sum(int(np.prod(x.shape)) for x, s in zip(jax.tree_util.tree_leaves(nn_unbox(boxed)),
                                                           jax.tree_util.tree_leaves(shardings))
                     if all(a is None for a in s.spec))
    assert replicated / n < 1e-3


def nn_unbox(tree):
    from flax import linen as nn
    return nn.meta.unbox(tree)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree
