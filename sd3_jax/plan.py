"""`sd3-jax plan`: compile training or sampling for a TPU slice from any host, and say whether it fits.

As MaxText's `train_compile.py` does for LLMs: the devices of a slice come from
`jax.experimental.topologies.get_topology_desc` (libtpu carries the real TPU compiler; no TPU needed), the
arguments are abstract and sharded (`jax.ShapeDtypeStruct(..., sharding=...)`), and the very jitted
functions that `sd3-jax train` and `SD3Pipeline.generate` run are lowered and compiled for that slice.
`compiled.memory_analysis()` then gives each chip's HBM as the compiler allocates it statically:
arguments, outputs (less what aliases donated arguments), temporaries and code. It is not the runtime
figure: allocator fragmentation, host memory and the input pipeline's buffers are not in it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

GIB = 1024**3
# HBM per chip (device), GiB, by jax device_kind.
CHIP_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
CLIP_TOKENS = 77  # each CLIP's sequence; the rest of the text tokens are T5's


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU slice such as "v5p:2x2x1" or "v5e:16x16", compiled for from this host."""
    from jax.experimental import topologies

    from sd3_jax import QUIET_LIBTPU

    for k, v in QUIET_LIBTPU.items():  # compiling needs no chip, on a TPU host or any other
        os.environ.setdefault(k, v)
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises plain RuntimeErrors/XlaRuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"topology {topology!r}: {first} (names look like v5e:2x4, v5p:2x2x1, v6e:4x4)"
        ) from None


@dataclasses.dataclass
class Program:
    """One compiled program: its per-device memory (bytes) and collectives."""

    name: str
    compile_s: float
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    resident: int  # bytes of its arguments that stay in HBM between calls (weights), counted once per run
    collectives: dict[str, int]
    custom_calls: int  # TPU custom calls (Pallas/Mosaic kernels) in the program
    text: str = dataclasses.field(repr=False, default="")
    oom: str = ""  # the compiler's message when the program does not fit (figures: arguments + its ask)

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code


def analyse(name: str, fn: Callable, args: Sequence[Any], resident: int = 0, **kw) -> Program:
    """Lowers and compiles jitted `fn` on abstract `args`; reads its memory and collectives."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args, **kw)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses a program that cannot fit HBM; its message says how much it needed.
        message = str(e).strip().splitlines()[0]
        asked = _bytes_in(message)
        arguments = sharded_nbytes(args)
        return Program(
            name, time.perf_counter() - t0, arguments, 0, 0, asked, 0, resident, {}, 0, oom=message
        )
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    return Program(
        name=name,
        compile_s=dt,
        argument=mem.argument_size_in_bytes,
        output=mem.output_size_in_bytes,
        alias=mem.alias_size_in_bytes,
        temp=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        resident=resident,
        collectives=count_collectives(text),
        custom_calls=len(re.findall(r'custom_call_target="tpu_custom_call"', text)),
        text=text,
    )


def _bytes_in(message: str) -> int:
    """The first size in an out-of-HBM message ("... required for HLO temporaries (19.29G) ..." or "Used
    20.5G of 15.75G hbm"), in bytes; 0 if none."""
    m = re.search(r"(?:required for [^(]*\(|Used )([0-9.]+)([KMGT])", message)
    if not m:
        return 0
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective op the compiled HLO text has (async start/done pairs count once)."""
    out = {}
    for op in COLLECTIVES:
        n = len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
        if n:
            out[op] = n
    return out


def gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in compiled HLO text."""
    shapes = []
    for m in re.finditer(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]*?\sall-gather(?:-start)?\(", hlo):
        shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def sharded_nbytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        n = 1
        for d in shape:
            n *= d
        total += n * (
            8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.dtype(x.dtype).itemsize
        )
    return total


def _abstract(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sh), tree, shardings
    )


# Training.


def train_programs(
    cfg, devices: Sequence[Any], text_tokens: int = 333, latent_hw: tuple[int, int] | None = None
) -> list[Program]:
    """Compiles `sd3-jax train`'s jitted step for `cfg` (a TrainConfig) on `devices`.

    The batch is what a prepared dataset gives: latents of `latent_hw` (default: `data.latent_size`
    square; an aspect-ratio bucket otherwise), CLIP-L/G hidden states of 77 tokens and T5's of
    `text_tokens - 77`, in float32.
    """
    from sd3_jax.sharding.mesh import make_mesh
    from sd3_jax.train.loop import mesh_context, step_fns
    from sd3_jax.train.state import abstract_state, make_optimizer, state_shardings

    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.optim, cfg.steps)
    if cfg.adapter == "controlnet":
        return _controlnet_train_programs(cfg, mesh, tx, text_tokens, latent_hw)
    if cfg.adapter:
        raise ValueError(f"plan: adapter={cfg.adapter!r} is not planned; '' (full training) or 'controlnet'")
    shardings = state_shardings(cfg, tx, mesh)
    state = abstract_state(cfg, tx, mesh)
    batch, rng = _abstract_batch(cfg, mesh, text_tokens, latent_hw)
    with mesh_context(mesh):
        step, _ = step_fns(cfg, tx, shardings, None)
        return [analyse("train step", step, (state, batch, rng), resident=sharded_nbytes(state))]


def _abstract_batch(cfg, mesh, text_tokens: int, latent_hw) -> tuple[dict, Any]:
    """What a prepared dataset gives a train step (sharded over data x fsdp), and the step's key."""
    m, b = cfg.model, cfg.batch_size
    lh, lw = latent_hw or (cfg.data.latent_size, cfg.data.latent_size)
    wl = m.pooled_dim * 3 // 8  # CLIP-L's width: 768 of SD3's 2048 pooled channels, CLIP-G the rest
    shapes = {
        "latents": (b, lh, lw, m.in_channels),
        "clip_l": (b, CLIP_TOKENS, wl),
        "clip_g": (b, CLIP_TOKENS, m.pooled_dim - wl),
        "t5": (b, text_tokens - CLIP_TOKENS, m.context_dim),
        "pooled_l": (b, wl),
        "pooled_g": (b, m.pooled_dim - wl),
    }
    if cfg.adapter == "controlnet":
        shapes["control"] = (b, lh, lw, m.in_channels + cfg.controlnet_extra_channels)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    spec = PartitionSpec(("data", "fsdp")) if b % n_batch == 0 else PartitionSpec()
    batch = {
        k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=NamedSharding(mesh, spec)) for k, v in shapes.items()
    }
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    return batch, rng


def _controlnet_train_programs(cfg, mesh, tx, text_tokens: int, latent_hw) -> list[Program]:
    """`adapter="controlnet"`: the ControlNet's TrainState beside the frozen base (fp32, sharded)."""
    import functools

    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.sharding.mesh import tree_shardings
    from sd3_jax.train.controlnet import (
        abstract_controlnet_state,
        controlnet_state_shardings,
        controlnet_train_step,
    )
    from sd3_jax.train.loop import mesh_context

    state = abstract_controlnet_state(cfg, tx, mesh)
    base = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=sh),
        abstract_params(cfg.model),
        tree_shardings(abstract_params(cfg.model, boxed=True), mesh),
    )
    batch, rng = _abstract_batch(cfg, mesh, text_tokens, latent_hw)
    step = jax.jit(
        functools.partial(controlnet_train_step, cfg, tx),
        out_shardings=(controlnet_state_shardings(cfg, tx, mesh), None),
        donate_argnums=0,
    )
    with mesh_context(mesh):
        resident = sharded_nbytes(state) + sharded_nbytes(base)
        return [analyse("ControlNet train step", step, (state, batch, rng, base), resident=resident)]


# Sampling.


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    height: int = 1024
    width: int = 1024
    batch: int = 1  # images per call
    steps: int = 28
    cfg: bool = True  # classifier-free guidance (two MMDiT passes a step)
    t5_tokens: int = 256  # T5 sequence (max_sequence_length); 0: no T5 (and none loaded)
    dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The configs of the pipeline's other networks (None: the released SD3 ones)."""

    clip_l: Any = None
    clip_g: Any = None
    t5: Any = None
    vae: Any = None

    def released(self) -> Encoders:
        from sd3_jax.nn.clip import CLIPConfig
        from sd3_jax.nn.t5 import T5Config
        from sd3_jax.nn.vae import VAEConfig

        return Encoders(
            self.clip_l or CLIPConfig.clip_l(),
            self.clip_g or CLIPConfig.clip_g(),
            self.t5 or T5Config.t5_xxl(),
            self.vae or VAEConfig.sd3(),
        )


def sample_programs(
    model,
    spec: SampleSpec,
    devices: Sequence[Any],
    mesh_cfg=None,
    encoders: Encoders = Encoders(),
    only_denoiser: bool = False,
) -> list[Program]:
    """Compiles the jitted functions `SD3Pipeline.generate` runs (CLIP-L, CLIP-G, T5, the denoising loop,
    the VAE decode) for `model` (an MMDiTConfig) on `devices`, with the shardings `SD3Pipeline.load` gives
    (MMDiT by the rules, the rest replicated). `only_denoiser`: the loop alone."""
    from sd3_jax.convert import text_encoders
    from sd3_jax.convert import vae as vae_convert
    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.pipeline import decode, denoise
    from sd3_jax.sharding.mesh import MeshConfig, make_mesh, tree_shardings
    from sd3_jax.text import _clip_apply, _t5_apply
    from sd3_jax.train.loop import mesh_context

    dtype = jnp.dtype(spec.dtype)
    mesh = make_mesh(mesh_cfg or MeshConfig(), devices)
    rep = NamedSharding(mesh, PartitionSpec())
    replicated = lambda tree: _abstract(tree, jax.tree.map(lambda _: rep, tree), dtype)
    n = spec.batch * (2 if spec.cfg else 1)  # prompts encoded: the batch and its negatives
    enc = encoders.released()
    lh, lw = spec.height // enc.vae.factor, spec.width // enc.vae.factor
    jobs = []  # (name, jitted fn, args, static kwargs, resident params); abstract trees built off-mesh
    for name, ccfg in (("CLIP-L", enc.clip_l), ("CLIP-G", enc.clip_g)):
        ids = jax.ShapeDtypeStruct((n, ccfg.max_length), jnp.int32, sharding=rep)
        fn = jax.jit(functools.partial(_clip_apply, config=ccfg, dtype=dtype, skip=0))
        jobs.append((name, fn, replicated(text_encoders.clip_abstract(ccfg)), (ids,), {}))
    if spec.t5_tokens:
        ids = jax.ShapeDtypeStruct((n, spec.t5_tokens), jnp.int32, sharding=rep)
        fn = jax.jit(functools.partial(_t5_apply, config=enc.t5, dtype=dtype))
        jobs.append(("T5-XXL", fn, replicated(text_encoders.t5_abstract(enc.t5)), (ids,), {}))
    p = _abstract(abstract_params(model), tree_shardings(abstract_params(model, boxed=True), mesh), dtype)
    x = jax.ShapeDtypeStruct((spec.batch, lh, lw, model.in_channels), dtype, sharding=rep)
    tokens = enc.clip_l.max_length + spec.t5_tokens  # CLIP-L and CLIP-G join on channels, T5 follows
    cond = {
        "context": jax.ShapeDtypeStruct((spec.batch, tokens, model.context_dim), dtype, sharding=rep),
        "pooled": jax.ShapeDtypeStruct((spec.batch, model.pooled_dim), dtype, sharding=rep),
    }
    sigmas = jax.ShapeDtypeStruct((spec.steps + 1,), jnp.float32, sharding=rep)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    kw = dict(config=model.replace(dtype=dtype), sampler="euler", use_cfg=spec.cfg)
    jobs.append(("MMDiT loop", denoise, p, (x, sigmas, cond, cond if spec.cfg else None, scale), kw))
    vae = replicated(vae_convert.abstract_params(enc.vae))
    jobs.append(("VAE decode", decode, vae, (x,), dict(config=enc.vae)))
    if only_denoiser:
        jobs = [j for j in jobs if j[0] == "MMDiT loop"]
    with mesh_context(mesh):
        return [
            analyse(name, fn, (params, *args), resident=sharded_nbytes(params), **kw)
            for name, fn, params, args, kw in jobs
        ]


def peak_bytes(programs: Sequence[Program]) -> int:
    """Per-device peak over a run of `programs`: every program's resident weights stay in HBM together,
    plus the largest of the programs' own other arguments, outputs, temporaries and code."""
    resident = sum(p.resident for p in programs)
    return resident + max(p.total - p.resident for p in programs)


def chip_hbm(device: Any) -> int | None:
    gib = CHIP_HBM_GIB.get(device.device_kind)
    return gib * GIB if gib else None


def attention_backends(model, dtype: str, devices: Sequence[Any]) -> str:
    """Which backend the MMDiT's attention runs on these devices."""
    from sd3_jax.nn.attention import select_backend

    if model.attention != "auto":
        return model.attention
    return select_backend(jnp.dtype(dtype), devices[0].platform)


def report(programs: Sequence[Program], device: Any) -> list[str]:
    """The lines `sd3-jax plan` prints; the last is `peak per device: N.N GiB of M GiB (fits)`."""
    g = lambda b: f"{b / GIB:6.2f}"
    lines = [f"{'program':12s} {'args':>7s} {'temp':>7s} {'total':>7s} GiB  compile   collectives"]
    for p in programs:
        coll = ", ".join(f"{k} {v}" for k, v in p.collectives.items()) or "none"
        kern = f"; {p.custom_calls} TPU kernel calls" if p.custom_calls else ""
        lines.append(
            f"{p.name:12s} {g(p.argument)} {g(p.temp)} {g(p.total)}      {p.compile_s:6.1f} s  {coll}{kern}"
        )
    peak, hbm = peak_bytes(programs), chip_hbm(device)
    for p in programs:
        if p.oom:
            lines.append(f"{p.name}: the TPU compiler stopped: {p.oom}")
            lines.append("  (its figures: the arguments plus the temporaries the compiler asked for)")
    if len(programs) > 1:
        lines.append(
            f"weights resident together: {sum(p.resident for p in programs) / GIB:.2f} GiB per device"
        )
    if hbm is None:
        lines.append(f"peak per device: {peak / GIB:.1f} GiB ({device.device_kind}: HBM unknown)")
    else:
        fits = "fits" if peak <= hbm and not any(p.oom for p in programs) else "does not fit"
        lines.append(f"peak per device: {peak / GIB:.1f} GiB of {hbm / GIB:.0f} GiB ({fits})")
    return lines


def run(
    topology: str,
    task: str,
    cfg: Any,
    resolution: tuple[int, int] = (1024, 1024),
    text_tokens: int = 333,
    sample: SampleSpec | None = None,
) -> tuple[list[Program], list[str]]:
    """What `sd3-jax plan` does: compile `task` ("train" or "sample") of `cfg` (a TrainConfig) for a slice.

    Both take `resolution` (height, width) in pixels and `text_tokens` (77 CLIP + T5); sampling takes the
    rest from `sample`. Returns the programs and report lines.
    """
    if task not in ("train", "sample"):
        raise ValueError(f"plan: task must be train or sample, got {task!r}")
    h, w = resolution
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise ValueError(f"plan: resolution must be positive multiples of 16, got {w}x{h}")
    if text_tokens <= CLIP_TOKENS:
        raise ValueError(f"plan: text tokens must exceed the {CLIP_TOKENS} CLIP tokens, got {text_tokens}")
    devices = topology_devices(topology)
    dtype = cfg.compute_dtype
    header = [
        f"{topology}: {len(devices)} x {devices[0].device_kind}, mesh {mesh_line(cfg.mesh, len(devices))}",
        f"MMDiT attention: {attention_backends(cfg.model, dtype, devices)}; remat {cfg.model.remat}; "
        f"dtype {dtype}",
    ]
    if task == "train":
        header.append(f"train step: batch {cfg.batch_size} at {w}x{h} px, {text_tokens} text tokens")
        programs = train_programs(cfg, devices, text_tokens, (h // 8, w // 8))
    else:
        spec = sample or SampleSpec(height=h, width=w, t5_tokens=text_tokens - CLIP_TOKENS, dtype=dtype)
        header.append(
            f"sample: {spec.batch} image(s) at {spec.width}x{spec.height} px, {spec.steps} steps, "
            f"{'CFG' if spec.cfg else 'no CFG'}, {CLIP_TOKENS + spec.t5_tokens} text tokens"
        )
        programs = sample_programs(cfg.model, spec, devices, cfg.mesh)
        header.append(
            "CLIP and T5 attention: xla (CLIP's causal mask and T5's position bias are no kernel's)"
        )
    lines = header + report(programs, devices[0])
    lines.insert(-1, _flops_line(cfg, task, programs, (h, w), text_tokens, sample, devices))
    lines.insert(-1, f"compile: {sum(p.compile_s for p in programs):.1f} s on this host")
    return programs, lines


def _flops_line(cfg, task, programs, resolution, text_tokens, sample, devices) -> str:
    """MMDiT FLOPs of the step or loop from `sd3_jax/flops.py` (XLA's cost analysis counts a scanned loop's
    body once), and the time they take at the slice's peak bf16 rate: a floor, not an estimate."""
    from sd3_jax.flops import mmdit_forward_flops, peak_flops

    h, w = resolution
    if task == "train":
        flops = 3 * mmdit_forward_flops(cfg.model, h // 8, w // 8, text_tokens, cfg.batch_size)
        what = "train step (3 x forward)"
    else:
        spec = sample or SampleSpec(height=h, width=w)
        per = mmdit_forward_flops(cfg.model, spec.height // 8, spec.width // 8, CLIP_TOKENS + spec.t5_tokens)
        flops = per * spec.batch * (2 if spec.cfg else 1) * spec.steps
        what = f"denoising loop ({spec.steps} steps)"
    peak = peak_flops(devices[0].device_kind)
    floor = f"; at least {flops / (peak * len(devices)) * 1e3:.3g} ms at peak bf16" if peak else ""
    return f"MMDiT FLOPs per {what}: {flops / 1e12:.3g} TFLOP (sd3_jax/flops.py){floor}"


def mesh_line(mesh_cfg: Any, n: int) -> str:
    data, fsdp, tensor = mesh_cfg.sizes(n)
    return f"data={data} fsdp={fsdp} tensor={tensor}"
