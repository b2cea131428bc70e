"""Rectified flow and the formulations it is compared with: schedules, losses, samplers, conditioning."""

from sd3_jax.flow.conditioning import DEFAULT_DROP_PROB, ENCODERS, drop_and_join, join_context, join_pooled
from sd3_jax.flow.losses import (
    EDM,
    FORMULATIONS,
    Cosine,
    LDMLinear,
    RectifiedFlow,
    as_velocity_fn,
    to_velocity,
)
from sd3_jax.flow.samplers import SAMPLERS, cfg, sample_dpmpp_2m, sample_euler, skip_layer_cfg, with_cond
from sd3_jax.flow.schedules import (
    cosmap,
    flow_match_sigmas,
    img2img_sigmas,
    logit_normal,
    mode,
    resolution_shift,
    sai_sigmas,
    scale_noise,
    shift_sigmas,
    uniform,
)

__all__ = [
    "DEFAULT_DROP_PROB",
    "EDM",
    "ENCODERS",
    "FORMULATIONS",
    "SAMPLERS",
    "Cosine",
    "LDMLinear",
    "RectifiedFlow",
    "as_velocity_fn",
    "cfg",
    "cosmap",
    "drop_and_join",
    "flow_match_sigmas",
    "img2img_sigmas",
    "join_context",
    "join_pooled",
    "logit_normal",
    "mode",
    "resolution_shift",
    "sai_sigmas",
    "sample_dpmpp_2m",
    "sample_euler",
    "scale_noise",
    "shift_sigmas",
    "skip_layer_cfg",
    "to_velocity",
    "uniform",
    "with_cond",
]
