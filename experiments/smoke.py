"""Smoke run: the tiny MMDiT on synthetic latents, under a minute on CPU.

    sd3-jax train --config experiments/smoke.py --workdir /tmp/smoke [--set steps=20 --set mesh.fsdp=4]

Result (2-core CPU, 2026-12-01): 40 steps in about 25 s including compilation, loss falling from about
3.0 to 2.0.
"""

from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.sharding.mesh import MeshConfig
from sd3_jax.train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=MMDiTConfig.tiny(context_dim=16, pooled_dim=16, in_channels=4, out_channels=4),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=5, clip_norm=1.0),
        data=DataConfig(
            kind="synthetic",
            num_examples=128,
            latent_size=8,
            text_len=4,
            clip_l_dim=8,
            clip_g_dim=8,
            t5_len=4,
            val_examples=16,
        ),
        batch_size=8,
        steps=40,
        ema_decay=0.99,
        compute_dtype="float32",
        checkpoint_every=20,
        log_every=10,
        eval_every=20,
    )
