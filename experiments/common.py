"""Shared pieces of the small-scale studies: shapes data, training runs, sampling any formulation,
prompt adherence and a Frechet distance on pixel statistics, and PIL plots."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sd3_jax import demo  # noqa: E402
from sd3_jax.data import shapes  # noqa: E402
from sd3_jax.flow import losses, samplers, schedules  # noqa: E402
from sd3_jax.nn.mmdit import MMDiT  # noqa: E402
from sd3_jax.train.config import TrainConfig  # noqa: E402

FORMS = {
    "rectified_flow": losses.RectifiedFlow,
    "ldm_linear": losses.LDMLinear,
    "cosine": losses.Cosine,
    "edm": losses.EDM,
}


def study_config(steps: int, prefix: str, **kw) -> TrainConfig:
    """The demo's network, data and optimizer for the studies, with the paper's per-encoder text dropout of
    46.4% and no timestep shift (the studies vary the density and the sampler themselves)."""
    return dataclasses.replace(demo.train_config(steps, prefix), text_dropout=0.464, shift=1.0, **kw)


def data(root: str, examples: int, seed: int = 0):
    """Prepared shapes records (shared by every run of a study) and the frozen text encoders."""
    text = demo.text_encoders(os.path.join(root, "tokenizers"), seed)
    prefix = os.path.join(root, "data", "shapes")
    if not os.path.exists(prefix + ".json"):
        demo.prepare(text, prefix, examples, seed)
        demo.prepare(text, prefix + "-val", 256, seed + 10**6)
    return text, prefix


def run(cfg: TrainConfig, workdir: str) -> tuple[Any, list[dict]]:
    """Trains (or resumes) and returns (EMA params, metrics)."""
    from sd3_jax.train.loop import train
    from sd3_jax.train.report import read_metrics

    state = train(cfg, workdir, progress=False)
    return jax.device_get(state.ema_params), read_metrics(workdir)


@functools.partial(jax.jit, static_argnames=("model_cfg", "form_name", "sampler"))
def _sample(params, x, sigmas, cond, uncond, scale, *, model_cfg, form_name, sampler):
    form = FORMS[form_name]()
    model = MMDiT(model_cfg)

    def net(x_in, t_in, context, pooled):
        return model.apply(
            {"params": params}, x_in, jnp.broadcast_to(t_in, (x_in.shape[0],)), context, pooled
        )

    model_fn = losses.as_velocity_fn(form, net)
    vf = samplers.cfg(model_fn, scale, cond, uncond)
    return samplers.SAMPLERS[sampler](vf, x, sigmas)


def rf_sigma_max(form_name: str) -> float:
    """Where sampling starts in rectified-flow time: 1 for RF, the schedule's last level otherwise."""
    form = FORMS[form_name]()
    return float(form.rf_sigma(jnp.float32(1.0 - 1e-4) if form_name != "rectified_flow" else 1.0))


def sample(
    params,
    model_cfg,
    form_name: str,
    text,
    captions: list[str],
    steps: int = 25,
    cfg_scale: float = 4.0,
    shift: float = 1.0,
    seed: int = 0,
    sampler: str = "euler",
) -> np.ndarray:
    """uint8 images for `captions` from a model of any formulation (Euler in rectified-flow coordinates)."""
    emb, neg, pooled, neg_pooled = text.encode_prompt(captions, "", max_sequence_length=0)
    smax = rf_sigma_max(form_name)
    sig = schedules.shift_sigmas(np.linspace(smax, 0.0, steps + 1, dtype=np.float32), shift)
    # Pure noise at rectified-flow level smax is smax * eps (the x0 part is dropped when smax < 1).
    x = jax.random.normal(jax.random.key(seed), (len(captions), demo.SIZE, demo.SIZE, 3)) * smax
    z = _sample(
        params,
        x,
        jnp.asarray(sig),
        {"context": emb, "pooled": pooled},
        {"context": neg, "pooled": neg_pooled},
        jnp.float32(cfg_scale),
        model_cfg=model_cfg,
        form_name=form_name,
        sampler=sampler,
    )
    return (np.clip(np.asarray(z) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def features(images: np.ndarray) -> np.ndarray:
    """Pixel statistics of each image: the 8x8 average-pooled RGB image (192 numbers) in [0, 1]."""
    x = images.astype(np.float32) / 255.0
    b, h, w, c = x.shape
    return x.reshape(b, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4)).reshape(b, -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits (FID's)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def real_images(captions: Sequence[str], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [shapes.render(shapes.parse_caption(c), demo.SIZE, seed=int(rng.integers(1 << 30))) for c in captions]
    )


def evaluate(params, model_cfg, form_name: str, text, n: int = 64, **kw) -> dict[str, float]:
    """Adherence on seen and held-out prompts, and the pixel Frechet distance to real images of them."""
    out = {}
    fake_all, caps_all = [], []
    for split in ("seen", "held_out"):
        caps = shapes.prompts(split, n, seed=1234)
        imgs = sample(params, model_cfg, form_name, text, caps, **kw)
        out[split] = shapes.adherence(imgs, caps)
        fake_all.append(imgs)
        caps_all += caps
    out["fd"] = frechet_distance(features(np.concatenate(fake_all)), features(real_images(caps_all)))
    return out


def with_model(cfg: TrainConfig, **model_kw) -> TrainConfig:
    return dataclasses.replace(cfg, model=cfg.model.replace(**model_kw))


def save_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: str,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> None:
    """Lines of (x, y) points, one colour per series, with a legend, drawn with PIL."""
    from PIL import Image, ImageDraw

    colors = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
    ]
    w, h, pad = 720, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    fx = (lambda x: np.log10(x)) if logx else (lambda x: x)
    xs = [fx(p[0]) for p in pts]
    ys = [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: pad + (w - 2 * pad) * (fx(x) - x0) / max(x1 - x0, 1e-12)
    sy = lambda y: h - pad - (h - 2 * pad) * (y - y0) / max(y1 - y0, 1e-12)
    d.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill="black")
    d.text((pad, 10), title, fill="black")
    d.text((w // 2 - 40, h - 20), xlabel + (" (log)" if logx else ""), fill="black")
    d.text((4, 30), ylabel, fill="black")
    d.text((4, pad - 6), f"{y1:.3g}", fill="black")
    d.text((4, h - pad - 6), f"{y0:.3g}", fill="black")
    d.text((pad - 10, h - pad + 6), f"{(10**x0 if logx else x0):.3g}", fill="black")
    d.text((w - pad - 30, h - pad + 6), f"{(10**x1 if logx else x1):.3g}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        s = sorted(s)
        if len(s) > 1:
            d.line([(sx(x), sy(y)) for x, y in s], fill=c, width=2)
        for x, y in s:
            d.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=c)
        d.text((w - pad - 150, pad + 14 * i), name, fill=c)
    img.save(path)
