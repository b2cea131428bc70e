"""Samplers and guidance: parity with diffusers' FlowMatchEulerDiscreteScheduler loop and a transcription of
Stability's sd3_impls `sample_dpmpp_2m`, closed-form flows, CFG and skip-layer guidance, compile-once.

All in float32; the parity tolerance is max|ours - ref| <= 1e-5 max|ref| (`assert_close_rel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close_rel

from sd3_jax.flow import samplers, schedules

SHAPE = (2, 4, 4, 3)  # (B, H, W, C)


def _x(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# A nonlinear, sigma-dependent analytic field, written once for each framework.
def _field_jax(x, sigma):
    s = sigma[:, None, None, None]
    return jnp.tanh(x) * (1.0 + s) - 0.5 * x * s + 0.3 * s**2


def _field_torch(x, sigma):
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (1.0 + s) - 0.5 * x * s + 0.3 * s**2


def _plain(field):
    return lambda x, sigma, step: field(x, sigma)


def test_euler_matches_diffusers_scheduler_loop():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 28
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    x = torch.from_numpy(_x())
    for i, t in enumerate(sched.timesteps):
        v = _field_torch(x, sched.sigmas[i].expand(x.shape[0]))
        x = sched.step(v, t, x, return_dict=False)[0]
    ours = samplers.sample_euler(_plain(_field_jax), jnp.asarray(_x()), schedules.flow_match_sigmas(steps))
    assert_close_rel(ours, x.numpy(), 1e-5, "euler vs diffusers")
    assert np.abs(x.numpy() - _x()).max() > 0.1  # the field moved the state


def _sai_sample_dpmpp_2m(model, x, sigmas, extra_args=None):
    """Transcription of Stability-AI/sd3.5 sd3_impls.py `sample_dpmpp_2m` (tqdm and autocast dropped)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()
    t_fn = lambda sigma: sigma.log().neg()
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def _sai_denoiser(x, sigma):
    """sd3_impls BaseModel.apply_model: denoised = x - sigma * model_output (calculate_denoised)."""
    return x - sigma.reshape(-1, 1, 1, 1) * _field_torch(x, sigma)


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_dpmpp_2m_matches_stability(steps):
    sigmas = schedules.sai_sigmas(steps, 3.0)
    ref = _sai_sample_dpmpp_2m(_sai_denoiser, torch.from_numpy(_x(1)), torch.from_numpy(sigmas)).numpy()
    ours = samplers.sample_dpmpp_2m(_plain(_field_jax), jnp.asarray(_x(1)), sigmas)
    assert_close_rel(ours, ref, 1e-5, "dpmpp_2m vs sd3_impls")


def test_dpmpp_2m_without_terminal_zero_matches_stability():
    """A schedule that stops short of 0 takes the second-order update on its last step too."""
    sigmas = schedules.sai_sigmas(12, 3.0)[:-1]
    ref = _sai_sample_dpmpp_2m(_sai_denoiser, torch.from_numpy(_x(2)), torch.from_numpy(sigmas)).numpy()
    ours = samplers.sample_dpmpp_2m(_plain(_field_jax), jnp.asarray(_x(2)), sigmas)
    assert_close_rel(ours, ref, 1e-5, "dpmpp_2m (no terminal 0) vs sd3_impls")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_single_data_point_flow_is_exact(sampler):
    """With one data point x*, v = (x - x*) / sigma, and both samplers land on x* for any schedule."""
    x_star = jnp.asarray(_x(3))
    fn = lambda x, sigma, step: (x - x_star) / sigma[:, None, None, None]
    for sigmas in (np.array([1.0, 0.0], np.float32), schedules.flow_match_sigmas(7)):
        out = samplers.SAMPLERS[sampler](fn, jnp.asarray(_x(4)), sigmas)
        np.testing.assert_allclose(np.asarray(out), np.asarray(x_star), atol=1e-5)


def _gaussian_velocity(mu, s):
    """Exact flow of x0 ~ N(mu, s^2) (per element), eps ~ N(0, 1), z = (1 - t) x0 + t eps.

    z ~ N((1 - t) mu, V), V = (1 - t)^2 s^2 + t^2; E[x0 | z] = mu + (1 - t) s^2 (z - (1 - t) mu) / V,
    E[eps | z] = t (z - (1 - t) mu) / V; v = E[eps - x0 | z].
    """

    def fn(x, sigma, step):
        t = sigma[:, None, None, None]
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t * r / var - (mu + (1 - t) * s**2 * r / var)

    return fn


@pytest.mark.parametrize(
    "sampler,steps,tol,order", [("euler", 100, 0.03, (1.8, 2.2)), ("dpmpp_2m", 100, 8e-3, (3.5, 8.0))]
)
def test_gaussian_data_converges_to_exact_transport(sampler, steps, tol, order):
    """The 1-D flow between Gaussians is monotone, so noise x1 must map to mu + s x1 (and moments to (mu, s)).

    Over the SD3 schedule (shift 3) the max error at 2n steps is below `tol` and doubling the steps divides it
    by about 2 (Euler, first order) or 4 and more (DPM-Solver++(2M), second order).
    """
    mu, s = 0.7, 0.4
    x1 = jnp.asarray(_x(5, (2000, 2, 2, 1)))
    exact = mu + s * np.asarray(x1)
    errs = []
    for n in (steps, 2 * steps):
        sigmas = schedules.flow_match_sigmas(n)
        out = np.asarray(samplers.SAMPLERS[sampler](_gaussian_velocity(mu, s), x1, sigmas))
        errs.append(np.abs(out - exact).max())
    assert errs[1] < tol, errs
    assert order[0] < errs[0] / errs[1] < order[1], errs
    assert abs(out.mean() - mu) < 0.02 and abs(out.std() - s) < 0.02


# ------------------------------------------------------------------------------------------- guidance


def _cond_model(calls):
    """model_fn(x, sigma, ctx, pooled, skip_layers=()), whose output changes when layers are skipped."""

    def model_fn(x, sigma, *, ctx, pooled, skip_layers=()):
        calls.append((x.shape[0], tuple(skip_layers)))
        s = sigma[:, None, None, None]
        v = jnp.tanh(x * ctx[:, None, None, :]) * (1 + s) + pooled[:, None, None, None] * s
        if skip_layers:
            v = v * (1.0 - 0.1 * len(skip_layers)) + 0.05
        return v

    return model_fn


def _conds():
    rng = np.random.default_rng(6)
    c = {"ctx": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32), "pooled": jnp.array([0.5, -1.0])}
    u = {"ctx": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32), "pooled": jnp.array([0.0, 0.2])}
    return c, u


def test_cfg_is_one_batched_call_and_the_formula():
    calls = []
    model_fn = _cond_model(calls)
    cond, uncond = _conds()
    x, sigma = jnp.asarray(_x(7)), jnp.array([0.6, 0.6])
    v = samplers.cfg(model_fn, 4.5, cond, uncond)(x, sigma, jnp.int32(0))
    assert calls == [(4, ())]  # one call over [cond, uncond]
    v_c, v_u = model_fn(x, sigma, **cond), model_fn(x, sigma, **uncond)
    np.testing.assert_allclose(np.asarray(v), np.asarray(v_u + 4.5 * (v_c - v_u)), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(v - v_c)).max() > 0.1  # guidance changed the output


def test_slg_window_is_diffusers_test():
    for n, start, stop in [(10, 0.1, 0.5), (28, 0.01, 0.2), (40, 0.01, 0.2), (7, 0.0, 1.0)]:
        want = [i > n * start and i < n * stop for i in range(n)]
        np.testing.assert_array_equal(samplers.slg_window(n, start, stop), want)
    np.testing.assert_array_equal(np.nonzero(samplers.slg_window(10, 0.1, 0.5))[0], [2, 3, 4])
    np.testing.assert_array_equal(np.nonzero(samplers.slg_window(28))[0], [1, 2, 3, 4, 5])


def _diffusers_slg_loop(model_fn, x, sigmas, cond, uncond, scale, layers, slg_scale, start, stop):
    """The guidance of diffusers' StableDiffusion3Pipeline.__call__ around an Euler step, in numpy."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma = np.full((x.shape[0],), sigmas[i], np.float32)
        v_t = np.asarray(model_fn(jnp.asarray(x), jnp.asarray(sigma), **cond))
        v_u = np.asarray(model_fn(jnp.asarray(x), jnp.asarray(sigma), **uncond))
        noise_pred = v_u + scale * (v_t - v_u)
        if i > n * start and i < n * stop:
            v_skip = np.asarray(model_fn(jnp.asarray(x), jnp.asarray(sigma), skip_layers=layers, **cond))
            noise_pred = noise_pred + (v_t - v_skip) * slg_scale
        x = x + (sigmas[i + 1] - sigmas[i]) * noise_pred
    return x


def test_skip_layer_guidance_matches_diffusers_formula():
    calls = []
    model_fn = _cond_model(calls)
    cond, uncond = _conds()
    n, start, stop, layers = 10, 0.1, 0.5, (7, 8, 9)
    sigmas = schedules.flow_match_sigmas(n)
    fn = samplers.skip_layer_cfg(
        model_fn, 5.0, cond, uncond, num_steps=n, skip_layers=layers, slg_scale=2.8, start=start, stop=stop
    )
    ours = jax.jit(lambda x: samplers.sample_euler(fn, x, sigmas))(jnp.asarray(_x(8)))
    ref = _diffusers_slg_loop(model_fn, _x(8), sigmas, cond, uncond, 5.0, layers, 2.8, start, stop)
    assert_close_rel(ours, ref, 1e-5, "skip-layer guidance vs diffusers")
    assert (2, layers) in calls  # the skip call runs on the cond batch only
    plain = samplers.sample_euler(samplers.cfg(model_fn, 5.0, cond, uncond), jnp.asarray(_x(8)), sigmas)
    assert np.abs(np.asarray(ours) - np.asarray(plain)).max() > 1e-3  # and it matters


def test_skip_layer_guidance_outside_window_is_cfg():
    model_fn = _cond_model([])
    cond, uncond = _conds()
    sigmas = schedules.flow_match_sigmas(6)
    fn = samplers.skip_layer_cfg(model_fn, 3.0, cond, uncond, num_steps=6, start=0.9, stop=0.95)
    ours = samplers.sample_euler(fn, jnp.asarray(_x(9)), sigmas)
    plain = samplers.sample_euler(samplers.cfg(model_fn, 3.0, cond, uncond), jnp.asarray(_x(9)), sigmas)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))


# ------------------------------------------------------------------------------------------- jit, progress


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_jit_compiles_once_per_shape(sampler):
    traces = {"sample": 0, "velocity": 0}

    def fn(x, sigma, step):
        traces["velocity"] += 1
        return _field_jax(x, sigma)

    @jax.jit
    def run(x, sigmas):
        traces["sample"] += 1
        return samplers.SAMPLERS[sampler](fn, x, sigmas)

    a = run(jnp.asarray(_x(10)), schedules.flow_match_sigmas(8))
    b = run(jnp.asarray(_x(11)), schedules.sai_sigmas(8, 2.0))
    c = run(jnp.asarray(_x(12)), schedules.flow_match_sigmas(8, 5.0))
    jax.block_until_ready((a, b, c))
    assert traces == {"sample": 1, "velocity": 1}
    run(jnp.asarray(_x(12)), schedules.flow_match_sigmas(9))  # a new length is a new shape
    assert traces["sample"] == 2


def test_progress_hook_sees_every_step():
    seen = []
    sigmas = schedules.flow_match_sigmas(5)
    out = jax.jit(lambda x: samplers.sample_dpmpp_2m(_plain(_field_jax), x, sigmas, progress=seen.append))(
        jnp.asarray(_x(13))
    )
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sorted(seen) == [0, 1, 2, 3, 4] and all(isinstance(i, int) for i in seen)
