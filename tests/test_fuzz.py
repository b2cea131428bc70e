"""Generated bad input for every reader (hypothesis): each case ends in one error line and exit 2 with
nothing written, or in the documented handling; never a traceback.

Seeded (`derandomize=True`) and bounded (`max_examples`) so the suite stays within its time.
"""

from __future__ import annotations

import json
import os
import re
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sd3_jax.convert.safetensors_io import CorruptFileError, SafetensorsFile, write_safetensors

FAST = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MEDIUM = settings(FAST, max_examples=100)
SLOW = settings(FAST, max_examples=12)

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.uint8, ml_dtypes.float8_e4m3fn]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(r"sd3-jax( \w+)?: error: ", err), err
    return err


# ---------------------------------------------------------------------------------------------------------
# safetensors files.


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5, unique=True))
    out = {}
    for i, name in enumerate(names):
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        out[name] = (np.arange(int(np.prod(shape)), dtype=np.float32) + i).astype(dtype).reshape(shape)
    return out


def file_bytes(tensors: dict, tmp) -> bytes:
    path = os.path.join(tmp, "good.safetensors")
    write_safetensors(path, tensors, metadata={"format": "pt"})
    with open(path, "rb") as f:
        return f.read()


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)


@st.composite
def corruptions(draw, blob: bytes):
    """A valid file's bytes with one kind of damage."""
    header, data = split(blob)
    names = [k for k in header if k != "__metadata__"]
    kind = draw(
        st.sampled_from(
            ["truncate", "flip", "append", "entry_field", "missing", "extra", "not_object", "metadata"]
        )
    )
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "flip":
        b = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, min(len(b), 8 + 64 + len(json.dumps(header))) - 1))
            b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    if kind == "append":
        return blob + draw(st.binary(min_size=1, max_size=16))
    if kind == "entry_field":  # a wrong dtype, shape or offsets, or a field replaced by any JSON value
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(
            st.sampled_from(["F32", "BF16", "I8", "Q4", "F8_E5M2"])
            if field == "dtype"
            else st.lists(st.integers(-3, 2**40), max_size=4) | json_values
        )
    elif kind == "missing":
        header.pop(draw(st.sampled_from(names)))
    elif kind == "extra":
        header[draw(st.text(max_size=8))] = {
            "dtype": "F32",
            "shape": draw(st.lists(st.integers(0, 3), max_size=2)),
            "data_offsets": draw(st.lists(st.integers(0, len(data) + 8), min_size=2, max_size=2)),
        }
    elif kind == "not_object":
        header = draw(st.lists(json_values, max_size=3) | st.integers() | st.text() | st.none())
    else:
        header["__metadata__"] = draw(json_values)
    return join(header, data)


@FAST
@given(data=st.data())
def test_safetensors_reader_refuses_or_reads_exactly(tmp_path, data):
    tensors = data.draw(tensor_dicts())
    blob = file_bytes(tensors, tmp_path)
    bad = data.draw(corruptions(blob))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad)
    try:
        with SafetensorsFile(path) as f:
            got = {k: f.read(k) for k in f.keys()}
    except CorruptFileError as e:
        assert "\n" not in str(e)
        return
    # Accepted: every tensor reads back as declared, and the ranges tile the data exactly.
    header, rest = split(bad)
    header.pop("__metadata__", None)
    assert sum(a.nbytes for a in got.values()) == len(rest)
    for k, a in got.items():
        assert a.shape == tuple(header[k]["shape"])
        if bad[: len(blob)] == blob and k in tensors:
            np.testing.assert_array_equal(a.view(np.uint8), tensors[k].view(np.uint8))


@pytest.mark.parametrize(
    "header",
    [
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},  # overlap
        {"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},  # negative dims, product 2
        {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},  # float dims
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": ["x"]},
        {"a": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 8]}},  # overflows int64
    ],
)  # fmt: skip
def test_safetensors_named_cases(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(join(header, bytes(12 if "b" in header else 8)))
    with pytest.raises(CorruptFileError):
        SafetensorsFile(path)


# ---------------------------------------------------------------------------------------------------------
# The tiny pipeline, converted once: convert, sample, LoRA and checkpoint cases run against it.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_components import make_tiny_sd3_pipeline

    from sd3_jax.cli import main

    root = tmp_path_factory.mktemp("fuzz")
    make_tiny_sd3_pipeline(root / "diffusers", seed=0, with_t5=True)
    args = ["convert", str(root / "diffusers"), "--out", str(root / "ckpt"), "--dtype", "fp32"]
    assert main(args + ["--no-progress"]) == 0
    return root


def outputs(d) -> list[str]:
    return sorted(p for p in os.listdir(d) if p != "in")


def refused_or_wrote(capsys, args: list[str], d, written: list[str]) -> None:
    """The CLI exits 2 with one error line and nothing new in `d`, or 0 having written exactly `written`."""
    from sd3_jax.cli import main

    capsys.readouterr()
    rc = main(args)
    event(f"exit {rc}")
    if rc == 2:
        one_line_error(capsys)
        assert outputs(d) == []
    else:
        assert rc == 0 and outputs(d) == written


@SLOW
@given(data=st.data())
def test_convert_of_a_damaged_transformer_file(tiny, tmp_path_factory, data, capsys):
    """`sd3-jax convert` on the diffusers transformer file with generated damage: exit 0, or 2 with one
    line and nothing under --out's folder."""

    src = tiny / "diffusers" / "transformer" / "diffusion_pytorch_model.safetensors"
    d = tmp_path_factory.mktemp("convert")
    (d / "in").mkdir()
    bad = d / "in" / "transformer.safetensors"
    bad.write_bytes(data.draw(corruptions(src.read_bytes())))
    refused_or_wrote(capsys, ["convert", str(bad), "--out", str(d / "out"), "--no-progress"], d, ["out"])


# ---------------------------------------------------------------------------------------------------------
# sd3-jax checkpoints (Orbax folders and the manifest).


@st.composite
def checkpoint_damage(draw, ckpt):
    """A function that damages a copy of `ckpt` in one of the ways a download or a disk does."""
    files = sorted(os.path.relpath(os.path.join(dp, f), ckpt) for dp, _, fs in os.walk(ckpt) for f in fs)
    components = sorted(p for p in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, p)))
    kind = draw(st.sampled_from(["delete", "truncate", "garbage", "rmdir", "manifest", "other_model"]))
    name = draw(st.sampled_from(components if kind == "rmdir" else files))
    cut = draw(st.floats(0, 0.99))
    junk = draw(st.binary(min_size=1, max_size=64))
    field = draw(st.sampled_from(["format", "components", "kind", "config", "field"]))
    value = draw(json_values)

    def damage(c):
        import shutil

        p = os.path.join(c, name)
        if kind == "delete":
            os.remove(p)
        elif kind == "truncate":
            with open(p, "r+b") as f:
                f.truncate(int(os.path.getsize(p) * cut))
        elif kind == "garbage":
            with open(p, "r+b") as f:
                f.seek(int(os.path.getsize(p) * cut))
                f.write(junk)
        elif kind == "rmdir":
            shutil.rmtree(p)
        else:
            m = os.path.join(c, "sd3_jax.json")
            with open(m) as f:
                manifest = json.load(f)
            t = manifest["components"]["transformer"]
            if kind == "other_model":  # a manifest written for another size of the model
                t["config"]["head_dim"] = t["config"]["head_dim"] * 2
            elif field in ("format", "components"):
                manifest[field] = value
            elif field in ("kind", "config"):
                t[field] = value
            else:
                t["config"][draw_key] = value
            with open(m, "w") as f:
                json.dump(manifest, f)

    draw_key = draw(
        st.sampled_from(["depth", "patch_size", "dtype", "qk_norm", "dual_attention_layers", "nonsense"])
    )
    return damage


@SLOW
@given(data=st.data())
def test_sample_from_a_damaged_checkpoint(tiny, tmp_path_factory, data, capsys):
    import shutil

    d = tmp_path_factory.mktemp("ckpt")
    shutil.copytree(tiny / "ckpt", d / "in")
    data.draw(checkpoint_damage(str(tiny / "ckpt")))(str(d / "in"))
    args = ["sample", "--checkpoint", str(d / "in"), "--prompt", "a cat", "--size", "8x8", "--steps", "1"]
    refused_or_wrote(capsys, args + ["--out", str(d / "x.png"), "--no-progress"], d, ["x.png"])


# ---------------------------------------------------------------------------------------------------------
# LoRA files.


@pytest.fixture(scope="module")
def lora_case():
    """The tiny MMDiT's config and random params, and a random rank-2 LoRA in diffusers' layout."""
    import jax

    from sd3_jax.convert.lora import lora_to_diffusers
    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.lora import LoraConfig, init_lora
    from sd3_jax.nn.mmdit import MMDiTConfig

    cfg = MMDiTConfig.tiny()
    r = np.random.default_rng(0)
    rand = lambda s: (r.standard_normal(s.shape) * 0.05).astype(np.float32)
    params = jax.tree.map(rand, abstract_params(cfg))
    lora = jax.eval_shape(lambda k: init_lora(k, params, LoraConfig(rank=2)), jax.random.key(0))
    other = MMDiTConfig.tiny().replace(head_dim=MMDiTConfig.tiny().head_dim * 2)
    other_lora = jax.eval_shape(
        lambda k: init_lora(k, jax.tree.map(rand, abstract_params(other)), LoraConfig(rank=2)),
        jax.random.key(0),
    )
    sd = lora_to_diffusers(jax.tree.map(rand, lora), cfg)
    return cfg, params, sd, lora_to_diffusers(jax.tree.map(rand, other_lora), other)


@st.composite
def lora_damage(draw, sd, other):
    sd = dict(sd)
    key = draw(st.sampled_from(sorted(sd)))
    module = key.rsplit(".lora_", 1)[0]
    kind = draw(
        st.sampled_from(["drop", "unknown", "shape", "dtype", "values", "alpha", "other_model", "rank0"])
    )
    if kind == "drop":
        del sd[key]
    elif kind == "unknown":
        sd[draw(st.text(max_size=20)) + draw(st.sampled_from([".lora_A.weight", ".alpha", ""]))] = np.ones(2)
    elif kind == "shape":
        shape = tuple(draw(st.lists(st.integers(0, 70), max_size=3)))
        sd[key] = np.ones(shape, np.float32)
    elif kind == "dtype":
        sd[key] = sd[key].astype(draw(st.sampled_from([np.int8, np.bool_, np.float16, np.int64])))
    elif kind == "values":
        a = sd[key].copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        sd[key] = a
    elif kind == "alpha":
        sd[module + ".alpha"] = np.asarray(
            draw(st.lists(st.floats(), max_size=3) | st.floats(allow_nan=True)), np.float64
        )
    elif kind == "other_model":
        return dict(other)
    else:
        sd[module + ".lora_A.weight"] = np.zeros((0, sd[module + ".lora_A.weight"].shape[1]), np.float32)
        sd[module + ".lora_B.weight"] = np.zeros((sd[module + ".lora_B.weight"].shape[0], 0), np.float32)
    return sd


@MEDIUM
@given(data=st.data())
def test_lora_import_refuses_or_fits(lora_case, data):
    from sd3_jax.convert.lora import import_lora
    from sd3_jax.convert.mapping import CheckpointError
    from sd3_jax.lora import apply_lora

    cfg, params, sd, other = lora_case
    bad = data.draw(lora_damage(sd, other))
    try:
        lora = import_lora(bad, cfg)
    except CheckpointError as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("accepted")
    merged = apply_lora(params, [(lora, 1.0)])  # fits the model: applying it works and stays finite
    assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(merged))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@MEDIUM
@given(
    meta=st.text(max_size=40)
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {},
        optional={
            "transformer.lora_alpha": json_values,
            "transformer.alpha_pattern": st.dictionaries(st.text(max_size=12), json_values, max_size=3),
            "transformer.use_rslora": json_values,
            "transformer.use_dora": st.booleans(),
        },
    ).map(json.dumps)
)
def test_lora_metadata_refuses_or_reads(lora_case, tmp_path, meta):
    from sd3_jax.convert.lora import METADATA_KEY, import_lora
    from sd3_jax.convert.mapping import CheckpointError

    cfg, _, sd, _ = lora_case
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, sd, metadata={METADATA_KEY: meta})
    try:
        import_lora(path, cfg)
    except CheckpointError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------------------------------------------------
# `--set` overrides.


def _dotted_fields(obj, prefix=""):
    import dataclasses

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        yield prefix + f.name
        if dataclasses.is_dataclass(v):
            yield from _dotted_fields(v, prefix + f.name + ".")


def _numbers_finite(obj) -> bool:
    import dataclasses
    import math

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not _numbers_finite(v):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
    return True


FIELD_NAMES = sorted(
    _dotted_fields(__import__("sd3_jax.train.config", fromlist=["TrainConfig"]).TrainConfig())
)
override_values = (
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "0.5", "2", "1e30", "-1e-9", "true", "none", ""])
    | st.sampled_from(["sd3_medium", "sd35_large", "tiny", "cosine", "lora", "(1,2)", "[0.5, 2]", "x,y"])
    | st.integers(-(2**40), 2**40).map(str)
    | st.floats().map(str)
    | st.text(max_size=10)
)


@MEDIUM
@given(
    key=st.sampled_from(FIELD_NAMES) | st.text(max_size=12) | st.sampled_from(["model.x", "optim", "a.b.c"]),
    value=override_values,
    sep=st.sampled_from(["=", "=", " = ", ":"]),
)
def test_set_overrides_refuse_or_build(key, value, sep):
    """An override is refused in one line (ValueError), or gives a config whose numbers are finite and
    whose model and optimizer build (abstractly, on the data's shapes)."""
    import jax
    import jax.numpy as jnp

    from sd3_jax.nn.mmdit import MMDiT
    from sd3_jax.train.config import TrainConfig, apply_overrides
    from sd3_jax.train.state import init_params, make_optimizer

    try:
        cfg = apply_overrides(TrainConfig(), [f"{key}{sep}{value}"])
    except ValueError as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("accepted")
    assert _numbers_finite(cfg)
    m = cfg.model.replace(remat="none")
    params = jax.eval_shape(lambda k: init_params(m, k), jax.random.key(0))
    jax.eval_shape(make_optimizer(cfg.optim, cfg.steps).init, params)
    n, d = cfg.data.latent_size, cfg.data
    out = jax.eval_shape(
        lambda p: MMDiT(m).apply(
            {"params": p},
            jnp.zeros((1, n, n, m.in_channels)),
            jnp.zeros((1,)),
            jnp.zeros((1, 2 * d.text_len + d.t5_len, m.context_dim)),
            jnp.zeros((1, m.pooled_dim)),
        ),
        params,
    )
    assert out.shape == (1, n, n, m.out_channels)


# ---------------------------------------------------------------------------------------------------------
# `sample` arguments.


SAMPLE_ARGS = {  # (good values, bad values) of each argument
    "size": (["8x8"], ["0x0", "16x16", "9x8", "-8x8", "1000000x8", "8", "axb", "8x8x8", "8.5x8"]),
    "steps": (["1", "2"], ["0", "-1", "-2"]),
    "cfg": (["1", "4.5"], ["nan", "inf", "-inf", "-1"]),
    "num_images": (["1", "2"], ["0", "-1"]),
}


@st.composite
def sample_args(draw):
    """The sample arguments with none, or one, of them bad; and a prompt."""
    bad = draw(st.sampled_from([None, None, *SAMPLE_ARGS]))
    args = {k: draw(st.sampled_from(v[k == bad])) for k, v in SAMPLE_ARGS.items()}
    prompt = draw(
        st.sampled_from(["", "a cat", " ".join(["cat"] * 10_000), "\x00\n\t"]) | st.text(max_size=30)
    )
    return bad, args, prompt


@SLOW
@given(case=sample_args())
def test_sample_arguments(tiny, tmp_path_factory, capsys, case):
    """Bad sizes, steps, guidance and image counts are one error line and exit 2 with no image written;
    any prompt samples (empty ones unconditionally, long ones truncated to each encoder's length as in
    diffusers)."""
    bad, a, prompt = case
    size, steps, cfg, num_images = a["size"], a["steps"], a["cfg"], int(a["num_images"])
    from sd3_jax.cli import main

    d = tmp_path_factory.mktemp("sample")
    good = bad is None
    capsys.readouterr()
    args = ["sample", "--checkpoint", str(tiny / "ckpt"), "--prompt", prompt, "--size", size, "--steps"]
    args += [steps, "--cfg", cfg, "--num-images", str(num_images), "--out", str(d / "x.png")]
    try:
        rc = main(args + ["--no-progress"])
    except SystemExit as e:  # argparse's own errors (`--size -8x8` reads as an option)
        rc = e.code
    event(f"exit {rc}")
    if good:
        assert rc == 0, capsys.readouterr().err
        assert sorted(os.listdir(d)) == (["x.png"] if num_images == 1 else ["x-0.png", "x-1.png"])
    else:
        assert rc == 2
        one_line_error(capsys)
        assert os.listdir(d) == []


# ---------------------------------------------------------------------------------------------------------
# Training data: image folders and JSONL files.


def _image_bytes(kind: str, w: int, h: int, seed: int) -> bytes:
    import io

    from PIL import Image

    r = np.random.default_rng(seed)
    rgb = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if kind in ("corrupt", "empty"):
        return b"" if kind == "empty" else bytes(r.integers(0, 256, 64, dtype=np.uint8))
    if kind == "huge":  # a PNG header claiming 20000 x 20000 pixels: a decompression bomb
        Image.new("1", (8, 8)).save(buf, "PNG")
        b = bytearray(buf.getvalue())
        b[16:24] = struct.pack(">II", 20000, 20000)
        return bytes(b)
    im = {
        "rgb": lambda: Image.fromarray(rgb),
        "rgba": lambda: Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "grey": lambda: Image.fromarray(rgb[..., 0]),
        "grey16": lambda: Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
        "palette": lambda: Image.fromarray(rgb).convert("P"),
        "bilevel": lambda: Image.fromarray(rgb[..., 0]).convert("1"),
        "cmyk": lambda: Image.fromarray(rgb).convert("CMYK"),
        "truncated": lambda: Image.fromarray(rgb),
    }[kind]()
    im.save(buf, "JPEG" if kind == "cmyk" else "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


IMAGE_KINDS = [
    "rgb",
    "rgba",
    "grey",
    "grey16",
    "palette",
    "bilevel",
    "cmyk",
    "truncated",
    "corrupt",
    "empty",
    "huge",
]
BAD_IMAGES = {"truncated", "corrupt", "empty", "huge"}


@MEDIUM
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(IMAGE_KINDS),
            st.integers(1, 40),
            st.integers(1, 40),
            st.text(max_size=20) | st.binary(max_size=20),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_image_folder_items_are_read_or_skipped(tmp_path_factory, items):
    """Every image of a folder is read as uint8 RGB of its size, or skipped with the documented reason:
    corrupt_image for undecodable files, empty_caption for blank captions; a non-UTF-8 caption is read
    with replacement characters. A 16-bit greyscale image keeps its values (v / 257), not clipped."""
    from sd3_jax.data.sources import ImageCaptionFolder

    d = tmp_path_factory.mktemp("images")
    for i, (kind, w, h, caption) in enumerate(items):
        (d / f"{i}.png").write_bytes(_image_bytes(kind, w, h, i))
        (d / f"{i}.txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    src = ImageCaptionFolder(d)
    assert len(src) == len(items)
    for i, (kind, w, h, caption) in enumerate(items):
        rec = src[i]
        text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
        if not text.strip():
            assert rec == {"skip": True, "reason": "empty_caption", "index": i, "path": str(d / f"{i}.png")}
        elif kind in BAD_IMAGES:
            assert rec["skip"] and rec["reason"] == "corrupt_image", rec
        else:
            assert rec["image"].dtype == np.uint8 and rec["image"].shape == (h, w, 3), kind
            assert rec["caption"] == text.strip()
            if kind == "grey16":
                grey = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)[..., 0]
                np.testing.assert_array_equal(rec["image"][..., 0], grey)


@MEDIUM
@given(lines=st.lists(st.text(max_size=40) | json_values.map(json.dumps), max_size=6))
def test_jsonl_lines_are_read_or_left_out(tmp_path_factory, lines):
    """Any line of a JSONL file is an item (an object with string "image" and "caption") or left out with
    reason bad_line or missing_caption; blank lines are ignored."""
    from sd3_jax.data.sources import JsonlSource

    d = tmp_path_factory.mktemp("jsonl")
    lines = [ln.replace("\n", " ").replace("\r", " ") for ln in lines]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    src = JsonlSource(d / "data.jsonl")
    assert len(src) + len(src.skipped) == sum(1 for ln in lines if ln.strip())
    assert {r for _, r in src.skipped} <= {"bad_line", "missing_caption"}
    for i in range(len(src)):
        rec = src[i]
        assert rec.get("reason") in (None, "missing_image", "corrupt_image", "empty_caption"), rec


def test_prepare_counts_bad_images_and_writes_the_rest(tiny, tmp_path, capsys):
    """`sd3-jax prepare` on a folder holding one image of every kind writes the good ones and counts the
    bad ones per reason."""
    from sd3_jax.cli import main

    d = tmp_path / "images"
    d.mkdir()
    for i, kind in enumerate(IMAGE_KINDS):
        (d / f"{i:02d}.png").write_bytes(_image_bytes(kind, 12, 9, i))
        (d / f"{i:02d}.txt").write_text("a picture")
    (d / "blank.png").write_bytes(_image_bytes("rgb", 8, 8, 0))
    (d / "blank.txt").write_bytes(b"  \n")
    (d / "latin1.png").write_bytes(_image_bytes("rgb", 8, 8, 0))
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    args = ["prepare", str(d), "--checkpoint", str(tiny / "ckpt"), "--out", str(tmp_path / "rec")]
    assert main(args + ["--size", "8", "--batch-size", "4", "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    good = len(IMAGE_KINDS) - len(BAD_IMAGES) + 1
    assert f"{good} examples, {len(BAD_IMAGES) + 1} skipped" in out, out
    assert "'corrupt_image': 4" in out and "'empty_caption': 1" in out, out


# ---------------------------------------------------------------------------------------------------------
# Good input: no noise.


def test_good_input_prints_no_warnings(tiny, tmp_path, capfd):
    """convert, sample and train on good input print their results and nothing on stderr, and raise no
    warning a normal run would show."""
    from conftest import shown_warnings

    from sd3_jax.cli import main

    smoke = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "smoke.py"
    )
    capfd.readouterr()
    with shown_warnings() as caught:
        assert main(["convert", str(tiny / "diffusers"), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
        args = ["sample", "--checkpoint", str(tmp_path / "c"), "--prompt", "a cat", "--size", "8x8"]
        assert main(args + ["--steps", "2", "--out", str(tmp_path / "x.png"), "--no-progress"]) == 0
        args = ["train", "--config", smoke, "--workdir", str(tmp_path / "wd"), "--no-progress"]
        assert main(args + ["--set", "steps=2", "--set", "eval_every=2"]) == 0
    std = capfd.readouterr()
    assert std.err == "" and not caught, (std.err, [str(w.message) for w in caught])
    assert "wrote" in std.out
