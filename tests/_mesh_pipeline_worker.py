"""Run by test_pipeline.py with 2 virtual CPU devices: loads a checkpoint sharded on a mesh and samples."""

import json
import sys

import jax
import numpy as np

from sd3_jax.pipeline import SD3Pipeline
from sd3_jax.sharding.mesh import MeshConfig, make_mesh

ckpt, latents_path, out = sys.argv[1:]
mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1))
pipe = SD3Pipeline.load(ckpt, mesh=mesh)
kernel = pipe.transformer_params["blocks_0"]["ff"]["fc1"]["kernel"]
images = pipe.generate(
    ["a photo of a cat"],
    height=8,
    width=8,
    steps=2,
    latents=np.load(latents_path),
    output="float",
    progress=False,
)
np.save(out, images)
print(
    json.dumps(
        {
            "spec": [s if s is None or isinstance(s, str) else list(s) for s in kernel.sharding.spec],
            "devices": len(kernel.sharding.device_set),
            "local": list(kernel.addressable_shards[0].data.shape),
            "global": list(kernel.shape),
            "n": jax.device_count(),
        }
    )
)
