"""FLOP counts of the MMDiT, for MFU (model FLOPs over device peak)."""

from __future__ import annotations

from sd3_jax.nn.mmdit import MMDiTConfig

# Dense bf16 peak FLOP/s per device by jax device_kind (vendor datasheets, no sparsity).
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v5": 459e12,  # jax's device_kind for v5p (after "TPU v5 lite", which it also prefixes)
}


def mmdit_forward_flops(
    cfg: MMDiTConfig, latent_h: int, latent_w: int, text_len: int, batch: int = 1
) -> float:
    """Matmul FLOPs (2 per multiply-add) of one MMDiT forward.

    Counts projections, MLPs, attention scores and values, embeddings and the final layer; ignores
    norms, softmax and elementwise work (under 1%).
    """
    d, p = cfg.width, cfg.patch_size
    n_img = (latent_h // p) * (latent_w // p)
    n_txt = text_len
    n_all = n_img + n_txt
    f = int(d * cfg.mlp_ratio)
    total = 0.0
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        dual = i in cfg.dual_attention_layers
        # adaLN modulations act on one vector per example.
        total += 2 * d * d * ((9 if dual else 6) + (2 if last else 6))
        total += 2 * n_img * d * 3 * d + 2 * n_txt * d * 3 * d  # q, k, v of both streams
        total += 2 * 2 * n_all * n_all * d  # scores and weighted values over the joint sequence
        total += 2 * n_img * d * d + (0 if last else 2 * n_txt * d * d)  # output projections
        total += 2 * n_img * 2 * d * f + (0 if last else 2 * n_txt * 2 * d * f)  # MLPs
        if dual:
            total += 2 * n_img * d * 4 * d + 2 * 2 * n_img * n_img * d
    total += 2 * n_img * p * p * cfg.in_channels * d  # patch embedding
    total += 2 * n_txt * cfg.context_dim * d  # context embedder
    total += 2 * (256 * d + d * d + cfg.pooled_dim * d + d * d)  # timestep and pooled MLPs
    total += 2 * d * 2 * d + 2 * n_img * d * p * p * cfg.out_channels  # final modulation and projection
    return total * batch


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where unknown (CPUs)."""
    for k, v in PEAK_BF16.items():
        if device_kind.startswith(k):
            return v
    return None
