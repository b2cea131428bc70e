"""Checkpoint conversion: PyTorch layouts (diffusers, Stability single files, transformers) and back."""

from sd3_jax.convert.mapping import CheckpointError, open_tensors
from sd3_jax.convert.mmdit import export_mmdit, load_mmdit
from sd3_jax.convert.safetensors_io import CorruptFileError, SafetensorsFile, write_safetensors
from sd3_jax.convert.text_encoders import export_clip, export_t5, load_clip, load_t5
from sd3_jax.convert.vae import export_vae, load_vae

__all__ = [
    "CheckpointError",
    "CorruptFileError",
    "SafetensorsFile",
    "export_clip",
    "export_mmdit",
    "export_t5",
    "export_vae",
    "load_clip",
    "load_mmdit",
    "load_t5",
    "load_vae",
    "open_tensors",
    "write_safetensors",
]
