"""Timestep densities for training, the SD3 timestep shift and the sampling sigma schedules.

Conventions: `t` (training) and `sigma` (sampling) are the same rectified-flow time in [0, 1], with
`z_t = (1 - t) x0 + t eps`; t = 1 is pure noise. The network sees `1000 * sigma`.

Each training density is split in two: a pure transform from the underlying draw (`u ~ U(0, 1)` or
`n ~ N(0, 1)`) to `t`, which the tests compare with diffusers' `compute_density_for_timestep_sampling`
on the same draws, and a sampler that draws from a `jax.random` key and applies the transform.

The sampling schedules (`flow_match_sigmas`, `sai_sigmas`) are host-side numpy float32 arrays of length
`steps + 1` ending in 0, as the references build them; pass them to the samplers as they are.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
WeightingScheme = Literal["sigma_sqrt", "cosmap", "none"]

# ---------------------------------------------------------------------------------------------
# Training timestep densities (Esser et al. 2024, sec. 3.1 "Tailored SNR samplers for RF models")
# ---------------------------------------------------------------------------------------------


def _open_uniform(key: Array, n: int, dtype=jnp.float32) -> Array:
    """u ~ U(0, 1) with 0 excluded (the smallest positive normal float stands in for it)."""
    return jax.random.uniform(key, (n,), dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0)


def uniform(key: Array, n: int, dtype=jnp.float32) -> Array:
    """Uniform timesteps t ~ U(0, 1), the density of plain rectified flow (sec. 3.1); shape (n,)."""
    return _open_uniform(key, n, dtype)


def logit_normal_transform(normal: Array, m: float = 0.0, s: float = 1.0) -> Array:
    """Logit-normal sampling t = sigmoid(m + s n), n ~ N(0, 1) (sec. 3.1, pi_ln(t; m, s)).

    Equals diffusers' `compute_density_for_timestep_sampling("logit_normal")` given the same standard normal
    draws (diffusers draws `N(m, s)` directly, i.e. `m + s n`).
    """
    return jax.nn.sigmoid(m + s * normal)


def logit_normal(key: Array, n: int, m: float = 0.0, s: float = 1.0, dtype=jnp.float32) -> Array:
    """Logit-normal timesteps, pi_ln(t; m, s) = 1/(s sqrt(2 pi)) 1/(t(1-t)) exp(-(logit t - m)^2 / (2 s^2)).

    sec. 3.1 of Esser et al. 2024; SD3 trains with m = 0, s = 1. Shape (n,), values in (0, 1).
    """
    return logit_normal_transform(jax.random.normal(key, (n,), dtype), m, s)


def mode_transform(u: Array, s: float = 1.29) -> Array:
    """Mode sampling with heavy tails, t = f_mode(u; s) = 1 - u - s (cos^2(pi/2 u) - 1 + u) (sec. 3.1).

    A valid density for -1 <= s <= 2/(pi - 2); s = 0 gives t = 1 - u (uniform). Equals diffusers'
    `compute_density_for_timestep_sampling("mode", mode_scale=s)` on the same uniform draws.
    """
    return 1.0 - u - s * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


def mode(key: Array, n: int, s: float = 1.29, dtype=jnp.float32) -> Array:
    """Mode-sampling timesteps t = f_mode(u; s), u ~ U(0, 1) (sec. 3.1); shape (n,)."""
    return mode_transform(_open_uniform(key, n, dtype), s)


def cosmap_transform(u: Array) -> Array:
    """CosMap, t = f(u) = 1 - 1/(tan(pi/2 u) + 1) (sec. 3.1), whose density is 2/(pi (1 - 2t + 2t^2)).

    diffusers' `compute_density_for_timestep_sampling` has no cosmap density (it falls back to uniform); the
    matching loss weight is `loss_weighting("cosmap", t)`.
    """
    return 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0)


def cosmap(key: Array, n: int, dtype=jnp.float32) -> Array:
    """CosMap timesteps t = 1 - 1/(tan(pi/2 u) + 1), u ~ U(0, 1) (sec. 3.1); shape (n,)."""
    return cosmap_transform(_open_uniform(key, n, dtype))


def loss_weighting(scheme: WeightingScheme, sigmas: Array) -> Array:
    """Per-example loss weights over t, as diffusers' `compute_loss_weighting_for_sd3`.

    "sigma_sqrt": sigma^-2; "cosmap": 2 / (pi (1 - 2 sigma + 2 sigma^2)), the CosMap density of sec. 3.1;
    "none": ones.
    """
    sigmas = jnp.asarray(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    if scheme == "none":
        return jnp.ones_like(sigmas)
    raise ValueError(f"unknown weighting scheme {scheme!r}; expected 'sigma_sqrt', 'cosmap' or 'none'")


# ---------------------------------------------------------------------------------------------
# Timestep shift (sec. 5.3.2 "Resolution-dependent shifting of timestep schedules")
# ---------------------------------------------------------------------------------------------


def shift_sigmas(sigmas, shift: float):
    """SD3 timestep shift, sigma' = alpha sigma / (1 + (alpha - 1) sigma) (sec. 5.3.2, alpha = `shift`).

    Works on numpy and jax arrays alike and keeps their dtype.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(num_pixels_or_tokens: float, base: float = 256 * 256) -> float:
    """Resolution-dependent shift alpha = sqrt(m / n) (sec. 5.3.2).

    `m` is the target resolution and `n` (`base`) the one the timestep schedule was tuned at, both counted in
    the same unit (pixels, latent pixels or tokens). The default base is 256^2 pixels, the paper's
    pre-training resolution; with it 1024^2 gives alpha = 4 (the paper settles on 3.0 at 1024^2 by human
    preference).
    """
    return math.sqrt(num_pixels_or_tokens / base)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' dynamic-shift mu: the line through (base_seq_len, base_shift), (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigmas, sigma: float = 1.0, kind: Literal["exponential", "linear"] = "exponential"):
    """diffusers' dynamic time shift: e^mu / (e^mu + (1/t - 1)^sigma) ("exponential") or mu / (mu + ...).

    With sigma = 1 the exponential form is the SD3 shift with alpha = e^mu.
    """
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** sigma)
    raise ValueError(f"unknown time shift {kind!r}; expected 'exponential' or 'linear'")


# ---------------------------------------------------------------------------------------------
# Sampling schedules
# ---------------------------------------------------------------------------------------------


def flow_match_sigmas(
    steps: int,
    shift: float = 3.0,
    *,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
    time_shift_type: Literal["exponential", "linear"] = "exponential",
) -> np.ndarray:
    """The (steps + 1,) sigmas of diffusers' `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps)`.

    Follows its computation order: the scheduler's 1000 training sigmas k/1000 are shifted once in float32
    (unless dynamic), the inference timesteps are a float64 linspace from 1000 sigma_max to 1000 sigma_min
    (that already-shifted sigma_min), divided by 1000 and shifted (again), cast to float32, and a 0 is
    appended. Passing `mu` selects `use_dynamic_shifting=True`: no shift at init and `time_shift(mu, .)` in
    place of the second shift.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = num_train_timesteps
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    if mu is None:
        train = shift_sigmas(train, np.float32(shift)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    if mu is None:
        sigmas = shift_sigmas(sigmas, shift)
    else:
        sigmas = time_shift(mu, sigmas, 1.0, time_shift_type)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def _torch_linspace_f32(start: np.float32, end: np.float32, steps: int) -> np.ndarray:
    """torch.linspace in float32 (ATen's CPU kernel): each half is stepped from its own end, with a fused
    multiply-add (emulated by one rounding of the exact float64 result)."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    idx = np.arange(steps)
    lo = np.float64(start) + step * idx
    hi = np.float64(end) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, lo, hi).astype(np.float32)


def sai_sigmas(steps: int, shift: float = 3.0) -> np.ndarray:
    """The (steps + 1,) sigmas of Stability's sd3_infer `get_sigmas` over `ModelSamplingDiscreteFlow(shift)`.

    sd3_impls: the 1000 training sigmas are shift(k/1000), k = 1..1000, in float32; the schedule is a float32
    torch.linspace from timestep(sigma_max) = 1000 sigma_max to 1000 sigma_min, each mapped through
    sigma(ts) = shift(ts/1000), then 0 is appended. Same formula as `flow_match_sigmas` (it shifts twice as
    well) with float32 instead of float64 intermediates; the two agree to ~1e-7.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shift32 = np.float32(shift)

    def sigma(ts: np.ndarray) -> np.ndarray:
        ts = (ts / np.float32(1000.0)).astype(np.float32)
        if shift == 1.0:
            return ts
        return (shift32 * ts / (np.float32(1) + (shift32 - np.float32(1)) * ts)).astype(np.float32)

    table = sigma(np.arange(1, 1001, dtype=np.float32))
    start, end = table[-1] * np.float32(1000), table[0] * np.float32(1000)
    sigmas = sigma(_torch_linspace_f32(start, end, steps))
    return np.append(sigmas, np.float32(0.0))


# ---------------------------------------------------------------------------------------------
# img2img
# ---------------------------------------------------------------------------------------------


def img2img_sigmas(sigmas, strength: float):
    """The tail of `sigmas` an img2img run samples over, as diffusers' StableDiffusion3Img2ImgPipeline.

    With n = len(sigmas) - 1 steps: init_timestep = min(n * strength, n), t_start = int(max(n - init_timestep,
    0)); returns sigmas[t_start:], whose first entry is the level the image is noised to (`scale_noise`), so
    the run has n - t_start steps.
    """
    n = len(sigmas) - 1
    init_timestep = min(n * strength, n)
    t_start = int(max(n - init_timestep, 0))
    if n - t_start < 1:
        raise ValueError(f"strength {strength} leaves no sampling step out of {n}")
    return sigmas[t_start:]


def scale_noise(x0: Array, noise: Array, sigma) -> Array:
    """Noise a clean latent to flow time sigma, x = sigma noise + (1 - sigma) x0 (diffusers `scale_noise`).

    The rectified-flow forward process of sec. 3; `sigma` is a scalar or per-example (B,).
    """
    sigma = jnp.asarray(sigma, x0.dtype)
    sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
    return sigma * noise + (1.0 - sigma) * x0
