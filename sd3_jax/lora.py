"""Low-rank adapters (LoRA, Hu et al. 2021) on the MMDiT's dense projections.

An adapter on a kernel W (in axes..., out axes...) is a pair a (in..., r), b (r, out...); the network then
uses W + s * (alpha / r) * a b (Hu et al. 2021, eq. (3), h = W0 x + B A x, with the alpha / r scaling of
their sec. 4.1), s the strength it is applied at. Adapters on scanned blocks carry the same leading layer
axis as the base kernels, so an adapter tree mirrors the params tree:
`lora.params["blocks_0"]["attn"]["to_q"] = {"a", "b"}`.

Adapters are applied in weight space by `apply_lora`, a pure function of (base params, adapters) usable
inside jit: sampling with several adapters at chosen strengths never touches the stored base. Training
differentiates through it with the base frozen (only the adapter tree is in the optimizer state).
`merge`/`unmerge` fold an adapter into host (numpy) params and take it out again bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]
MergeResidual = dict[Path, tuple[np.ndarray, np.ndarray]]  # module path -> (flat indices, exact base values)

DEFAULT_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "fc1",
    "fc2",
)
# Kernels contract one input axis, except the attention output projections, which contract (heads, kv).
N_IN = {"to_out": 2, "to_add_out": 2}
CONV_MODULES = {("pos_embed",)}  # convolution kernels: no LoRA here


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16  # r, the inner width of a b
    alpha: float = 16.0  # the update is scaled by alpha / rank (peft's lora_alpha)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-path suffixes, e.g. "to_q", "ff_context/fc1"
    init: str = "kaiming"  # a's init: "kaiming" (peft's default) or "gaussian" (N(0, 1/r^2))

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig: rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig: alpha must be a finite number, got {self.alpha}")
        if not self.targets:
            raise ValueError("LoraConfig: targets is empty")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoraConfig: init must be kaiming or gaussian, got {self.init!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@flax.struct.dataclass
class Lora:
    """An adapter: trainable factors `params` and the static multiplier alpha / r they are applied with."""

    params: Any  # nested dict, module path -> {"a": (layers?, in..., r), "b": (layers?, r, out...)}
    scaling: float = flax.struct.field(pytree_node=False, default=1.0)  # alpha / rank

    def modules(self) -> list[Path]:
        return [p for p, _ in adapter_modules(self.params)]


# ---------------------------------------------------------------------------------------------------------
# Trees.


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _replace(tree: Mapping[str, Any], path: Path, value: Any) -> dict[str, Any]:
    """A copy of `tree` with `path` set to `value`, copying only the dicts along the path."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def adapter_modules(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """(module path, {"a", "b"}) for every adapted module of an adapter tree."""
    if isinstance(tree, Mapping) and set(tree) == {"a", "b"}:
        yield prefix, tree
        return
    for k in sorted(tree):
        yield from adapter_modules(tree[k], prefix + (k,))


def kernel_modules(params: Mapping[str, Any], prefix: Path = ()) -> Iterator[Path]:
    """Paths of the modules of a params tree that hold a `kernel`."""
    for k in sorted(params):
        v = params[k]
        if isinstance(v, Mapping):
            if "kernel" in v and not isinstance(v["kernel"], Mapping):
                yield prefix + (k,)
            yield from kernel_modules(v, prefix + (k,))


def layout(path: Path) -> tuple[int, int]:
    """(leading layer axes, contracted input axes) of the kernel at module `path`."""
    return (1 if path[0].startswith("blocks_") else 0), N_IN.get(path[-1], 1)


def _matches(path: Path, target: str) -> bool:
    parts = tuple(p for p in re.split(r"[./]", target) if p)
    return bool(parts) and path[-len(parts) :] == parts


@functools.cache
def _mmdit_modules() -> tuple[Path, ...]:
    """The dense modules of an MMDiT with every block kind (joint, MMDiT-X dual, context-pre-only)."""
    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.nn.mmdit import MMDiTConfig

    return tuple(kernel_modules(abstract_params(MMDiTConfig.tiny(depth=2, dual_attention_layers=(0,)))))


def lora_targets(base_params: Mapping[str, Any], targets: Sequence[str]) -> list[Path]:
    """The module paths the targets select.

    A target naming a module this config lacks but other MMDiTs have (to_add_out on a one-block model,
    attn2 without MMDiT-X blocks) selects nothing; one naming no MMDiT module at all raises, as does a
    selection that comes out empty.
    """
    modules = [p for p in kernel_modules(base_params) if p not in CONV_MODULES]
    chosen, unknown = [], []
    for t in targets:
        hits = [p for p in modules if _matches(p, t)]
        if not hits and not any(_matches(p, t) for p in _mmdit_modules() if p not in CONV_MODULES):
            unknown.append(t)
        chosen += [p for p in hits if p not in chosen]
    if unknown or not chosen:
        names = sorted({"/".join(p[1:] if p[0].startswith("blocks_") else p) for p in modules})
        what = (
            f"LoRA targets {unknown} match no dense module"
            if unknown
            else f"LoRA targets {list(targets)} select nothing"
        )
        raise ValueError(f"{what}; modules are: {', '.join(names)}")
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------------
# Creating and applying adapters.


def init_lora(key: jax.Array, base_params: Mapping[str, Any], cfg: LoraConfig) -> Lora:
    """A fresh adapter on the targeted kernels: a random as peft draws lora_A, b zeros (W is unchanged).

    peft's default is torch's kaiming_uniform_(a=sqrt(5)) on lora_A (r, fan_in), i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in)); "gaussian" is N(0, 1/r^2). All a's come from one draw (one random kernel to compile).
    `base_params` may hold arrays or ShapeDtypeStructs (only shapes and dtypes are read).
    """
    specs = []
    for path in lora_targets(base_params, cfg.targets):
        kernel = _get(base_params, path)["kernel"]
        n_lead, n_in = layout(path)
        lead, ins = kernel.shape[:n_lead], kernel.shape[n_lead : n_lead + n_in]
        shape_b = (*lead, cfg.rank, *kernel.shape[n_lead + n_in :])
        specs.append((path, kernel, math.prod(ins), (*lead, *ins, cfg.rank), shape_b))
    total = sum(math.prod(s[3]) for s in specs)
    if cfg.init == "kaiming":
        draw = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    else:
        draw = jax.random.normal(key, (total,), jnp.float32) / cfg.rank
    params: dict[str, Any] = {}
    offset = 0
    for path, kernel, fan_in, shape_a, shape_b in specs:
        n = math.prod(shape_a)
        a = draw[offset : offset + n].reshape(shape_a)
        offset += n
        if cfg.init == "kaiming":
            a = a / math.sqrt(fan_in)
        _set(params, path, {"a": a.astype(kernel.dtype), "b": jnp.zeros(shape_b, kernel.dtype)})
    return Lora(params=params, scaling=cfg.scaling)


def _factor_shapes(a_shape, b_shape, kernel_shape, what: str) -> tuple[int, tuple, tuple, tuple]:
    n_lead = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
    lead, ins, outs = tuple(a_shape[:n_lead]), tuple(a_shape[n_lead:-1]), tuple(b_shape[n_lead + 1 :])
    ok = n_lead >= 0 and tuple(b_shape[:n_lead]) == lead and a_shape[-1] == b_shape[n_lead]
    if not ok or (*lead, *ins, *outs) != tuple(kernel_shape):
        raise ValueError(
            f"LoRA {what}: a {tuple(a_shape)} and b {tuple(b_shape)} do not fit kernel {tuple(kernel_shape)}"
        )
    return n_lead, lead, ins, outs


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: Sequence[int], what: str = "") -> jax.Array:
    """The float32 update a b, shaped like the kernel (contracting the rank axis, batched over layers)."""
    n_lead, lead, ins, outs = _factor_shapes(a.shape, b.shape, kernel_shape, what)
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(ins), r)
    b2 = b.astype(jnp.float32).reshape(*lead, r, math.prod(outs))
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(tuple(kernel_shape))


def apply_lora(base: Mapping[str, Any], adapters: Sequence[tuple[Lora, Any]]) -> dict[str, Any]:
    """Effective params W + sum_i s_i (alpha_i / r_i) a_i b_i over (adapter, strength s_i) pairs.

    Pure and jittable (strengths may be traced scalars); the sum is taken in float32 and cast once to each
    kernel's dtype. `base` is not modified.
    """
    deltas: dict[Path, jax.Array] = {}
    for lora, strength in adapters:
        for path, ab in adapter_modules(lora.params):
            try:
                kernel = _get(base, path)["kernel"]
            except (KeyError, TypeError):
                raise ValueError(f"LoRA module {'/'.join(path)} has no kernel in the base params") from None
            d = lora_delta(ab["a"], ab["b"], kernel.shape, "/".join(path)) * (strength * lora.scaling)
            deltas[path] = deltas[path] + d if path in deltas else d
    out = dict(base)
    for path, d in deltas.items():
        kernel = _get(base, path)["kernel"]
        out = _replace(out, path + ("kernel",), (kernel.astype(jnp.float32) + d).astype(kernel.dtype))
    return out


# ---------------------------------------------------------------------------------------------------------
# Merging into host params, exactly undoable.


def _delta_np(ab: Mapping[str, Any], kernel: np.ndarray, multiplier: float, what: str) -> np.ndarray:
    """multiplier * a b in float64, cast to the kernel's dtype: the same bits for the same inputs."""
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
    _, lead, ins, outs = _factor_shapes(a.shape, b.shape, kernel.shape, what)
    r = a.shape[-1]
    d = np.matmul(a.reshape(*lead, -1, r), b.reshape(*lead, r, -1)).reshape(kernel.shape)
    return (multiplier * d).astype(kernel.dtype)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def merge(base: Mapping[str, Any], lora: Lora, strength: float = 1.0) -> tuple[dict[str, Any], MergeResidual]:
    """Folds `strength * lora` into host copies of the kernels: M = fl(W + D), D = fl(s (alpha/r) a b).

    Floating-point addition loses the low bits of W wherever they fall below M's precision, so no function
    of (M, D) alone gives W back. The residual keeps exactly what is lost: the flat indices where
    fl(M - D) differs from W bit for bit, and W's values there (a few percent of the entries for a typical
    update, growing with |D| / |W|). `unmerge(M, lora, strength, residual)` is then W bit for bit.
    """
    merged: dict[str, Any] = dict(base)
    residual: MergeResidual = {}
    for path, ab in adapter_modules(lora.params):
        w = np.asarray(_get(base, path)["kernel"])
        d = _delta_np(ab, w, strength * lora.scaling, "/".join(path))
        m = (w + d).astype(w.dtype)
        back = (m - d).astype(w.dtype)
        idx = np.flatnonzero(_bits(back) != _bits(w))
        residual[path] = (idx, w.reshape(-1)[idx].copy())
        merged = _replace(merged, path + ("kernel",), m)
    return merged, residual


def unmerge(
    merged: Mapping[str, Any], lora: Lora, strength: float = 1.0, residual: MergeResidual | None = None
) -> dict[str, Any]:
    """Takes `strength * lora` out of merged params: fl(M - D), corrected by `merge`'s residual.

    With the residual the result is the pre-merge params bit for bit; without it, within a rounding of M.
    """
    out: dict[str, Any] = dict(merged)
    for path, ab in adapter_modules(lora.params):
        m = np.asarray(_get(merged, path)["kernel"])
        d = _delta_np(ab, m, strength * lora.scaling, "/".join(path))
        w = (m - d).astype(m.dtype)
        if residual is not None:
            if path not in residual:
                raise KeyError(f"unmerge: the residual has no entry for {'/'.join(path)}")
            idx, values = residual[path]
            w.reshape(-1)[idx] = values
        out = _replace(out, path + ("kernel",), w)
    return out


# ---------------------------------------------------------------------------------------------------------
# Training: the base frozen, only the adapter in the optimizer, sharded like the base.


def lora_mask(tree: Any) -> Any:
    """A bool tree like `tree`: True on the leaves inside `Lora` nodes (for `optax.multi_transform`)."""
    is_lora = lambda x: isinstance(x, Lora)
    return jax.tree.map(
        lambda x: jax.tree.map(lambda _: True, x) if is_lora(x) else False, tree, is_leaf=is_lora
    )


def lora_logical_names(lora: Lora, boxed_base: Mapping[str, Any]) -> Lora:
    """The adapter with each leaf boxed in `nn.LogicallyPartitioned`, named after its base kernel.

    a takes the kernel's layer and input names and an unsharded rank axis, b the layer and output names:
    for to_q (layers, embed, heads, kv), a is (layers, embed, None) and b (layers, None, heads, kv).
    """
    params: dict[str, Any] = {}
    for path, ab in adapter_modules(lora.params):
        kernel = _get(boxed_base, path)["kernel"]
        names = tuple(kernel.names) if isinstance(kernel, nn.LogicallyPartitioned) else (None,) * kernel.ndim
        n_lead = ab["a"].ndim + ab["b"].ndim - 2 - len(names)
        n_in = ab["a"].ndim - 1 - n_lead
        a_names = names[: n_lead + n_in] + (None,)
        b_names = names[:n_lead] + (None,) + names[n_lead + n_in :]
        _set(
            params,
            path,
            {"a": nn.LogicallyPartitioned(ab["a"], a_names), "b": nn.LogicallyPartitioned(ab["b"], b_names)},
        )
    return Lora(params=params, scaling=lora.scaling)
