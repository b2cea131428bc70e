"""The cuDNN attention wrapper's padding, checked on CPU.

cuDNN itself needs an NVIDIA GPU; here `jax.nn.dot_product_attention` runs with XLA's implementation in its
place, so what is checked is the wrapper's own work: odd lengths padded to even (through the sequence
lengths without a mask, through the mask with one) and the pad sliced off, values and gradients equal to the
plain softmax attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.nn.attention import attention


@pytest.fixture
def xla_in_place_of_cudnn(monkeypatch):
    original = jax.nn.dot_product_attention
    seen = []

    def fake(*args, implementation=None, **kw):
        assert implementation == "cudnn"
        seen.append((args[0].shape[1], args[1].shape[1], sorted(k for k, v in kw.items() if v is not None)))
        return original(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return seen


def _qkv(l, s, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(ks[0], (2, l, 3, 16), jnp.float32),
        jax.random.normal(ks[1], (2, s, 3, 16), jnp.float32),
        jax.random.normal(ks[2], (2, s, 3, 16), jnp.float32),
    )


def _loss(backend, mask=None):
    def f(q, k, v):
        o = attention(q, k, v, mask=mask, backend=backend)
        return jnp.sum(o * jnp.cos(o)), o

    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize("l,s", [(7, 7), (7, 10), (8, 9), (8, 10)])
def test_cudnn_wrapper_pads_odd_lengths_without_a_mask(xla_in_place_of_cudnn, l, s):
    q, k, v = _qkv(l, s)
    (_, out), grads = _loss("cudnn")(q, k, v)
    (_, ref), ref_grads = _loss("xla")(q, k, v)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    (pl, ps, kw), *_ = xla_in_place_of_cudnn
    assert pl % 2 == 0 and ps % 2 == 0
    odd = l % 2 or s % 2
    assert kw == (["key_value_seq_lengths", "query_seq_lengths"] if odd else [])


def test_cudnn_wrapper_pads_odd_lengths_with_a_mask(xla_in_place_of_cudnn):
    q, k, v = _qkv(7, 9, seed=1)
    mask = jnp.arange(9)[None, None, None, :] < jnp.array([9, 5])[:, None, None, None]
    (_, out), grads = _loss("cudnn", mask)(q, k, v)
    (_, ref), ref_grads = _loss("xla", mask)(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert xla_in_place_of_cudnn[0][:2] == (8, 10)
