"""Norms, dense layers, the MLP and adaLN modulation, shared by every network.

Norms compute in float32 and cast back to the compute dtype (flax gemma `RMSNorm`).
Every param carries logical axis names (see `sd3_jax/sharding/rules.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
default_kernel_init = nn.initializers.lecun_normal()


class Dense(nn.Module):
    """y = x . kernel + bias over the trailing `n_in` axes of x, into `features` axes (a DenseGeneral).

    The kernel is (in axes..., out axes...) and carries the logical axis `names`; written here rather than
    with `nn.DenseGeneral`, which initialises a flattened kernel and so cannot name its axes under a mesh.
    """

    features: tuple[int, ...]  # output axes
    names: tuple[str | None, ...]  # logical names of the kernel's axes, inputs then outputs
    n_in: int = 1  # how many trailing axes of x are contracted
    use_bias: bool = True
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        shape = (*in_shape, *self.features)
        n_out = len(self.features)
        init = (
            nn.initializers.variance_scaling(
                1.0,
                "fan_in",
                "truncated_normal",
                in_axis=tuple(range(self.n_in)),
                out_axis=tuple(range(self.n_in, self.n_in + n_out)),
            )
            if self.kernel_init is default_kernel_init
            else self.kernel_init
        )
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), shape, self.param_dtype)
        bias = None
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.names[self.n_in :])
            bias = self.param("bias", binit, self.features, self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y + bias if bias is not None else y


def dense(
    features: int | Sequence[int],
    names: tuple[str | None, ...],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
    kernel_init=default_kernel_init,
) -> nn.Module:
    """A `Dense` whose kernel axes are named `names` (input axes then output axes).

    `axis` is -1 or the trailing axes (-2, -1) to contract.
    """
    feats = (features,) if isinstance(features, int) else tuple(features)
    n_in = 1 if isinstance(axis, int) else len(tuple(axis))
    if (isinstance(axis, int) and axis != -1) or (
        not isinstance(axis, int) and tuple(axis) != tuple(range(-n_in, 0))
    ):
        raise ValueError(f"dense contracts trailing axes only, got axis={axis}")
    return Dense(feats, tuple(names), n_in, use_bias, dtype, param_dtype, kernel_init, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32."""

    eps: float = 1e-6  # added to the variance
    use_scale: bool = False  # learned elementwise scale (torch `weight`)
    use_bias: bool = False  # learned elementwise bias
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        d = x.shape[-1]
        if self.use_scale:
            init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
            y = y * self.param("scale", init, (d,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))
            y = y + self.param("bias", init, (d,), self.param_dtype).astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale, computed in float32 (diffusers `RMSNorm`)."""

    eps: float = 1e-6  # added to the mean square
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        return (y * scale.astype(jnp.float32)).astype(dtype)


class MLP(nn.Module):
    """fc1 -> tanh-GELU -> fc2, the MMDiT feed-forward."""

    hidden: int  # hidden width
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.gelu(h, approximate=True)
        return dense(d, ("mlp", "embed"), name="fc2", **kw)(h)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift, with (B, D) shift/scale broadcast over the sequence."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D, n * D), split in n chunks of the conditioning vector (adaLN-Zero)."""

    n: int  # number of modulation vectors (6 adaLN-Zero, 9 MMDiT-X, 2 final/continuous)
    features: int  # width of each vector
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array) -> list[jax.Array]:
        h = dense(
            self.n * self.features,
            ("cond", "mod"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="linear",
        )(nn.silu(c))
        return jnp.split(h, self.n, axis=-1)
