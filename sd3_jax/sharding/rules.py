"""The one table of logical axis names to mesh axes (MaxText `logical_axis_rules`).

Modules name their axes logically only; this table decides where each goes on a mesh with axes
`data`, `fsdp` and `tensor`. The image and text streams of the MMDiT share names.
"""

from __future__ import annotations

# Logical names used by the modules:
#   activations: batch, length, embed, heads, kv, mlp
#   params: embed, mlp, heads, kv, vocab, layers, conv_in, conv_out, norm, patch, cond
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("patch", None),
    ("cond", "fsdp"),  # the conditioning vector's width: adaLN kernels are a third of the MMDiT
    ("mod", "tensor"),
)
