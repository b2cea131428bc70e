"""Run by test_train.py in a subprocess with 8 virtual CPU devices: trains on several meshes, dumps JSON."""

import json
import sys

import jax

from sd3_jax.train.config import apply_overrides, load_config
from sd3_jax.train.loop import train
from sd3_jax.train.report import read_metrics

out, workroot, *meshes = sys.argv[1:]
results = {}
for spec in meshes:
    cfg = apply_overrides(
        load_config("experiments/smoke.py"),
        [
            "steps=6",
            "checkpoint_every=100",
            "eval_every=0",
            "model.num_heads=4",
            "model.head_dim=8",
            *[f"mesh.{kv}" for kv in spec.split(",")],
        ],
    )
    state = train(cfg, f"{workroot}/{spec.replace(',', '_').replace('=', '')}", progress=False)
    losses = [
        m["loss"]
        for m in read_metrics(f"{workroot}/{spec.replace(',', '_').replace('=', '')}")
        if "loss" in m
    ]
    shard = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        name = jax.tree_util.keystr(path)
        shard[name] = {
            "spec": [s if s is None or isinstance(s, str) else list(s) for s in leaf.sharding.spec],
            "global": list(leaf.shape),
            "local": list(leaf.addressable_shards[0].data.shape),
        }
    mu = jax.tree.leaves(state.opt_state)
    results[spec] = {
        "losses": losses,
        "shardings": shard,
        "n_devices": len(state.params["proj_out"]["kernel"].sharding.device_set),
    }
with open(out, "w") as f:
    json.dump(results, f)
