"""The ``xla`` attention's query blocks and its custom derivative (models/attention.py): values,
reverse-mode and forward-mode derivatives equal those of a plain softmax attention, for one block
and for several (with a padded last block), with and without a chunk-causal mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax.models import attention


def _plain(q, k, v, scale, keep=None):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if keep is not None:
        logits = jnp.where(keep, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("block_elements", [None, 2 * 3 * 13 * 8])  # one block; 3 blocks of 8 (+1 pad)
@pytest.mark.parametrize("masked", [False, True])
def test_blocked_attention_matches_plain_softmax(block_elements, masked):
    rng = np.random.RandomState(0)
    b, l, h, d = 2, 13, 3, 4
    q, k, v, w, tq, tk, tv = (jnp.asarray(rng.randn(b, l, h, d), jnp.float32) for _ in range(7))
    mask = attention.ChunkCausalMask((5, 9, 13), (5, 9, 13)) if masked else None
    keep = jnp.asarray(mask.dense(l, l)) if masked else None
    scale = 0.37

    def ours(q, k, v):
        return attention._xla_attention(q, k, v, scale, mask, block_elements=block_elements)

    def ref(q, k, v):
        return _plain(q, k, v, scale, keep)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-6)
    if masked:  # the first chunk's queries must not see later keys
        moved = ours(q, k.at[:, 5:].add(3.0), v.at[:, 5:].add(3.0))
        np.testing.assert_allclose(moved[:, :5], ours(q, k, v)[:, :5], atol=1e-6)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        assert float(jnp.abs(r).max()) > 1e-2
        np.testing.assert_allclose(a, r, atol=2e-5)
    j_ours = jax.jvp(ours, (q, k, v), (tq, tk, tv))[1]
    j_ref = jax.jvp(ref, (q, k, v), (tq, tk, tv))[1]
    np.testing.assert_allclose(j_ours, j_ref, atol=2e-5)
    # reverse mode through forward mode (the stage-1 loss differentiates a jvp)
    gj_ours = jax.grad(lambda q: jnp.sum(jax.jvp(lambda x: ours(x, k, v), (q,), (tq,))[1] ** 2))(q)
    gj_ref = jax.grad(lambda q: jnp.sum(jax.jvp(lambda x: ref(x, k, v), (q,), (tq,))[1] ** 2))(q)
    np.testing.assert_allclose(gj_ours, gj_ref, atol=1e-4, rtol=1e-4)
