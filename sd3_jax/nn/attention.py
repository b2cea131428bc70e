"""The one attention function of sd3_jax and its backends.

`attention(q, k, v)` takes (B, L, N, K) queries and (B, S, N, K) keys/values and returns (B, L, N, K).
Backends: cuDNN flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(implementation="cudnn")`,
bf16/fp16 only), splash attention (a Pallas kernel) on TPU, and XLA everywhere else. `"auto"` picks one from
the platform and dtype; any backend can be forced.

The TPU kernel takes sequences in whole blocks of 128 tokens and more, and SD3's joint sequences never are
(4096 image + 333 text tokens, 4096 + 154, any bucket): `_splash` pads queries and keys to a block multiple,
keeps the padded keys out of every softmax with segment ids (valid tokens 1, padding 0) and slices the
padding off, as MaxDiffusion does. The SPMD partitioner does not split a Pallas call, so under a mesh the
kernel runs inside `shard_map`, over batch and heads by the logical-axis table: each device attends over its
own batch and heads, with no collective around the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "pallas")
LANES = 128  # the kernel's block sizes and padded lengths are multiples of this


@dataclasses.dataclass(frozen=True)
class BlockTargets:
    """Largest splash block sizes for a TPU generation (tokens); actual blocks divide the padded length."""

    q: int  # query block of the forward and dK/dV kernels
    kv: int  # key/value block
    kv_compute: int  # key/value sub-block one matmul covers


# Per chip generation (jax `device_kind`), within each chip's VMEM; MaxDiffusion's SD/Flux configs use
# 512-2048 query blocks on v5e/v5p/v6e. Each is compiled for its chip by tests/test_tpu.py's topology list.
CHIP_BLOCKS = {
    "TPU v4": BlockTargets(q=512, kv=512, kv_compute=512),
    "TPU v5 lite": BlockTargets(q=1024, kv=512, kv_compute=512),
    "TPU v5": BlockTargets(q=1024, kv=1024, kv_compute=512),
    "TPU v6 lite": BlockTargets(q=1024, kv=1024, kv_compute=512),
}
DEFAULT_BLOCKS = BlockTargets(q=512, kv=512, kv_compute=512)


def select_backend(dtype: jnp.dtype, platform: str | None = None) -> str:
    """The backend "auto" resolves to for inputs of `dtype` on `platform`.

    The default platform is that of the mesh set with `jax.set_mesh` (a TPU slice compiled for from a CPU
    host picks the TPU kernel), else jax's default backend.
    """
    platform = platform or _current_device()[0]
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu":
        return "pallas"
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Scaled dot-product attention, softmax in fp32: softmax(q k^T / sqrt(K)) v.

    Args:
      q: (B, L, N, K) queries.
      k: (B, S, N, K) keys.
      v: (B, S, N, K) values.
      mask: optional boolean mask broadcastable to (B, N, L, S), True where attending is allowed.
      backend: one of BACKENDS.
      interpret: "pallas" only: run the TPU kernel in Pallas interpret mode (any platform, for tests).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = select_backend(q.dtype)
        if mask is not None and backend != "xla":
            backend = "xla"
        if backend == "cudnn" and not _cudnn_head_dim_ok(q.shape[-1]):
            backend = "xla"
    if backend == "pallas":
        if mask is not None:
            raise ValueError("attention backend 'pallas' takes no mask here")
        return _splash(q, k, v, interpret=interpret)
    if backend == "cudnn":
        return _cudnn(q, k, v, mask)
    return _xla_attention(q, k, v, mask)


def _xla_attention(q, k, v, mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("BLNK,BSNK->BNLS", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BNLS,BSNK->BLNK", probs, v)


def _cudnn_head_dim_ok(head_dim: int) -> bool:
    """cuDNN flash attention (jax's `check_is_flash_attention`): head width a multiple of 8, at most 128
    (256 on Hopper and later; 128 keeps the check independent of the GPU)."""
    return head_dim % 8 == 0 and head_dim <= 128


def _cudnn(q, k, v, mask):
    """cuDNN flash attention. Its backward wants even lengths (jax 0.11 on an H200: "Unsupported sequence
    length Q 589, KV 589" at 256 px), so odd ones are padded by one: without a mask the pad is left out
    through the sequence lengths (cuDNN's padding mask), with one (a bias to cuDNN) through the mask; padded
    queries are sliced off."""
    if not _cudnn_head_dim_ok(q.shape[-1]):
        raise ValueError(
            f"attention backend 'cudnn' needs a head width that is a multiple of 8 and <= 128, "
            f"got {q.shape[-1]}"
        )
    b, l, s = q.shape[0], q.shape[1], k.shape[1]
    pl, ps = l % 2, s % 2
    q = jnp.pad(q, ((0, 0), (0, pl), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
    kw = {}
    if mask is not None and (pl or ps):
        mask = jnp.broadcast_to(mask, (b, q.shape[2], l, s))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pl), (0, ps)))
        mask = mask.at[:, :, l:, 0].set(True)  # padded queries attend somewhere (their output is dropped)
    elif pl or ps:  # the padding mask through the sequence lengths: no (L, S) bias is materialised
        kw = dict(
            query_seq_lengths=jnp.full((b,), l, jnp.int32), key_value_seq_lengths=jnp.full((b,), s, jnp.int32)
        )
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn", **kw)
    return out[:, :l]


def chip_blocks(device_kind: str | None = None) -> BlockTargets:
    """The block-size targets for a TPU `device_kind` (default: the first device of the current mesh or
    backend); chips not in CHIP_BLOCKS get DEFAULT_BLOCKS."""
    if device_kind is None:
        device_kind = _current_device()[1]
    return CHIP_BLOCKS.get(device_kind, DEFAULT_BLOCKS)


def _current_device() -> tuple[str, str]:
    """(platform, device_kind) of the mesh set with `jax.set_mesh`, else of jax's default device."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is None:
        device = jax.devices()[0]
    return device.platform, device.device_kind


def padded_blocks(length: int, target: int) -> tuple[int, int]:
    """(padded length, block) for a sequence of `length` tokens and a block of at most `target`.

    The block is a multiple of 128 that divides the padded length. Among them this takes the one with the
    least padded work, counting each block's fixed cost as 128 tokens: 4429 tokens with a target of 1024
    pad to 4480 in blocks of 640 (1.2% padding), not to 5120 in blocks of 1024 (16%).
    """
    best = None
    for block in range(LANES, max(target, LANES) + 1, LANES):
        padded = -(-length // block) * block
        cost = padded * (1 + LANES / block)
        if best is None or cost < best[0]:
            best = (cost, padded, block)
    return best[1], best[2]


def _splash_kernel(q_len: int, kv_len: int, heads: int, blocks: tuple, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bkv, bkv_compute = blocks
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv_compute,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv_compute,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(heads)])
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, *, blocks: BlockTargets, interpret: bool):
    """Splash attention over (B, L, N, K) arrays on one device: pad, mask the padding, slice it off."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, l, n, d = q.shape
    s = k.shape[1]
    lp, bq = padded_blocks(l, blocks.q)
    sp, bkv = padded_blocks(s, blocks.kv)
    bkv_compute = math.gcd(bkv, blocks.kv_compute)
    kernel = _splash_kernel(lp, sp, n, (bq, bkv, bkv_compute), interpret)
    scale = 1.0 / math.sqrt(d)

    def heads_first(x, pad):
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))

    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype), lp - l)
    kh, vh = heads_first(k, sp - s), heads_first(v, sp - s)
    seg = sk.SegmentIds(
        q=jnp.broadcast_to((jnp.arange(lp) < l).astype(jnp.int32), (b, lp)),
        kv=jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (b, sp)),
    )
    out = jax.vmap(kernel)(qh, kh, vh, seg)
    return out[:, :, :l].transpose(0, 2, 1, 3)


def _splash(q, k, v, *, interpret: bool):
    """The splash kernel, inside `shard_map` over batch and heads when a mesh is set (`jax.set_mesh`)."""
    local = functools.partial(_splash_local, blocks=chip_blocks(), interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v)
    spec = _attention_spec(q.shape, k.shape, mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q, k, v
    )


def _attention_spec(q_shape, k_shape, mesh):
    """Batch over the rules' batch axes (data, fsdp) and heads over theirs (tensor); a batch those axes do
    not divide (one image with CFG on 8 chips) gives its axes to the heads instead, so every device still
    attends over a share of the work rather than all of it. Queries, keys and values share the spec."""
    from jax.sharding import PartitionSpec

    from sd3_jax.sharding.mesh import AXES, logical_to_spec

    if q_shape[0] != k_shape[0] or q_shape[2] != k_shape[2]:
        raise ValueError(f"attention: queries {q_shape} and keys {k_shape} differ in batch or heads")
    spec = logical_to_spec(("batch", None, "heads", None), q_shape, mesh)
    if spec[0] is None:
        axes = tuple(a for a in AXES if mesh.shape.get(a, 1) > 1)
        if axes and q_shape[2] % math.prod(mesh.shape[a] for a in axes) == 0:
            spec = PartitionSpec(None, None, axes, None)
    return spec
