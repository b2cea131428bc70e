"""Behaviour of the procedural shapes data and its checker (sd3_jax/data/shapes.py).

Accuracy numbers are printed (run with -s); the asserts hold what was measured on these seeds.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from sd3_jax.data import shapes

SIZES = (16, 32, 64)


def _specs(seed: int, size: int, two_objects_prob: float = 0.5) -> list[shapes.ShapeSpec]:
    rng = np.random.default_rng(seed)
    return shapes.sample_specs(rng, two_objects_prob, size_word_prob=0.5 if size >= 32 else 0.0)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, zero padded."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    x = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(x, pad)
        x = sum(k[i] * np.take(p, np.arange(i, i + x.shape[axis]), axis=axis) for i in range(2 * r + 1))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noisy = image + np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_caption_round_trip():
    for seed in range(300):
        specs = shapes.sample_specs(np.random.default_rng(seed), 0.5, size_word_prob=0.5)
        text = shapes.caption(specs)
        assert shapes.parse_caption(text) == specs
        assert shapes.parse_caption("  " + text.upper() + ". ") == specs
    text = "a small red circle in the top left and a blue triangle in the bottom right"
    assert shapes.parse_caption(text) == [
        shapes.ShapeSpec("red", "circle", "top left", "small"),
        shapes.ShapeSpec("blue", "triangle", "bottom right"),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("a purple circle in the top left", "unknown color 'purple'"),
        ("a red hexagon in the top left", "unknown shape 'hexagon'"),
        ("a red circle in the middle left", "unknown position 'middle left'"),
        ("a huge red circle in the top left", "unknown size 'huge'"),
        ("a red circle in the top", "expected 'a"),
        ("red circle in the top left", "expected 'a"),
        ("a red circle at the top left", "expected 'a"),
        ("a red circle in the top left and", "expected 'a"),
        ("a red circle in the top left and a blue square in the top left", "share a position"),
    ],
)
def test_parse_caption_rejects_outside_grammar(text, message):
    with pytest.raises(ValueError, match=message):
        shapes.parse_caption(text)


def test_render_draws_filled_objects_on_black():
    specs = [
        shapes.ShapeSpec("red", "square", "top left"),
        shapes.ShapeSpec("blue", "circle", "bottom right"),
    ]
    image = shapes.render(specs, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    colors = {tuple(c) for c in image.reshape(-1, 3)}
    assert colors == {(0, 0, 0), shapes.COLORS["red"], shapes.COLORS["blue"]}
    assert (image[:16, :16] == shapes.COLORS["red"]).all(-1).any()
    assert (image[16:, 16:] == shapes.COLORS["blue"]).all(-1).any()
    assert not image[:16, 16:].any() and not image[16:, :16].any()
    with pytest.raises(ValueError, match="share a position"):
        shapes.render(specs + [shapes.ShapeSpec("green", "circle", "top left")])
    with pytest.raises(ValueError, match="size words"):
        shapes.render([shapes.ShapeSpec("red", "square", "top left", "small")], 16)


def test_determinism_from_seed():
    specs = _specs(3, 32)
    assert np.array_equal(shapes.render(specs, 32, 7), shapes.render(specs, 32, 7))
    assert not all(
        np.array_equal(shapes.render(specs, 32, 7), shapes.render(specs, 32, s)) for s in range(8, 12)
    )
    a, b, c = (
        shapes.ShapesDataset(1, 32, 100),
        shapes.ShapesDataset(1, 32, 100),
        shapes.ShapesDataset(2, 32, 100),
    )
    for i in (0, 5, 99):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert [a[i]["caption"] for i in range(20)] != [c[i]["caption"] for i in range(20)]
    assert shapes.prompts("seen", 10, seed=4) == shapes.prompts("seen", 10, seed=4)
    assert shapes.holdout_combos(0) == shapes.holdout_combos(0) != shapes.holdout_combos(1)
    with pytest.raises(IndexError):
        a[100]


@pytest.mark.parametrize("size", SIZES)
def test_checker_accepts_clean_renders(size):
    n = 150
    passed = 0
    for seed in range(n):
        specs = _specs(seed, size)
        passed += shapes.check(shapes.render(specs, size, seed), shapes.caption(specs))
    print(f"\n{size}px clean renders accepted: {passed}/{n}")
    assert passed == n


@pytest.mark.parametrize("size", SIZES)
def test_checker_rejects_changed_attribute(size):
    rng = np.random.default_rng(size)
    rejected = {a: [0, 0] for a in ("color", "shape", "position", "size", "dropped object")}
    for seed in range(60):
        specs = _specs(seed, size)
        image = shapes.render(specs, size, seed)
        j = int(rng.integers(len(specs)))
        spec, used = specs[j], {s.position for s in specs}
        changes = {
            "color": [c for c in shapes.COLORS if c != spec.color],
            "shape": [s for s in shapes.SHAPES if s != spec.shape],
            "position": [p for p in shapes.POSITIONS if p not in used],
            "size": [{"small": "large", "large": "small"}[spec.size]] if spec.size else [],
        }
        for attr, values in changes.items():
            if values:
                wrong = list(specs)
                wrong[j] = dataclasses.replace(spec, **{attr: values[rng.integers(len(values))]})
                rejected[attr][0] += not shapes.check(image, wrong)
                rejected[attr][1] += 1
        if len(specs) == 2:  # an extra object of full size fails the single-object caption
            rejected["dropped object"][0] += not shapes.check(image, specs[:1])
            rejected["dropped object"][1] += 1
    print(f"\n{size}px rejected: " + ", ".join(f"{a} {r}/{n}" for a, (r, n) in rejected.items()))
    for attr, (r, n) in rejected.items():
        assert r == n, attr


@pytest.mark.parametrize("size", SIZES)
def test_checker_robust_to_noise_and_blur(size):
    """Gaussian noise of sigma 20 (of 255) per channel, Gaussian blur of sigma 0.7 px, and both (blur 0.5)."""
    n = 50
    corrupt = {
        "noise 20": lambda im, s: _noise(im, 20.0, s),
        "blur 0.7": lambda im, s: _blur(im, 0.7),
        "blur 0.5 + noise 20": lambda im, s: _noise(_blur(im, 0.5), 20.0, s),
    }
    rates = {}
    for name, fn in corrupt.items():
        passed = 0
        for seed in range(n):
            specs = _specs(seed, size)
            passed += shapes.check(fn(shapes.render(specs, size, seed), seed), specs)
        rates[name] = passed / n
    print(f"\n{size}px accepted under corruption: {rates}")
    assert min(rates.values()) >= 0.98


def test_checker_ignores_specks_and_reads_floats():
    specs = [shapes.ShapeSpec("green", "triangle", "top right", "large")]
    image = shapes.render(specs, 32, 0)
    specked = image.copy()
    specked[2, 2] = specked[29, 3] = specked[20, 12] = (255, 255, 255)  # lone pixels, under speck size
    assert shapes.check(specked, specs)
    assert shapes.check(image.astype(np.float32) / 255.0, shapes.caption(specs))
    assert not shapes.check(np.zeros_like(image), specs)
    blob = image.copy()
    blob[20:26, 4:10] = (200, 200, 200)  # a grey square, of no colour, is an extra object
    report = shapes.check_details(blob, specs)
    assert report.objects[0].ok and len(report.extra) == 1 and report.extra[0].color is None
    assert not report.ok


def test_check_details_names_the_failing_attribute():
    specs = [
        shapes.ShapeSpec("red", "circle", "bottom left", "small"),
        shapes.ShapeSpec("yellow", "square", "top left"),
    ]
    image = shapes.render(specs, 64, 5)
    report = shapes.check_details(
        image, "a small blue circle in the bottom left and a yellow square in the top left"
    )
    first, second = report.objects
    assert (first.color, first.shape, first.position, first.size) == (False, True, True, True)
    assert second.ok and not report.extra and not report.ok
    assert first.component.color == "red" and first.component.shape == "circle"
    with pytest.raises(ValueError, match="size words"):
        shapes.check(np.zeros((16, 16, 3), np.uint8), "a small red circle in the top left")


def test_adherence():
    ds = shapes.ShapesDataset(seed=3, size=32, length=8)
    items = [ds[i] for i in range(8)]
    images = np.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    assert shapes.adherence(images, captions) == 1.0
    assert shapes.adherence(images, captions[4:] + captions[:4]) < 0.5


def test_connected_components():
    mask = np.zeros((7, 9), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[1:6, 4] = mask[5, 4:9] = mask[1:6, 8] = True  # a U, labelled from both arms
    mask[6, 0] = True
    labels, n = shapes.connected_components(mask)
    assert n == 3
    assert labels[0, 0] == labels[1, 1] == 0 and labels[1, 4] == labels[1, 8] == 1 and labels[6, 0] == 2
    assert (labels[~mask] == -1).all()
    labels, n = shapes.connected_components(np.zeros((4, 4), bool))
    assert n == 0 and (labels == -1).all()


def test_holdout_never_in_training():
    held = shapes.holdout_combos()
    assert len(held) == 8 and held <= set(shapes.ALL_COMBOS)
    seen = set(shapes.ALL_COMBOS) - held
    for i, j in ((0, 1), (0, 2), (1, 2)):  # held out pairs are distinct, so every pair is still seen
        assert len({(c[i], c[j]) for c in held}) == len(held)
        assert {(c[i], c[j]) for c in seen} == {(c[i], c[j]) for c in shapes.ALL_COMBOS}
    ds = shapes.ShapesDataset(seed=0, size=16, length=4000, size_word_prob=0.0)
    drawn = set()
    for i in range(0, len(ds), 2):
        drawn |= {s.combo for s in shapes.parse_caption(ds[i]["caption"])}
    assert drawn.isdisjoint(held) and drawn == seen  # and every seen combination comes up
    for text in shapes.prompts("held_out", 50, seed=1, two_objects_prob=0.5):
        assert {s.combo for s in shapes.parse_caption(text)} <= held
    for text in shapes.prompts("seen", 50, seed=1, two_objects_prob=0.5, size_word_prob=0.5):
        assert {s.combo for s in shapes.parse_caption(text)}.isdisjoint(held)
    with pytest.raises(ValueError, match="split"):
        shapes.prompts("test", 1)
    with pytest.raises(ValueError, match="size_word_prob"):
        shapes.ShapesDataset(size=16)


def test_grain_pipeline():
    grain = pytest.importorskip("grain")
    ds = shapes.ShapesDataset(seed=0, size=32, length=64)
    copy = pickle.loads(pickle.dumps(ds))  # grain's worker processes need a picklable source
    assert repr(copy) == repr(ds) and copy[3]["caption"] == ds[3]["caption"]
    batches = list(grain.MapDataset.source(ds).shuffle(seed=1).batch(16))
    assert len(batches) == 4
    assert batches[0]["image"].shape == (16, 32, 32, 3) and batches[0]["image"].dtype == np.uint8
    assert sorted(c for b in batches for c in b["caption"]) == sorted(ds[i]["caption"] for i in range(64))
    loader = grain.DataLoader(
        data_source=ds,
        sampler=grain.samplers.IndexSampler(len(ds), shuffle=True, seed=0, num_epochs=1),
        operations=[grain.transforms.Batch(batch_size=8, drop_remainder=True)],
        worker_count=0,
    )
    first = [b for b in loader]
    assert len(first) == 8 and first[0]["image"].shape == (8, 32, 32, 3)
    again = next(iter(loader))
    assert np.array_equal(again["image"], first[0]["image"])
