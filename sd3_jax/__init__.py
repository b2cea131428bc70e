"""sd3_jax: Stable Diffusion 3 and 3.5 in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import sd3_jax` stays light
    if name == "SD3Pipeline":
        from sd3_jax.pipeline import SD3Pipeline

        return SD3Pipeline
    raise AttributeError(f"module 'sd3_jax' has no attribute {name!r}")
