"""sd3_jax: Stable Diffusion 3 and 3.5 in JAX/Flax."""

import glob
import os

__version__ = "0.1.0"

# With libtpu installed (the `tpu` and `test` extras) on a host without a TPU, jax's first look for devices
# makes libtpu print errors about the TPU host it cannot find, and only one process at a time may load it (a
# lockfile). These settings only steer libtpu's host discovery; they are applied only where no TPU device
# node exists and nothing TPU-related is configured, so a real TPU VM is untouched.
QUIET_LIBTPU = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
}


def _no_tpu_here() -> bool:
    configured = any(k.startswith("TPU_") for k in os.environ)
    return not configured and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*")


if _no_tpu_here():
    for _k, _v in QUIET_LIBTPU.items():
        os.environ.setdefault(_k, _v)


def __getattr__(name):  # lazy: `import sd3_jax` stays light
    if name == "SD3Pipeline":
        from sd3_jax.pipeline import SD3Pipeline

        return SD3Pipeline
    raise AttributeError(f"module 'sd3_jax' has no attribute {name!r}")
