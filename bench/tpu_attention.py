"""Which TPU attention kernel, on compiled evidence: splash vs Pallas flash vs XLA at SD3's joint length.

    python bench/tpu_attention.py [--out bench/results/tpu-attention.json]

Forward and backward of one attention (batch 2, 24 heads of 64, 4096 + 333 = 4429 tokens, bf16: one SD3
Medium CFG step at 1024 px) compiled for one chip of each TPU generation on this host. Both kernels get the
same padding (`padded_blocks`) and segment-id mask; splash with the chip's `CHIP_BLOCKS`, flash with square
blocks of the same size. The compiler's temporaries per chip are the evidence a CPU host can give (no
timing without a TPU); a kernel whose blocks overflow the chip's VMEM fails to compile here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from sd3_jax import plan  # noqa: E402
from sd3_jax.nn.attention import attention, chip_blocks, padded_blocks  # noqa: E402

CHIPS = {"v4:2x2x1": "TPU v4", "v5e:2x2": "TPU v5 lite", "v5p:2x2x1": "TPU v5", "v6e:2x2": "TPU v6 lite"}
B, L, N, K = 2, 4096 + 333, 24, 64


def _flash(q, k, v, blocks):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    lp, blk = padded_blocks(L, blocks.q)

    def pad(x):
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, lp - L), (0, 0)))

    seg = jnp.broadcast_to((jnp.arange(lp) < L).astype(jnp.int32), (B, lp))
    sizes = fa.BlockSizes(
        **{f: blk for f in ("block_q", "block_k_major", "block_k", "block_q_major_dkv", "block_k_major_dkv")},
        **{f: blk for f in ("block_k_dkv", "block_q_dkv", "block_k_major_dq", "block_k_dq", "block_q_dq")},
        block_b=1,
    )
    o = fa.flash_attention(
        pad(q),
        pad(k),
        pad(v),
        segment_ids=fa.SegmentIds(seg, seg),
        sm_scale=1 / math.sqrt(K),
        block_sizes=sizes,
    )
    return o[:, :, :L].transpose(0, 2, 1, 3)


def measure(topology: str) -> list[dict]:
    devices = plan.topology_devices(topology)[:1]
    mesh = Mesh(devices, ("x",))
    blocks = chip_blocks(devices[0].device_kind)
    x = jax.ShapeDtypeStruct((B, L, N, K), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    kernels = {
        "splash": lambda q, k, v: attention(q, k, v, backend="pallas"),
        "flash": lambda q, k, v: _flash(q, k, v, blocks),
        "xla": lambda q, k, v: attention(q, k, v, backend="xla"),
    }
    rows = []
    for name, f in kernels.items():
        loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32))
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        row = {
            "chip": devices[0].device_kind,
            "kernel": name,
            "blocks": [blocks.q, blocks.kv, blocks.kv_compute],
        }
        try:
            with jax.set_mesh(mesh):
                p = plan.analyse(name, fn, (x, x, x))
            row.update(temp_mib=round(p.temp / 2**20), kernel_calls=p.custom_calls, oom=p.oom or None)
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile for this chip is the finding
            row.update(error=str(e).strip().splitlines()[0][:200])
        rows.append(row)
        print(row, flush=True)
    return rows


def render(results_dir: str) -> list[str]:
    path = os.path.join(results_dir, "tpu-attention.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        doc = json.load(f)
    out = [
        "### Attention kernel: forward + backward at 4429 tokens (batch 2, 24 heads of 64, bf16)",
        "",
        "`bench/tpu_attention.py`: temporaries per chip from the compiled program (no timing without a TPU). "
        "Splash uses each chip's `CHIP_BLOCKS` (q / kv / kv-compute), flash square blocks of the q size.",
        "",
        "| chip | blocks | splash MiB | Pallas flash MiB | XLA MiB |",
        "|---|---|---|---|---|",
    ]
    by_chip: dict[str, dict] = {}
    for r in doc["results"]:
        by_chip.setdefault(r["chip"], {})[r["kernel"]] = r
    for chip, ks in by_chip.items():
        cell = lambda r: r.get("error", "fails") if "temp_mib" not in r else str(r["temp_mib"])
        blocks = "/".join(str(b) for b in ks["splash"]["blocks"])
        out.append(f"| {chip} | {blocks} | {cell(ks['splash'])} | {cell(ks['flash'])} | {cell(ks['xla'])} |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/tpu-attention.json")
    a = ap.parse_args()
    rows = [r for topology in CHIPS for r in measure(topology)]
    import importlib.metadata as md

    meta = {"jax": jax.__version__, "libtpu": md.version("libtpu")}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
