"""The device mesh (axes data, fsdp, tensor) and shardings derived from logical axis names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sd3_jax.sharding.rules import LOGICAL_AXIS_RULES

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # pure data parallelism (params replicated)
    fsdp: int = -1  # data parallelism with params, grads and optimizer state sharded; -1: the rest
    tensor: int = 1  # tensor (model) parallelism over heads and MLP width
    num_devices: int = 0  # use the first N devices; 0: all devices of all processes

    def __post_init__(self):
        if self.num_devices < 0:
            raise ValueError(f"mesh.num_devices must be >= 0 (0: all devices), got {self.num_devices}")

    def sizes(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {self}")
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh: {n_devices} devices do not divide by {known} ({self})")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh: {self} needs {math.prod(sizes)} devices, have {n_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all devices (of all processes) with axes (data, fsdp, tensor)."""
    devices = list(devices if devices is not None else jax.devices())
    if cfg.num_devices:
        if cfg.num_devices > len(devices):
            raise ValueError(f"mesh: num_devices={cfg.num_devices} but only {len(devices)} devices")
        devices = devices[: cfg.num_devices]
    shape = cfg.sizes(len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU and odd topologies: a plain reshape is fine
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names`; a dim the mesh axes do not divide stays whole."""
    table = dict(rules)
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:  # a name the table lacks would silently leave its dimension whole on every device
        raise ValueError(f"logical axis names {unknown} are not in the rules table ({', '.join(table)})")
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % n:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def tree_shardings(boxed_abstract: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) abstract arrays.

    Leaves without logical names are replicated.
    """

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            names, shape = x.names, x.value.shape
        else:
            names, shape = (None,) * len(x.shape), x.shape
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> list[tuple[str, Any]]:
    """The rules filtered to axes this mesh has, for `nn.logical_axis_rules` around model calls."""
    out = []
    for name, axes in rules:
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes_t if a in mesh.shape and mesh.shape[a] > 1)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return out
