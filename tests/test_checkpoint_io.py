"""The component checkpoint's reader: what `restore_params` reads directly equals Orbax's own load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sd3_jax.convert.orbax_io import (
    CheckpointFormatError,
    _plain_layout,
    restore_params,
    save_params_streaming,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A component of mixed dtypes and sizes (two over the 1 MiB of a mapped buffer) written as a
    conversion writes one, in several partial saves."""
    r = np.random.default_rng(0)
    tree = {
        "blocks": {
            "kernel": r.standard_normal((3, 300, 400), np.float32),  # 1.4 MiB
            "bias": r.standard_normal((3, 400), np.float32),
        },
        "embed": r.standard_normal((1100, 600)).astype(ml_dtypes.bfloat16),  # 1.3 MiB
        "scale": r.standard_normal((7,)).astype(np.float16),
    }
    d = str(tmp_path_factory.mktemp("ckpt") / "component")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    save_params_streaming(d, [(tuple(k.key for k in p), v) for p, v in leaves], chunk_bytes=1 << 20)
    return d, tree


def orbax_load(d, abstract, dtype=None):
    import orbax.checkpoint.experimental.v1 as ocp

    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ocp.load(
        d, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=dev), abstract)
    )


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16])
def test_direct_read_equals_orbax_load_bit_for_bit(saved, dtype):
    d, tree = saved
    assert _plain_layout(d)  # read by TensorStore directly, not through Orbax
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    got, want = restore_params(d, abstract, dtype), orbax_load(d, abstract, dtype)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(tree)):
        assert g.dtype == w.dtype == (dtype or x.dtype) and g.shape == w.shape == x.shape
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))
    if dtype is None:  # and the stored values themselves
        for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(g).view(np.uint8), x.view(np.uint8))


def test_direct_read_of_a_truncated_file_is_one_error(saved, tmp_path):
    import os
    import shutil

    d, tree = saved
    shutil.copytree(d, tmp_path / "c")
    files = [os.path.join(p, f) for p, _, fs in os.walk(tmp_path / "c" / "state") for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    with pytest.raises(CheckpointFormatError, match="the checkpoint is damaged") as e:
        restore_params(str(tmp_path / "c"), abstract)
    assert len(str(e.value).splitlines()) == 1
