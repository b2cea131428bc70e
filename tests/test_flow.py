"""Timestep densities, shifts and sigma schedules, the loss formulations and text-condition dropout.

References: diffusers 0.42 (training_utils, FlowMatchEulerDiscreteScheduler, DDPMScheduler, the SD3 pipelines)
and a transcription of Stability-AI/sd3.5 `sd3_impls.ModelSamplingDiscreteFlow` + `sd3_infer.get_sigmas`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sd3_jax.flow import conditioning, losses, samplers, schedules

N_STAT = 100_000  # samples for the distribution checks


# ------------------------------------------------------------------------------------------- densities


def test_logit_normal_moments():
    m, s = 0.3, 0.8
    t = np.asarray(schedules.logit_normal(jax.random.key(0), N_STAT, m, s), np.float64)
    assert t.shape == (N_STAT,) and (t > 0).all() and (t < 1).all()
    logit = np.log(t) - np.log1p(-t)
    # standard errors: s / sqrt(n) = 0.0025 (mean), s / sqrt(2n) = 0.0018 (std); 0.01 is > 4 of them.
    assert abs(logit.mean() - m) < 0.01
    assert abs(logit.std() - s) < 0.01


def test_density_transforms_match_diffusers_on_same_draws():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n, m, s, mode_scale = 4096, -0.4, 1.3, 1.29
    ref = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=m, logit_std=s, generator=torch.Generator().manual_seed(1)
    )
    drawn = torch.normal(mean=m, std=s, size=(n,), generator=torch.Generator().manual_seed(1))
    normal = (drawn.numpy() - m) / s  # the underlying standard-normal draws
    ours = schedules.logit_normal_transform(jnp.asarray(normal), m, s)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=0, atol=1e-6)

    ref = compute_density_for_timestep_sampling(
        "mode", n, mode_scale=mode_scale, generator=torch.Generator().manual_seed(2)
    )
    u = torch.rand(size=(n,), generator=torch.Generator().manual_seed(2)).numpy()
    ours = schedules.mode_transform(jnp.asarray(u), mode_scale)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=0, atol=1e-6)


def test_mode_transform():
    u = jnp.linspace(0.0, 1.0, 1001)
    np.testing.assert_array_equal(np.asarray(schedules.mode_transform(u, 0.0)), np.asarray(1.0 - u))
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(schedules.mode(key, 64, s=0.0)), np.asarray(1.0 - schedules.uniform(key, 64))
    )
    # A valid density on [0, 1] for s up to 2/(pi - 2): f_mode decreases from 1 to 0.
    t = np.asarray(schedules.mode_transform(u, 2 / (math.pi - 2) - 1e-3))
    assert abs(t[0] - 1) < 1e-6 and abs(t[-1]) < 1e-6 and (np.diff(t) < 0).all()


def test_cosmap_closed_form():
    u = jnp.array([0.25, 0.5, 0.75])
    # tan(pi/8) = sqrt(2) - 1, tan(pi/4) = 1, tan(3 pi / 8) = sqrt(2) + 1
    want = [1 - 1 / math.sqrt(2), 0.5, 1 - 1 / (math.sqrt(2) + 2)]
    np.testing.assert_allclose(np.asarray(schedules.cosmap_transform(u)), want, rtol=1e-6)
    # Its density 1 / f'(u) is the cosmap loss weight 2 / (pi (1 - 2t + 2t^2)).
    uu = jnp.linspace(0.05, 0.95, 19)
    slope = jax.vmap(jax.grad(schedules.cosmap_transform))(uu)
    density = schedules.loss_weighting("cosmap", schedules.cosmap_transform(uu))
    np.testing.assert_allclose(np.asarray(1 / slope), np.asarray(density), rtol=1e-4)
    # Samples follow the CDF F(t) = (2/pi) arctan(t / (1 - t)); KS 5% critical value at 1e5 is 0.0043.
    t = np.sort(np.asarray(schedules.cosmap(jax.random.key(4), N_STAT), np.float64))
    cdf = 2 / np.pi * np.arctan2(t, 1 - t)
    ks = np.max(np.abs(cdf - np.arange(1, N_STAT + 1) / N_STAT))
    assert ks < 0.01, ks


def test_loss_weighting_matches_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sig = np.linspace(0.01, 0.99, 50, dtype=np.float32)
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ref = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sig)).numpy()
        np.testing.assert_allclose(np.asarray(schedules.loss_weighting(scheme, sig)), ref, rtol=1e-6)
    with pytest.raises(ValueError):
        schedules.loss_weighting("sqrt", sig)


# ------------------------------------------------------------------------------------------- shift


def test_shift_formulas():
    assert schedules.shift_sigmas(0.5, 3.0) == 0.75
    assert schedules.shift_sigmas(0.0, 3.0) == 0.0 and schedules.shift_sigmas(1.0, 3.0) == 1.0
    assert schedules.shift_sigmas(0.37, 1.0) == 0.37
    t = np.linspace(0.01, 1.0, 100)
    # The exponential dynamic shift with sigma = 1 is the SD3 shift with alpha = e^mu.
    np.testing.assert_allclose(
        schedules.time_shift(math.log(3.0), t), schedules.shift_sigmas(t, 3.0), rtol=1e-12
    )
    assert schedules.resolution_shift(1024 * 1024) == 4.0
    assert schedules.resolution_shift(4096, base=256) == 4.0  # tokens: (1024 / 16)^2 vs (256 / 16)^2

    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    for seq in (256, 1024, 4096, 9000):
        assert schedules.calculate_shift(seq) == pytest.approx(calculate_shift(seq), abs=1e-12)
        assert schedules.calculate_shift(seq, 256, 4096, 0.5, 1.16) == pytest.approx(
            calculate_shift(seq, 256, 4096, 0.5, 1.16), abs=1e-12
        )


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_sigmas_match_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = schedules.flow_match_sigmas(steps, shift)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours[:-1] * 1000, sched.timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("mu", [0.5, 0.8, 1.15])
@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_flow_match_sigmas_dynamic_shift_match_diffusers(mu, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
    sched.set_timesteps(28, mu=mu)
    ours = schedules.flow_match_sigmas(28, mu=mu, time_shift_type=kind)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=0, atol=1e-6)


class _SaiModelSamplingDiscreteFlow(torch.nn.Module):
    """Transcription of Stability-AI/sd3.5 sd3_impls.py `ModelSamplingDiscreteFlow` (what get_sigmas uses)."""

    def __init__(self, shift=1.0):
        super().__init__()
        self.shift = shift
        timesteps = 1000
        ts = self.sigma(torch.arange(1, timesteps + 1, 1))
        self.register_buffer("sigmas", ts)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * 1000

    def sigma(self, timestep: torch.Tensor):
        timestep = timestep / 1000.0
        if self.shift == 1.0:
            return timestep
        return self.shift * timestep / (1 + (self.shift - 1) * timestep)


def _sai_get_sigmas(sampling, steps):
    """Transcription of Stability-AI/sd3.5 sd3_infer.py `SD3Inferencer.get_sigmas`."""
    start = sampling.timestep(sampling.sigma_max)
    end = sampling.timestep(sampling.sigma_min)
    timesteps = torch.linspace(start, end, steps)
    sigs = []
    for x in range(len(timesteps)):
        ts = timesteps[x]
        sigs.append(sampling.sigma(ts))
    sigs += [0.0]
    return torch.FloatTensor(sigs)


@pytest.mark.parametrize("steps", [1, 4, 28, 40, 51])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sai_sigmas_match_stability(steps, shift):
    ref = _sai_get_sigmas(_SaiModelSamplingDiscreteFlow(shift), steps).numpy()
    ours = schedules.sai_sigmas(steps, shift)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    # Same formula as diffusers' up to float32 vs float64 intermediates.
    np.testing.assert_allclose(ours, schedules.flow_match_sigmas(steps, shift), rtol=0, atol=1e-6)


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.6, 0.999, 1.0])
def test_img2img_matches_diffusers(strength):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    steps = 28
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    fake_pipe = SimpleNamespace(scheduler=sched)
    timesteps, n_left = StableDiffusion3Img2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
    ours = schedules.img2img_sigmas(schedules.flow_match_sigmas(steps), strength)
    assert len(ours) == n_left + 1
    np.testing.assert_allclose(ours, sched.sigmas[sched.begin_index :].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours[:-1] * 1000, timesteps.numpy(), rtol=1e-6)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    ref = sched.scale_noise(x0, timesteps[:1].repeat(2), noise).numpy()
    got = schedules.scale_noise(jnp.asarray(x0.numpy()), jnp.asarray(noise.numpy()), ours[0])
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6, rtol=0)


def test_img2img_rejects_zero_steps():
    with pytest.raises(ValueError):
        schedules.img2img_sigmas(schedules.flow_match_sigmas(28), 0.0)


# ------------------------------------------------------------------------------------------- losses

FORMS = sorted(losses.FORMULATIONS)


def _batch(seed=0, b=6):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.standard_normal((b, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((b, 4, 4, 3)), jnp.float32)
    t = jnp.linspace(0.08, 0.92, b)
    return x0, eps, t


@pytest.mark.parametrize("name", FORMS)
def test_loss_zero_at_target_and_quadratic_around_it(name):
    form = losses.FORMULATIONS[name]()
    x0, eps, t = _batch()
    target = form.target(x0, eps, t)
    loss0 = form.loss(target, x0, eps, t)
    assert loss0.shape == (x0.shape[0],)
    np.testing.assert_array_equal(np.asarray(loss0), 0.0)
    # Off by 0.1 everywhere: every formulation here has unit weight in its own output space.
    np.testing.assert_allclose(np.asarray(form.loss(target + 0.1, x0, eps, t)), 0.01, rtol=1e-4)


@pytest.mark.parametrize("name", FORMS)
def test_predictions_invert_the_target(name):
    form = losses.FORMULATIONS[name]()
    x0, eps, t = _batch(1)
    z = form.noise(x0, eps, t)
    target = form.target(x0, eps, t)
    np.testing.assert_allclose(np.asarray(form.to_x0(target, z, t)), np.asarray(x0), atol=2e-4)
    np.testing.assert_allclose(np.asarray(form.to_eps(target, z, t)), np.asarray(eps), atol=2e-4)
    v = losses.to_velocity(form, target, z, t)
    np.testing.assert_allclose(np.asarray(v), np.asarray(eps - x0), atol=4e-4)
    # The rectified-flow change of variables: z / (a + b) = (1 - s) x0 + s eps, s = rf_sigma(t).
    a, b = form.coefficients(t)
    s = form.rf_sigma(t)
    np.testing.assert_allclose(
        np.asarray(z / (a + b)[:, None, None, None]),
        np.asarray(schedules.scale_noise(x0, eps, s)),
        atol=1e-5,
    )
    np.testing.assert_allclose(np.asarray(form.time_from_rf_sigma(s)), np.asarray(t), atol=2e-4)


def test_rectified_flow_forward_process():
    form = losses.RectifiedFlow()
    x0, eps, _ = _batch(2)
    b = x0.shape[0]
    np.testing.assert_array_equal(np.asarray(form.noise(x0, eps, jnp.zeros(b))), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(form.noise(x0, eps, jnp.ones(b))), np.asarray(eps))
    t = jnp.full((b,), 0.25)
    np.testing.assert_allclose(
        np.asarray(form.noise(x0, eps, t)), np.asarray(0.75 * x0 + 0.25 * eps), atol=1e-6
    )
    # The weighting multiplies the per-example loss.
    w = losses.RectifiedFlow(weighting="sigma_sqrt")
    t = jnp.linspace(0.1, 0.9, b)
    out = jnp.zeros_like(x0)
    np.testing.assert_allclose(
        np.asarray(w.loss(out, x0, eps, t)), np.asarray(form.loss(out, x0, eps, t) / t**2), rtol=1e-5
    )


def test_ldm_linear_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    np.testing.assert_allclose(losses.ldm_alphas_cumprod(), ref.numpy(), rtol=2e-6)
    form = losses.LDMLinear()
    j = np.array([0, 1, 250, 500, 998, 999])
    a, b = form.coefficients(jnp.asarray(j / 999.0))
    np.testing.assert_allclose(np.asarray(a), np.sqrt(ref.numpy()[j]), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(b), np.sqrt(1 - ref.numpy()[j]), rtol=2e-5)


def test_cosine_schedule():
    a, b = losses.Cosine().coefficients(jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(np.asarray(a), [1.0, math.sqrt(0.5), 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(b), [0.0, math.sqrt(0.5), 1.0], atol=1e-7)
    # Its rectified-flow time inverts CosMap: time_from_rf_sigma = cosmap^-1.
    u = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_allclose(
        np.asarray(losses.Cosine().time_from_rf_sigma(schedules.cosmap_transform(u))),
        np.asarray(u),
        atol=1e-6,
    )


def test_edm_preconditioning_constants():
    edm = losses.EDM()
    c_skip, c_out, c_in, c_noise = edm.preconditioning(jnp.float32(0.5))  # sigma = sigma_data
    np.testing.assert_allclose(
        [c_skip, c_out, c_in, c_noise], [0.5, 0.5 / math.sqrt(2), math.sqrt(2), math.log(0.5) / 4], rtol=1e-6
    )
    np.testing.assert_allclose(edm.loss_weight(jnp.float32(0.5)), 8.0, rtol=1e-6)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(jnp.float32(2.0))
    np.testing.assert_allclose(
        [c_skip, c_out, c_in], [0.25 / 4.25, 1.0 / math.sqrt(4.25), 1 / math.sqrt(4.25)]
    )
    # The median t = 0.5 sits at sigma = exp(P_mean); t = Phi(1) at exp(P_mean + P_std).
    np.testing.assert_allclose(
        edm.sigma(jnp.array([0.5, 0.8413447460685429])), [math.exp(-1.2), 1.0], rtol=1e-5
    )


def _oracle_net(form, x_star):
    """The exact network output of `form` for a one-point data set {x_star}, as a function of its inputs."""

    def net(x_in, t_in):
        if isinstance(form, losses.EDM):
            sigma = jnp.exp(4.0 * t_in)
            t = jax.scipy.stats.norm.cdf((jnp.log(sigma) - form.p_mean) / form.p_std)
            z = x_in / form.preconditioning(sigma)[2][:, None, None, None]
        else:
            t, z = t_in, x_in
        a, b = form.coefficients(t)
        eps = (z - a[:, None, None, None] * x_star) / b[:, None, None, None]
        return form.target(jnp.broadcast_to(x_star, z.shape), eps, t)

    return net


@pytest.mark.parametrize("name", FORMS)
def test_as_velocity_fn_gives_the_exact_flow(name):
    """For one data point x*, the rectified-flow velocity is (x - x*) / sigma whatever the formulation."""
    form = losses.FORMULATIONS[name]()
    rng = np.random.default_rng(5)
    x_star = jnp.asarray(rng.standard_normal((1, 4, 4, 3)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32)
    sigma = jnp.array([0.2, 0.5, 0.8])
    v = losses.as_velocity_fn(form, _oracle_net(form, x_star))(x, sigma)
    np.testing.assert_allclose(
        np.asarray(v), np.asarray((x - x_star) / sigma[:, None, None, None]), atol=2e-4
    )


@pytest.mark.parametrize("name", FORMS)
def test_euler_in_rf_coordinates_is_ddim(name):
    """One Euler step of `as_velocity_fn(form, net)` is the DDIM step z' = a' x0_hat + b' eps_hat."""
    form = losses.FORMULATIONS[name]()
    net = lambda x_in, t_in: jnp.tanh(x_in) * (0.5 + t_in[:, None, None, None])  # any network
    t, t_next = jnp.full((2,), 0.7), jnp.full((2,), 0.4)
    z = jnp.asarray(np.random.default_rng(8).standard_normal((2, 4, 4, 3)), jnp.float32)
    out = net(*form.net_input(z, t))
    x0_hat, eps_hat = form.to_x0(out, z, t), form.to_eps(out, z, t)
    a, b = form.coefficients(t_next)
    ddim = (a[:, None, None, None] * x0_hat + b[:, None, None, None] * eps_hat) / (a + b)[:, None, None, None]
    a0, b0 = form.coefficients(t)
    x = z / (a0 + b0)[:, None, None, None]
    sigmas = jnp.stack([form.rf_sigma(t)[0], form.rf_sigma(t_next)[0]])
    euler = samplers.sample_euler(samplers.with_cond(losses.as_velocity_fn(form, net)), x, sigmas)
    np.testing.assert_allclose(np.asarray(euler), np.asarray(ddim), rtol=0, atol=1e-5)
    assert np.abs(np.asarray(ddim - x)).max() > 0.05  # the step moved


# ------------------------------------------------------------------------------------------- conditioning

LC, DL, DG, LT, DT = 7, 8, 12, 5, 32  # tiny CLIP length, CLIP-L / CLIP-G / T5 widths, T5 length


def _pieces(b, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(b, LC, DL), (b, LC, DG), (b, LT, DT), (b, DL), (b, DG)]
    return [jnp.asarray(rng.uniform(1.0, 2.0, s), jnp.float32) for s in shapes]  # never zero


def test_join_matches_diffusers_layout():
    clip_l, clip_g, t5, pl, pg = _pieces(3)
    # diffusers StableDiffusion3Pipeline.encode_prompt
    tl, tg, tt = (torch.from_numpy(np.array(a)) for a in (clip_l, clip_g, t5))
    clip = torch.cat([tl, tg], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, tt.shape[-1] - clip.shape[-1]))
    ref = torch.cat([clip, tt], dim=-2).numpy()
    ours = conditioning.join_context(clip_l, clip_g, t5)
    assert ours.shape == (3, LC + LT, DT)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    pooled = conditioning.join_pooled(pl, pg)
    np.testing.assert_array_equal(np.asarray(pooled), np.concatenate([pl, pg], -1))
    with pytest.raises(ValueError):
        conditioning.join_context(clip_l, clip_g, t5[..., : DL + DG - 1])


def test_dropout_extremes():
    pieces = _pieces(4)
    ctx, pooled, keep = conditioning.drop_and_join(jax.random.key(0), *pieces, p=0.0)
    assert bool(keep.all())
    np.testing.assert_array_equal(np.asarray(ctx), np.asarray(conditioning.join_context(*pieces[:3])))
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(conditioning.join_pooled(*pieces[3:])))
    ctx, pooled, keep = conditioning.drop_and_join(jax.random.key(0), *pieces, p=1.0)
    assert not bool(keep.any())
    assert ctx.shape == (4, LC + LT, DT) and not np.asarray(ctx).any() and not np.asarray(pooled).any()


def test_dropout_frequencies_and_per_example_zeroing():
    b, p = 20_000, conditioning.DEFAULT_DROP_PROB
    clip_l, clip_g, t5, pl, pg = _pieces(b, seed=1)
    ctx, pooled, keep = conditioning.drop_and_join(jax.random.key(7), clip_l, clip_g, t5, pl, pg, p=p)
    ctx, pooled, keep = np.asarray(ctx), np.asarray(pooled), np.asarray(keep)
    drop = ~keep
    # binomial standard errors at n = 2e4: 0.0035 for p, 0.0029 for p^2; tolerance 0.015 is > 4 of them.
    np.testing.assert_allclose(drop.mean(0), p, atol=0.015)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs((drop[:, i] & drop[:, j]).mean() - p * p) < 0.015
    assert abs(drop.all(1).mean() - p**3) < 0.015
    # Each example's pieces are zeroed exactly when its encoder is dropped, and kept intact otherwise.
    parts = [
        (ctx[:, :LC, :DL], clip_l, 0),
        (ctx[:, :LC, DL : DL + DG], clip_g, 1),
        (ctx[:, LC:, :], t5, 2),
        (pooled[:, :DL], pl, 0),
        (pooled[:, DL:], pg, 1),
    ]
    for got, orig, col in parts:
        k = keep[:, col]
        np.testing.assert_array_equal(got[k], np.asarray(orig)[k])
        assert not got[~k].any()
    assert not ctx[:, :LC, DL + DG :].any()  # the channel padding
