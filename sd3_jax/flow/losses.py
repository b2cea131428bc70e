"""The diffusion formulations Esser et al. 2024 compare (sec. 2 and 3), one class each.

Every formulation is a forward process z_t = a_t x0 + b_t eps (sec. 2) over t in (0, 1), a network
parameterization and a loss. Each class exposes the same methods:

    coefficients(t) -> (a_t, b_t)               the forward process coefficients, (B,) each
    noise(x0, eps, t) -> z_t                     the forward process
    net_input(z_t, t) -> (x_in, t_in)            what the network is fed (EDM preconditions here)
    target(x0, eps, t) -> target                 what the network output regresses onto
    loss(model_out, x0, eps, t) -> (B,)          per-example loss, mean over non-batch axes
    to_x0(model_out, z_t, t) -> x0_hat           the denoised prediction
    to_eps(model_out, z_t, t) -> eps_hat         the noise prediction
    rf_sigma(t) / time_from_rf_sigma(sigma)      the map to and from rectified-flow time

Sampling any formulation with the rectified-flow samplers: z_t / (a_t + b_t) = (1 - s) x0 + s eps with
s = b_t / (a_t + b_t), so every formulation is a rectified flow in the rescaled variable x = z_t / (a_t + b_t)
at time s = `rf_sigma(t)`, with velocity v = eps_hat - x0_hat. `as_velocity_fn` wraps a network of any
formulation into such a velocity function. An Euler step in these coordinates moves x0_hat and eps_hat
unchanged to the next level, which is exactly deterministic DDIM (Song et al. 2021, eq. 12) for the
eps-parameterized formulations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.flow.schedules import WeightingScheme, loss_weighting

Array = jax.Array


def _bcast(c: Array, x: Array) -> Array:
    """Per-example (B,) coefficient reshaped to broadcast against x (B, ...)."""
    c = jnp.asarray(c, x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _mean_sq(err: Array) -> Array:
    """Mean of err^2 over every non-batch axis, (B,)."""
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


class Formulation(Protocol):
    """The interface every formulation below implements (see the module docstring)."""

    def coefficients(self, t: Array) -> tuple[Array, Array]: ...
    def noise(self, x0: Array, eps: Array, t: Array) -> Array: ...
    def net_input(self, z: Array, t: Array) -> tuple[Array, Array]: ...
    def target(self, x0: Array, eps: Array, t: Array) -> Array: ...
    def loss(self, model_out: Array, x0: Array, eps: Array, t: Array) -> Array: ...
    def to_x0(self, model_out: Array, z: Array, t: Array) -> Array: ...
    def to_eps(self, model_out: Array, z: Array, t: Array) -> Array: ...
    def rf_sigma(self, t: Array) -> Array: ...
    def time_from_rf_sigma(self, sigma: Array) -> Array: ...


class _Base:
    """Shared forward process and the rectified-flow change of variables."""

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def noise(self, x0: Array, eps: Array, t: Array) -> Array:
        """Forward process z_t = a_t x0 + b_t eps (sec. 2 of Esser et al. 2024)."""
        a, b = self.coefficients(t)
        return _bcast(a, x0) * x0 + _bcast(b, x0) * eps

    def rf_sigma(self, t: Array) -> Array:
        """Rectified-flow time of level t, s = b_t / (a_t + b_t): z_t / (a_t + b_t) = (1 - s) x0 + s eps."""
        a, b = self.coefficients(t)
        return b / (a + b)


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(_Base):
    """Rectified flow (sec. 3): z_t = (1 - t) x0 + t eps, the network predicts v = eps - x0.

    The loss is the conditional flow matching loss E ||v_theta(z_t, t) - (eps - x0)||^2 (sec. 2, L_CFM, the
    weighting w_t^RF = t / (1 - t) in the paper's eps-form), times an optional per-example weight over t.
    """

    weighting: WeightingScheme = "none"  # loss weight over t, as diffusers' compute_loss_weighting_for_sd3

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        t = jnp.asarray(t)
        return 1.0 - t, t

    def net_input(self, z: Array, t: Array) -> tuple[Array, Array]:
        return z, t

    def target(self, x0: Array, eps: Array, t: Array) -> Array:
        """The flow's velocity u_t(z | eps) = eps - x0 (sec. 3)."""
        return eps - x0

    def loss(self, model_out: Array, x0: Array, eps: Array, t: Array) -> Array:
        """w(t) ||v_theta - (eps - x0)||^2 per example (L_CFM of sec. 2)."""
        return loss_weighting(self.weighting, t) * _mean_sq(model_out - self.target(x0, eps, t))

    def to_x0(self, model_out: Array, z: Array, t: Array) -> Array:
        """x0 = z_t - t v."""
        return z - _bcast(t, z) * model_out

    def to_eps(self, model_out: Array, z: Array, t: Array) -> Array:
        """eps = z_t + (1 - t) v."""
        return z + _bcast(1.0 - jnp.asarray(t), z) * model_out

    def rf_sigma(self, t: Array) -> Array:
        return jnp.asarray(t)

    def time_from_rf_sigma(self, sigma: Array) -> Array:
        return jnp.asarray(sigma)


def ldm_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> np.ndarray:
    """LDM's "scaled linear" abar: cumprod(1 - beta), beta_j = (sqrt(b0) + j/(T-1) (sqrt(b1) - sqrt(b0)))^2.

    sec. 3 "LDM-Linear" of Esser et al. 2024 (Rombach et al. 2022); float32 like diffusers' DDPMScheduler.
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    return np.cumprod(1.0 - betas, axis=0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _VariancePreserving(_Base):
    """a_t^2 + b_t^2 = 1 schedules with eps- or v-prediction (sec. 3).

    eps-prediction regresses the noise, ||eps_theta - eps||^2; v-prediction (Salimans & Ho 2022) regresses
    v = a_t eps - b_t x0, ||v_theta - v||^2.
    """

    prediction: Literal["eps", "v"] = "eps"  # what the network outputs

    def net_input(self, z: Array, t: Array) -> tuple[Array, Array]:
        return z, t

    def target(self, x0: Array, eps: Array, t: Array) -> Array:
        if self.prediction == "eps":
            return eps
        a, b = self.coefficients(t)
        return _bcast(a, x0) * eps - _bcast(b, x0) * x0

    def loss(self, model_out: Array, x0: Array, eps: Array, t: Array) -> Array:
        return _mean_sq(model_out - self.target(x0, eps, t))

    def to_x0(self, model_out: Array, z: Array, t: Array) -> Array:
        a, b = (_bcast(c, z) for c in self.coefficients(t))
        if self.prediction == "eps":
            return (z - b * model_out) / a
        return a * z - b * model_out

    def to_eps(self, model_out: Array, z: Array, t: Array) -> Array:
        a, b = (_bcast(c, z) for c in self.coefficients(t))
        if self.prediction == "eps":
            return model_out
        return b * z + a * model_out


@dataclasses.dataclass(frozen=True)
class LDMLinear(_VariancePreserving):
    """LDM-Linear (sec. 3): a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t) over LDM's 1000-step schedule.

    Continuous t in [0, 1] indexes the table at j = t (T - 1), interpolating log abar linearly, so t = j/(T-1)
    reproduces DDPM step j exactly; the network sees t (it multiplies by 1000, i.e. about j). The schedule's
    last level has a_t > 0 (rf_sigma(1) ~ 0.936): sample from x = eps / (a_1 + b_1) at s = rf_sigma(1).
    """

    beta_start: float = 0.00085  # first beta of the scaled-linear schedule
    beta_end: float = 0.012  # last beta
    num_train_timesteps: int = 1000  # table length T

    def _log_abar(self) -> np.ndarray:
        return np.log(ldm_alphas_cumprod(self.beta_start, self.beta_end, self.num_train_timesteps))

    def _grid(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.num_train_timesteps)

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        t = jnp.asarray(t, jnp.float32)
        abar = jnp.exp(jnp.interp(t, self._grid(), self._log_abar()))
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def time_from_rf_sigma(self, sigma: Array) -> Array:
        """Inverse of rf_sigma (monotone) by interpolation over the table; clamps outside its range."""
        abar = np.exp(self._log_abar().astype(np.float64))
        s = np.sqrt(1 - abar) / (np.sqrt(abar) + np.sqrt(1 - abar))
        return jnp.interp(jnp.asarray(sigma, jnp.float32), s, self._grid())


@dataclasses.dataclass(frozen=True)
class Cosine(_VariancePreserving):
    """Cosine schedule (sec. 3, Nichol & Dhariwal 2021): a_t = cos(pi/2 t), b_t = sin(pi/2 t).

    Its rf_sigma is tan(pi/2 t) / (1 + tan(pi/2 t)), the inverse of CosMap; a_1 = 0, so eps-prediction cannot
    recover x0 at t = 1 exactly (sample from slightly below 1 or use prediction="v").
    """

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        t = jnp.asarray(t)
        return jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)

    def time_from_rf_sigma(self, sigma: Array) -> Array:
        """t = (2/pi) arctan(s / (1 - s)), the CosMap transform."""
        sigma = jnp.asarray(sigma)
        return (2.0 / jnp.pi) * jnp.arctan2(sigma, 1.0 - sigma)


@dataclasses.dataclass(frozen=True)
class EDM(_Base):
    """EDM (sec. 3; Karras et al. 2022): z_t = x0 + sigma_t eps with log-normal sigma, F-prediction.

    sigma_t = exp(P_mean + P_std Phi^-1(t)), so uniform t is EDM's log-normal training density. The denoiser
    is D(z) = c_skip z + c_out F(c_in z, c_noise) with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd /
    sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (Karras et al., Table 1).
    The loss lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2 is written in F-space,
    lambda c_out^2 ||F - (x0 - c_skip z) / c_out||^2, where lambda c_out^2 = 1; in the paper's eps-form this
    is w_t = N(lambda_t | -2 P_mean, (2 P_std)^2) (e^-lambda_t + 0.5^2).

    16-channel latents: SD3 latents are normalized ((z - 0.0609) * 1.5305) before diffusion, and the paper
    keeps EDM's sigma_data = 0.5 (the 0.5^2 in w_t) for them; it is a field here. The network gets c_noise as
    its time input (the MMDiT's sinusoidal embedding takes any real number).
    """

    p_mean: float = -1.2  # mean of ln(sigma)
    p_std: float = 1.2  # std of ln(sigma)
    sigma_data: float = 0.5  # assumed data std in the preconditioning

    def sigma(self, t: Array) -> Array:
        """sigma_t = exp(F_N^-1(t | P_mean, P_std^2))."""
        return jnp.exp(self.p_mean + self.p_std * jax.scipy.special.ndtri(jnp.asarray(t, jnp.float32)))

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        s = self.sigma(t)
        return jnp.ones_like(s), s

    def preconditioning(self, sigma: Array) -> tuple[Array, Array, Array, Array]:
        """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
        c_noise = 0.25 * jnp.log(sigma)
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Array) -> Array:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def net_input(self, z: Array, t: Array) -> tuple[Array, Array]:
        _, _, c_in, c_noise = self.preconditioning(self.sigma(t))
        return _bcast(c_in, z) * z, c_noise

    def target(self, x0: Array, eps: Array, t: Array) -> Array:
        """F-target (x0 - c_skip z_t) / c_out."""
        c_skip, c_out, _, _ = self.preconditioning(self.sigma(t))
        z = self.noise(x0, eps, t)
        return (x0 - _bcast(c_skip, x0) * z) / _bcast(c_out, x0)

    def loss(self, model_out: Array, x0: Array, eps: Array, t: Array) -> Array:
        sigma = self.sigma(t)
        _, c_out, _, _ = self.preconditioning(sigma)
        return self.loss_weight(sigma) * c_out**2 * _mean_sq(model_out - self.target(x0, eps, t))

    def to_x0(self, model_out: Array, z: Array, t: Array) -> Array:
        """D(z) = c_skip z + c_out F."""
        c_skip, c_out, _, _ = self.preconditioning(self.sigma(t))
        return _bcast(c_skip, z) * z + _bcast(c_out, z) * model_out

    def to_eps(self, model_out: Array, z: Array, t: Array) -> Array:
        """eps = (z - D(z)) / sigma."""
        return (z - self.to_x0(model_out, z, t)) / _bcast(self.sigma(t), z)

    def time_from_rf_sigma(self, sigma: Array) -> Array:
        """s = sigma / (1 + sigma), so sigma = s / (1 - s) and t = Phi((ln sigma - P_mean) / P_std)."""
        s = jnp.asarray(sigma, jnp.float32)
        return jax.scipy.stats.norm.cdf((jnp.log(s / (1.0 - s)) - self.p_mean) / self.p_std)


FORMULATIONS: dict[str, Callable[[], Formulation]] = {
    "rf": RectifiedFlow,
    "eps_linear": lambda: LDMLinear(prediction="eps"),
    "v_linear": lambda: LDMLinear(prediction="v"),
    "eps_cosine": lambda: Cosine(prediction="eps"),
    "v_cosine": lambda: Cosine(prediction="v"),
    "edm": EDM,
}


def to_velocity(form: Formulation, model_out: Array, z: Array, t: Array) -> Array:
    """Rectified-flow velocity v = eps_hat - x0_hat of any formulation's output (see the module docstring)."""
    if isinstance(form, RectifiedFlow):
        return model_out
    return form.to_eps(model_out, z, t) - form.to_x0(model_out, z, t)


def as_velocity_fn(form: Formulation, net_fn: Callable[..., Array]) -> Callable[..., Array]:
    """Wraps a network `net_fn(x_in, t_in, **cond)` of `form` into a rectified-flow model_fn(x, sigma, **c).

    x is the rescaled state z_t / (a_t + b_t) at rectified-flow time sigma = rf_sigma(t); the samplers then
    run unchanged (an Euler step is DDIM for eps-prediction). For `RectifiedFlow` this is `net_fn` itself.
    """
    if isinstance(form, RectifiedFlow):
        return net_fn

    def velocity_fn(x: Array, sigma: Array, **cond) -> Array:
        t = form.time_from_rf_sigma(sigma)
        a, b = form.coefficients(t)
        z = _bcast(a + b, x) * x
        out = net_fn(*form.net_input(z, t), **cond)
        return to_velocity(form, out, z, t)

    return velocity_fn
