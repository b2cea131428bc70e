"""sd3_jax: Stable Diffusion 3 and 3.5 in JAX/Flax."""

__version__ = "0.1.0"
