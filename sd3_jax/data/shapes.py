"""Procedural captioned shapes for the from-scratch demo, and the checker that judges generated images.

Captions follow one grammar, `a [size] {color} {shape} in the {position}`, optionally joined by ` and `
for a second object in another quadrant. Objects are drawn filled on black, one per quadrant, with a
jitter of centre and radius drawn from a seed. The checker reads an image back: threshold brightness,
label 8-connected components, then per object test the hue of its mean colour, the quadrant of its
centroid, which filled template (disc, box, upward triangle) fitted to its bounding box overlaps it best
(IoU), and, if the caption has a size word, its area.

Measured on clean renders (tests/test_shapes.py) the checker accepts every image for its own caption at
16, 32 and 64 px and rejects every caption with one colour, shape, position or size word changed.
"""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
from collections.abc import Collection, Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),  # hue 0
    "yellow": (230, 230, 40),  # hue 60
    "green": (40, 210, 40),  # hue 120
    "blue": (50, 50, 240),  # hue 240
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
SIZES: tuple[str, ...] = ("small", "large")

# Object radius (half its bounding box side) as a fraction of the quadrant side, per size word; None is
# a caption without one. Radii are then clipped to [MIN_RADIUS_PX, what fits in the quadrant]: below about
# 3 px a rasterised disc can come out as a full square, so at 16 px every object has one size, 3-3.45 px.
RADIUS_RANGES: dict[str | None, tuple[float, float]] = {
    "small": (0.22, 0.28),
    "large": (0.38, 0.44),
    None: (0.22, 0.44),
}
MIN_RADIUS_PX = 3.0
MIN_SIZE_FOR_SIZE_WORDS = 32  # smaller images cannot draw "small" and "large" apart
AREA_PER_RADIUS2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area of each shape at radius 1
HUES: dict[str, float] = {
    c: colorsys.rgb_to_hsv(*np.divide(rgb, 255.0))[0] * 360.0 for c, rgb in COLORS.items()
}

Combo = tuple[str, str, str]  # (color, shape, position)
ALL_COMBOS: tuple[Combo, ...] = tuple(itertools.product(COLORS, SHAPES, POSITIONS))


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One object of a caption."""

    color: str  # a key of COLORS
    shape: str  # one of SHAPES
    position: str  # one of POSITIONS, the quadrant the object is drawn in
    size: str | None = None  # one of SIZES, or None for any size

    def __post_init__(self):
        for name, value, allowed in (
            ("color", self.color, tuple(COLORS)),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES + (None,)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    @property
    def combo(self) -> Combo:
        return (self.color, self.shape, self.position)


def caption(specs: Sequence[ShapeSpec]) -> str:
    """The caption of a list of objects, e.g. 'a red circle in the top left and a small blue square ...'."""
    if not specs:
        raise ValueError("a caption needs at least one object")
    parts = []
    for s in specs:
        words = ["a"] + ([s.size] if s.size else []) + [s.color, s.shape, "in", "the", s.position]
        parts.append(" ".join(words))
    return " and ".join(parts)


def parse_caption(text: str) -> list[ShapeSpec]:
    """Inverse of `caption`; case, surrounding spaces and a final period are ignored.

    Raises:
      ValueError: naming the clause and the word that falls outside the grammar.
    """
    clean = " ".join(text.lower().strip().rstrip(".").split())
    if not clean:
        raise ValueError("empty caption")
    specs = []
    for clause in clean.split(" and "):
        words = clause.split(" ")
        where = f"in clause {clause!r} of caption {text!r}"
        grammar = f"expected 'a [size] <color> <shape> in the <position>' {where}"
        if len(words) not in (7, 8) or words[0] != "a" or words[-4:-2] != ["in", "the"]:
            raise ValueError(grammar)
        size = words[1] if len(words) == 8 else None
        if size is not None and size not in SIZES:
            raise ValueError(f"unknown size {size!r} {where}; expected one of {SIZES}")
        color, shape, position = words[-6], words[-5], " ".join(words[-2:])
        if color not in COLORS:
            raise ValueError(f"unknown color {color!r} {where}; expected one of {tuple(COLORS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} {where}; expected one of {SHAPES}")
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r} {where}; expected one of {POSITIONS}")
        specs.append(ShapeSpec(color, shape, position, size))
    if len({s.position for s in specs}) != len(specs):
        raise ValueError(f"two objects share a position in caption {text!r}")
    return specs


# ---------------------------------------------------------------------------------------------------------
# Rendering and sampling.


def _quadrant_origin(position: str, q: float) -> tuple[float, float]:
    """(x, y) of the top-left corner of a position's quadrant of side q."""
    return (q if position.endswith("right") else 0.0, q if position.startswith("bottom") else 0.0)


def radius_range(size_word: str | None, image_size: int) -> tuple[float, float]:
    """(min, max) radius in pixels drawn for a size word in an image of this side."""
    q = image_size / 2
    # A gap over half a pixel on each side of the quadrant border keeps two objects from touching.
    r_max = q / 2 - max(0.55, 0.06 * q)
    lo, hi = RADIUS_RANGES[size_word]
    return (float(np.clip(lo * q, MIN_RADIUS_PX, r_max)), float(np.clip(hi * q, MIN_RADIUS_PX, r_max)))


def size_threshold(image_size: int) -> float:
    """Radius in pixels separating "small" from "large" objects: midway between their ranges."""
    return (radius_range("small", image_size)[1] + radius_range("large", image_size)[0]) / 2


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points in box coordinates (u, v in [-1, 1], v down) lie in the filled shape."""
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    return (np.abs(v) <= 1) & (np.abs(u) <= (v + 1) / 2)  # triangle, apex up, base as wide as it is tall


def render(
    specs: Sequence[ShapeSpec], size: int = 32, seed: int | np.random.Generator | None = None
) -> np.ndarray:
    """Draws the objects filled on black.

    Args:
      specs: the objects, at most one per position.
      size: side of the square image in pixels, at least 16 (32 for captions with size words).
      seed: source of the jitter of each object's radius (within `radius_range`) and centre (within
        its quadrant); None draws each object centred at the middle of its radius range.

    Returns:
      (size, size, 3) uint8 image.
    """
    if len({s.position for s in specs}) != len(specs):
        raise ValueError(f"two objects share a position: {specs}")
    if size < 16:
        raise ValueError(f"image size {size} is under 16 pixels")
    if size < MIN_SIZE_FOR_SIZE_WORDS and any(s.size for s in specs):
        raise ValueError(f"size words need images of {MIN_SIZE_FOR_SIZE_WORDS} pixels or more, not {size}")
    rng = None if seed is None else np.random.default_rng(seed)
    q = size / 2
    image = np.zeros((size, size, 3), np.uint8)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    r_max = radius_range(None, size)[1]
    for s in specs:
        lo, hi = radius_range(s.size, size)
        r = (lo + hi) / 2 if rng is None else rng.uniform(lo, hi)
        jitter = np.zeros(2) if rng is None else rng.uniform(-1, 1, 2) * (r_max - r)
        ox, oy = _quadrant_origin(s.position, q)
        u, v = (xs - (ox + q / 2 + jitter[0])) / r, (ys - (oy + q / 2 + jitter[1])) / r
        image[_inside(s.shape, u, v)] = COLORS[s.color]
    return image


def sample_specs(
    rng: np.random.Generator,
    two_objects_prob: float = 0.3,
    exclude: Collection[Combo] = (),
    allowed: Collection[Combo] | None = None,
    size_word_prob: float = 0.3,
) -> list[ShapeSpec]:
    """Draws one or two objects in distinct quadrants, each uniformly over the permitted combinations.

    Args:
      rng: numpy generator, advanced by the call.
      two_objects_prob: probability of a second object (when a permitted one fits in another quadrant).
      exclude: (color, shape, position) combinations never drawn.
      allowed: the combinations to draw from; None is all of them.
      size_word_prob: probability that each object carries a size word.
    """
    exclude = set(exclude)
    pool = [c for c in (ALL_COMBOS if allowed is None else allowed) if c not in exclude]
    if not pool:
        raise ValueError("no (color, shape, position) combination is left to sample")
    specs: list[ShapeSpec] = []
    n = 2 if rng.random() < two_objects_prob else 1
    for _ in range(n):
        free = [c for c in pool if c[2] not in {s.position for s in specs}]
        if not free:
            break
        combo = free[rng.integers(len(free))]
        size = SIZES[rng.integers(len(SIZES))] if rng.random() < size_word_prob else None
        specs.append(ShapeSpec(*combo, size=size))
    return specs


def holdout_combos(seed: int = 0, n: int = 8) -> frozenset[Combo]:
    """A fixed set of n (color, shape, position) combinations kept out of training.

    No two held-out combinations share a (color, shape), (color, position) or (shape, position) pair, so
    each pair still appears among the seen combinations: held-out prompts test composition of attribute
    pairs the model saw, not new words.
    """
    rng = np.random.default_rng(seed)
    for _ in range(10_000):
        picked = [ALL_COMBOS[i] for i in rng.choice(len(ALL_COMBOS), n, replace=False)]
        if all(len({(c[i], c[j]) for c in picked}) == n for i, j in ((0, 1), (0, 2), (1, 2))):
            return frozenset(picked)
    raise ValueError(f"cannot hold out {n} combinations without repeating an attribute pair")


def prompts(
    split: str,
    n: int,
    seed: int = 0,
    two_objects_prob: float = 0.0,
    size_word_prob: float = 0.0,
    holdout: Collection[Combo] | None = None,
) -> list[str]:
    """n captions whose objects all come from the 'seen' or the 'held_out' combinations.

    Args:
      split: 'seen' or 'held_out'.
      n: number of captions.
      seed: seed of the draw.
      two_objects_prob: probability of a second object per caption.
      size_word_prob: probability of a size word per object.
      holdout: the held-out combinations; None is `holdout_combos()`.
    """
    held = holdout_combos() if holdout is None else frozenset(holdout)
    if split == "seen":
        kwargs = dict(exclude=held)
    elif split == "held_out":
        kwargs = dict(allowed=sorted(held))
    else:
        raise ValueError(f"unknown split {split!r}; expected 'seen' or 'held_out'")
    rng = np.random.default_rng(seed)
    return [
        caption(sample_specs(rng, two_objects_prob, size_word_prob=size_word_prob, **kwargs))
        for _ in range(n)
    ]


class ShapesDataset:
    """Random-access captioned shapes; item i is a pure function of (seed, i).

    Any object with `__len__` and `__getitem__` is a grain `RandomAccessDataSource`, so this plugs into
    `grain.MapDataset.source(ds)` and `grain.DataLoader(data_source=ds, ...)`.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 32,
        length: int = 100_000,
        holdout: Collection[Combo] | None = None,
        two_objects_prob: float = 0.3,
        size_word_prob: float = 0.3,
    ):
        """Builds the source; nothing is drawn until an item is read.

        Args:
          seed: seed of the whole dataset; item i draws from numpy's generator seeded with (seed, i).
          size: image side in pixels.
          length: number of items.
          holdout: (color, shape, position) combinations never drawn; None is `holdout_combos()`.
          two_objects_prob: probability of a second object per image.
          size_word_prob: probability of a size word per object; must be 0 under 32 px.
        """
        if size < MIN_SIZE_FOR_SIZE_WORDS and size_word_prob > 0:
            raise ValueError(f"size words need images of {MIN_SIZE_FOR_SIZE_WORDS} px; pass size_word_prob=0")
        self.seed, self.size, self.length = seed, size, length
        self.holdout = holdout_combos() if holdout is None else frozenset(holdout)
        self.two_objects_prob, self.size_word_prob = two_objects_prob, size_word_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng((self.seed, int(index)))
        specs = sample_specs(rng, self.two_objects_prob, self.holdout, size_word_prob=self.size_word_prob)
        return {"image": render(specs, self.size, rng), "caption": caption(specs)}

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(seed={self.seed}, size={self.size}, length={self.length}, "
            f"holdout={sorted(self.holdout)}, two_objects_prob={self.two_objects_prob}, "
            f"size_word_prob={self.size_word_prob})"
        )


# ---------------------------------------------------------------------------------------------------------
# The checker.

MAX_HUE_DISTANCE = 30.0  # degrees; half the closest spacing of COLORS' hues
MIN_SATURATION = 0.3  # a component's mean colour below this is grey, of no colour
MIN_SHAPE_IOU = 0.7  # best template IoU under which a component is of no shape
MIN_ASPECT = 0.6  # bounding-box short over long side; flatter components are of no shape
SPECK_FRACTION = 0.25  # components under this fraction of the smallest object's area are ignored
MAX_CANDIDATES = 8  # largest components tried for each caption object; any others are extra
# Offsets in pixels of a template's continuous box edges beyond the blob's pixel bounding box. A drawn
# shape's edge lies within half a pixel of its outermost pixels, except a triangle's apex, up to ~1 px above.
_EDGE_OFFSETS = np.array([-0.4, -0.13, 0.13, 0.4])
_TOP_OFFSETS = np.array([-0.4, 0.0, 0.4, 0.8, 1.2])


@dataclasses.dataclass(frozen=True)
class Component:
    """Measurements of one connected blob of foreground pixels."""

    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    hue: float  # degrees, of the mean colour
    saturation: float  # of the mean colour
    ious: dict[str, float]  # best IoU of each shape's template fit to the blob
    aspect: float  # short over long side of the bounding box
    radius: float  # pixels, sqrt(area / AREA_PER_RADIUS2) of the best-fitting shape
    color: str | None  # nearest colour within MAX_HUE_DISTANCE, if saturated
    shape: str | None  # shape of the best template, if its IoU passes and the blob is not too flat
    position: str  # quadrant of the centroid


@dataclasses.dataclass(frozen=True)
class ObjectCheck:
    """How one object of a caption fared against the component assigned to it."""

    spec: ShapeSpec
    component: Component | None  # None when the image has fewer components than the caption objects
    color: bool
    shape: bool
    position: bool
    size: bool  # True when the caption has no size word

    @property
    def ok(self) -> bool:
        return self.color and self.shape and self.position and self.size


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """Result of `check_details`: per-object checks, and components no object accounts for."""

    objects: tuple[ObjectCheck, ...]
    extra: tuple[Component, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.objects) and not self.extra


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    return (np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # floats in [0, 1]


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of a boolean mask: min-label propagation with pointer jumping.

    Returns:
      (labels, n): int array of mask's shape, -1 off the mask and 0..n-1 on it, in raster order.
    """
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        new = labels
        for dy, dx in itertools.product((0, 1, 2), repeat=2):
            new = np.minimum(new, padded[dy : dy + h, dx : dx + w])
        flat = np.where(mask, new, none).ravel()
        on = flat < none
        flat[on] = flat[flat[on]]  # jump to the label's own label; labels are indices of on-pixels
        new = flat.reshape(h, w)
        if np.array_equal(new, labels):
            break
        labels = new
    roots, dense = np.unique(labels[mask], return_inverse=True)
    out = np.full((h, w), -1, np.int64)
    out[mask] = dense.ravel()
    return out, len(roots)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def _fit_templates(blob: np.ndarray) -> dict[str, float]:
    """Best IoU per shape of filled templates whose boxes hug the blob's bounding box.

    The blob is padded by a pixel, so a template that would spill past the blob's box pays for it.
    """
    h, w = blob.shape
    crop = np.pad(blob, 1)
    d, t = _EDGE_OFFSETS, _TOP_OFFSETS
    left, right, top, bottom = (x.ravel()[:, None, None] for x in np.meshgrid(d, d, t, d, indexing="ij"))
    # Template boxes span [1 - left, w + 1 + right] x [1 - top, h + 1 + bottom] in the padded crop.
    rx, ry = (w + left + right) / 2, (h + top + bottom) / 2
    u = (np.arange(w + 2)[None, None, :] + 0.5 - (1 - left + rx)) / rx
    v = (np.arange(h + 2)[None, :, None] + 0.5 - (1 - top + ry)) / ry
    fits = {}
    for shape in SHAPES:
        tmpl = _inside(shape, u, v)
        fits[shape] = float(((tmpl & crop).sum((1, 2)) / (tmpl | crop).sum((1, 2))).max())
    return fits


def _measure(image: np.ndarray, where: np.ndarray) -> Component:
    h, w = where.shape
    ys, xs = np.nonzero(where)
    blob = where[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    mean = image[where].astype(np.float64).mean(0) / 255.0
    hue, sat, _ = colorsys.rgb_to_hsv(*mean)
    hue *= 360.0
    color = min(HUES, key=lambda c: _hue_distance(hue, HUES[c]))
    if sat < MIN_SATURATION or _hue_distance(hue, HUES[color]) > MAX_HUE_DISTANCE:
        color = None
    ious = _fit_templates(blob)
    shape = max(ious, key=ious.get)
    radius = float(np.sqrt(len(ys) / AREA_PER_RADIUS2[shape]))
    aspect = min(blob.shape) / max(blob.shape)
    if ious[shape] < MIN_SHAPE_IOU or aspect < MIN_ASPECT:
        shape = None
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    position = ("bottom " if cy >= h / 2 else "top ") + ("right" if cx >= w / 2 else "left")
    return Component(len(ys), (cx, cy), hue, sat, ious, aspect, radius, color, shape, position)


def components(image: np.ndarray) -> list[Component]:
    """The significant blobs of an image: brightness above an adaptive threshold, specks dropped.

    The threshold is half the image's 99.5th-percentile brightness (max over channels), clipped to
    [40, 128]; a component counts when its area is at least SPECK_FRACTION of the smallest object's.
    """
    image = _as_uint8(image)
    h, w, _ = image.shape
    value = image.max(-1).astype(np.float32)
    mask = value > np.clip(0.5 * np.percentile(value, 99.5), 40.0, 128.0)
    labels, n = connected_components(mask)
    smallest = 2 * radius_range("small", min(h, w))[0] ** 2  # a small triangle's area
    areas = np.bincount(labels[mask], minlength=n)
    return [_measure(image, labels == i) for i in range(n) if areas[i] >= SPECK_FRACTION * smallest]


def check_details(image: np.ndarray, text: str | Sequence[ShapeSpec]) -> CheckReport:
    """Matches each caption object to a distinct component, maximising the attributes that agree."""
    specs = parse_caption(text) if isinstance(text, str) else list(text)
    image_size = min(np.shape(image)[:2])
    if image_size < MIN_SIZE_FOR_SIZE_WORDS and any(s.size for s in specs):
        raise ValueError(
            f"size words need images of {MIN_SIZE_FOR_SIZE_WORDS} pixels or more, not {image_size}"
        )
    found = sorted(components(image), key=lambda c: -c.area)
    threshold = size_threshold(image_size)

    def judge(spec: ShapeSpec, comp: Component | None) -> ObjectCheck:
        if comp is None:
            return ObjectCheck(spec, None, False, False, False, False)
        size_ok = spec.size is None or (comp.radius >= threshold) == (spec.size == "large")
        same = [getattr(comp, a) == getattr(spec, a) for a in ("color", "shape", "position")]
        return ObjectCheck(spec, comp, *same, size_ok)

    def score(checks: Sequence[ObjectCheck]) -> tuple[int, int]:
        agree = sum(c.color + c.shape + c.position + c.size for c in checks)
        return sum(c.ok for c in checks), agree

    slots: list[Component | None] = found[:MAX_CANDIDATES] + [None] * len(specs)
    best: tuple[ObjectCheck, ...] | None = None
    best_used: set[int] = set()
    for order in itertools.permutations(range(len(slots)), len(specs)):
        checks = tuple(judge(s, slots[i]) for s, i in zip(specs, order))
        if best is None or score(checks) > score(best):
            best, best_used = checks, set(order)
    extra = tuple(c for i, c in enumerate(found) if i not in best_used)
    return CheckReport(best, extra)


def check(image: np.ndarray, text: str | Sequence[ShapeSpec]) -> bool:
    """Whether an image shows exactly the caption's objects, with their colour, shape, position and size."""
    return check_details(image, text).ok


def adherence(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> float:
    """Fraction of images that pass `check` against their caption."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not len(captions):
        raise ValueError("no images to judge")
    return sum(check(im, c) for im, c in zip(images, captions)) / len(captions)
