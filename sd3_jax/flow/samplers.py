"""Rectified-flow ODE samplers and the guidance wrappers (k-diffusion style, Stability's sd3_impls).

Two kinds of function appear here:

    model_fn(x, sigma, **cond) -> v        the network: x (B, H, W, C), sigma (B,) flow time in [0, 1],
                                           v the rectified-flow velocity eps - x0, so x0 = x - sigma v.
    velocity_fn(x, sigma, step) -> v       what the samplers call: the condition is bound, and `step` (an
                                           int32 scalar, the index i of sigmas[i]) lets guidance act on a
                                           window of steps (skip-layer guidance).

`with_cond(model_fn, **cond)` turns the first into the second; `cfg` and `skip_layer_cfg` wrap a model_fn
and return a velocity_fn. A plain analytic field `f(x, sigma)` becomes one by `lambda x, s, i: f(x, s)`.

Every sampler has the signature `sample_x(velocity_fn, x, sigmas, *, progress=None, after_step=None)`:
`sigmas` is a (n + 1,)
array running from the start level down to (usually) 0, `x` is the state at sigmas[0], the velocity function
is called once per step with sigma = sigmas[i] broadcast to (B,). The loop is a `jax.lax.fori_loop`, so a
jitted sampler compiles once per shape whatever the sigma values. `progress`, if given, is called with the
step index (a Python int) through `jax.debug.callback` after each step's model call (unordered: with a
progress bar, set its position from the index rather than counting calls). `after_step(x, i)`, if given,
maps the state at sigmas[i + 1] after each step (inpainting puts the known region back there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
VelocityFn = Callable[[Array, Array, Array], Array]
ModelFn = Callable[..., Array]
AfterStep = Callable[[Array, Array], Array]


def with_cond(model_fn: ModelFn, **cond: Any) -> VelocityFn:
    """Binds the condition of `model_fn(x, sigma, **cond)`: a sampler's `velocity_fn(x, sigma, step)`."""
    return lambda x, sigma, step: model_fn(x, sigma, **cond)


def _report(progress: Callable[[int], Any] | None, step: Array) -> None:
    if progress is not None:
        jax.debug.callback(lambda i: progress(int(i)), step)


def _after(after_step: AfterStep | None, x_next: Array, i: Array, x: Array) -> Array:
    """The next state in x's dtype, through `after_step` (which sees it in float32) where given."""
    return (x_next if after_step is None else after_step(x_next, i)).astype(x.dtype)


def _sigma_in(sigma: Array, x: Array) -> Array:
    return jnp.broadcast_to(sigma.astype(x.dtype), (x.shape[0],))


def sample_euler(
    velocity_fn: VelocityFn,
    x: Array,
    sigmas: Array,
    *,
    progress: Callable[[int], Any] | None = None,
    after_step: AfterStep | None = None,
) -> Array:
    """Euler steps of the flow ODE dx/dsigma = v(x, sigma): x <- x + (sigma_{i+1} - sigma_i) v.

    The update of diffusers' FlowMatchEulerDiscreteScheduler.step (in float32, cast back to x's dtype), and
    Algorithm 2 of Karras et al. 2022 (Stability's `sample_euler`) with d = (x - denoised) / sigma = v.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def body(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, _sigma_in(sigma, x), i)
        _report(progress, i)
        return _after(
            after_step, (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)), i, x
        )

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


def sample_dpmpp_2m(
    velocity_fn: VelocityFn,
    x: Array,
    sigmas: Array,
    *,
    progress: Callable[[int], Any] | None = None,
    after_step: AfterStep | None = None,
) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), as Stability's sd3_impls `sample_dpmpp_2m`.

    Written on the denoised prediction D = x - sigma v with t = -log(sigma), h = t_{i+1} - t_i:
        first step or sigma_{i+1} = 0:  x <- (sigma_{i+1} / sigma_i) x - expm1(-h) D_i
        otherwise, r = h_{i-1} / h:     x <- (sigma_{i+1} / sigma_i) x - expm1(-h) D'_i,
                                        D'_i = (1 + 1/(2r)) D_i - D_{i-1} / (2r)
    The final step to sigma = 0 gives x = D exactly. Coefficients are computed as in the reference
    (exp(-t_{i+1}) / exp(-t_i)); the sigma = 0 branch is selected without evaluating log(0).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    t_fn = lambda s: -jnp.log(s)
    sigma_fn = lambda t: jnp.exp(-t)

    def body(i, carry):
        x, old_denoised = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, _sigma_in(sigma, x), i)
        _report(progress, i)
        x32 = x.astype(jnp.float32)
        denoised = x32 - sigma * v.astype(jnp.float32)
        last = sigma_next == 0
        t, t_next = t_fn(sigma), t_fn(jnp.where(last, 1.0, sigma_next))
        h = t_next - t
        coef_x = jnp.where(last, 0.0, sigma_fn(t_next) / sigma_fn(t))
        coef_d = jnp.where(last, 1.0, -jnp.expm1(-h))
        first_order = (i == 0) | last
        h_last = t - t_fn(sigmas[jnp.maximum(i - 1, 0)])
        r = jnp.where(first_order, 1.0, h_last / jnp.where(first_order, 1.0, h))
        second = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        denoised_d = jnp.where(first_order, denoised, second)
        return _after(after_step, coef_x * x32 + coef_d * denoised_d, i, x), denoised

    init = (x, jnp.zeros(x.shape, jnp.float32))
    x, _ = jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, init)
    return x


SAMPLERS: dict[str, Callable[..., Array]] = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def inpaint_blend(x0: Array, noise: Array, mask: Array, sigmas: Array) -> AfterStep:
    """The `after_step` of inpainting (diffusers' StableDiffusion3InpaintPipeline with a 16-channel MMDiT):
    after the step to sigmas[i + 1], the latents outside the mask are the clean latents `x0` noised to that
    level with the run's own initial noise, x <- (1 - mask) scale_noise(x0, noise, sigma) + mask x; at the
    last step (sigma = 0) that is x0 itself. `mask` is 1 where the image is repainted, broadcast over x."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x0, noise, mask = (jnp.asarray(a, jnp.float32) for a in (x0, noise, mask))

    def after_step(x: Array, i: Array) -> Array:
        sigma = sigmas[i + 1]
        known = sigma * noise + (1.0 - sigma) * x0
        return (1 - mask) * known + mask * x

    return after_step


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------


def _concat(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda u, w: jnp.concatenate([u, w], axis=0), a, b)


def _cfg_outputs(model_fn: ModelFn, x: Array, sigma: Array, cond: dict, uncond: dict) -> tuple[Array, Array]:
    """One batched model call over [cond, uncond] (Stability's CFGDenoiser order), split back."""
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), **_concat(cond, uncond))
    return out[: x.shape[0]], out[x.shape[0] :]


def cfg(model_fn: ModelFn, scale: float, cond: dict, uncond: dict) -> VelocityFn:
    """Classifier-free guidance (Ho & Salimans 2021): v = v_u + scale (v_c - v_u).

    `cond` and `uncond` are the keyword arguments of `model_fn` (pytrees with batch-leading leaves of the
    same shapes); both halves run in one call of batch 2B, [cond, uncond] as Stability's CFGDenoiser
    (diffusers orders them [uncond, cond]; the result is the same). Guidance in velocity and in denoised
    space coincide, since denoised = x - sigma v is affine in v.
    """

    def velocity_fn(x: Array, sigma: Array, step: Array) -> Array:
        v_c, v_u = _cfg_outputs(model_fn, x, sigma, cond, uncond)
        return v_u + scale * (v_c - v_u)

    return velocity_fn


def slg_window(num_steps: int, start: float = 0.01, stop: float = 0.2) -> np.ndarray:
    """Steps where skip-layer guidance applies: `i > num_steps * start and i < num_steps * stop`.

    The test of diffusers' StableDiffusion3Pipeline (and Stability's SkipLayerCFGDenoiser), evaluated in
    Python float64 so the traced step only indexes this (num_steps,) bool table.
    """
    return np.array([i > num_steps * start and i < num_steps * stop for i in range(num_steps)], dtype=bool)


def skip_layer_cfg(
    model_fn: ModelFn,
    scale: float,
    cond: dict,
    uncond: dict,
    *,
    num_steps: int,
    skip_layers: Sequence[int] = (7, 8, 9),
    slg_scale: float = 2.8,
    start: float = 0.01,
    stop: float = 0.2,
) -> VelocityFn:
    """CFG plus skip-layer guidance (diffusers' StableDiffusion3Pipeline, Stability's SkipLayerCFGDenoiser).

    v = v_u + scale (v_c - v_u) + slg_scale (v_c - v_skip) on steps `slg_window(num_steps, start, stop)`,
    plain CFG elsewhere. v_skip is one extra call on the cond batch only,
    `model_fn(x, sigma, skip_layers=tuple(skip_layers), **cond)`, so `model_fn` must take `skip_layers` (a
    static tuple of block indices to skip). `num_steps` must be the sampler's len(sigmas) - 1. Outside the
    window the extra call is not run (`jax.lax.cond`). The defaults are diffusers' (layers 7, 8, 9 are the
    recommendation for SD3.5 Medium).
    """
    window = jnp.asarray(slg_window(num_steps, start, stop))
    layers = tuple(int(layer) for layer in skip_layers)

    def velocity_fn(x: Array, sigma: Array, step: Array) -> Array:
        v_c, v_u = _cfg_outputs(model_fn, x, sigma, cond, uncond)
        guided = v_u + scale * (v_c - v_u)
        if slg_scale == 0 or not layers:
            return guided

        def with_skip(guided):
            v_skip = model_fn(x, sigma, skip_layers=layers, **cond)
            return guided + slg_scale * (v_c - v_skip)

        return jax.lax.cond(window[step], with_skip, lambda g: g, guided)

    return velocity_fn
