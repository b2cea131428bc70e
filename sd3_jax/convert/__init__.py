"""Checkpoint conversion: PyTorch layouts (diffusers, Stability single files, transformers) to params and back."""

from sd3_jax.convert.mapping import CheckpointError, open_tensors
from sd3_jax.convert.mmdit import export_mmdit, load_mmdit
from sd3_jax.convert.vae import export_vae, load_vae
from sd3_jax.convert.safetensors_io import CorruptFileError, SafetensorsFile, write_safetensors

__all__ = [
    "CheckpointError",
    "CorruptFileError",
    "SafetensorsFile",
    "export_mmdit",
    "export_vae",
    "load_mmdit",
    "load_vae",
    "open_tensors",
    "write_safetensors",
]
