"""A procedural "demo world" for training a small CLIP and then WeCLIP with exact ground truth.

Real CLIP weights and PASCAL VOC are not available everywhere, so the project can train end to end
on this synthetic world instead. Every image is a smooth "stuff" background (grass, sand, snow,
road, dirt) with 1–3 foreground objects drawn on it. Each foreground class is made deliberately
easy for a small CLIP trained from scratch: it has a distinct **shape and** a distinct **colour
family** (no object colour coincides with a background colour), with random variation in hue,
saturation, brightness, size, rotation and lighting. Objects are big (15–45 % of the image side);
later objects are drawn over earlier ones, and the label mask records what is visible.

``WorldConfig(object_style="badge")`` is a variant with the same layouts, masks and captions in
which every object has a striped body shared by all classes and carries its class colour only on
a disk-shaped badge, so class evidence covers part of each object (partial CAMs, as in real WSSS).

Determinism
-----------
A sample is a pure function of ``(seed, index, cfg)``: :func:`generate_sample` builds a
``numpy.random.SeedSequence([seed, index])`` (the same entropy that
``np.random.default_rng([seed, index])`` uses) and spawns four independent child streams from it
— layout, texture noise, captions and (``"badge"`` style) badges — so a sample never depends on which other samples were
generated, and changing e.g. ``n_captions`` does not change the pixels.

Splits use disjoint index ranges (see :data:`SPLIT_OFFSETS`): the ``k``-th (1-based) image of a
split has index ``SPLIT_OFFSETS[split] + k`` and name ``demo_<split>_<k:06d>``; val starts at
10 000 000 and test at 20 000 000, so train/val/test never share a random stream for any
``n < 10**7``. On-the-fly CLIP pre-training should use :func:`iter_samples` with
``start=SPLIT_OFFSETS["pretrain"]`` (10**8) or the train range, never the val/test ranges.

Label conventions (VOC-like): mask value 0 is background, ``i + 1`` is foreground class ``i``
(``CLASS_NAMES[i]``); masks are exact — no 255 ignore band.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import permutations
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from weclip_infer.imageio import save_png_atomic
from weclip_infer.io_utils import atomic_write_bytes
from weclip_infer.palette import voc_palette

__all__ = [
    "GENERATOR_VERSION",
    "CLASS_NAMES",
    "CLASS_PROMPTS",
    "CLASS_COLORS",
    "BACKGROUND_NAMES",
    "ORIGAMI_TEMPLATE",
    "SPLIT_OFFSETS",
    "OBJECT_STYLES",
    "WorldConfig",
    "PlacedObject",
    "Sample",
    "generate_sample",
    "rasterize_object",
    "iter_samples",
    "caption_for",
    "all_captions",
    "caption_forms",
    "sample_name",
    "write_voc_layout",
    "preview_grid",
]

#: Bumped whenever the pixels/masks/captions produced for a given (seed, index, cfg) change.
GENERATOR_VERSION = "1"

#: Foreground class names; class ``i`` has mask label ``i + 1``.
CLASS_NAMES: list[str] = ["circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond"]
#: Text put into CLIP prompts for each class (same order as :data:`CLASS_NAMES`).
CLASS_PROMPTS: list[str] = [
    "red circle",
    "blue square",
    "yellow triangle",
    "purple star",
    "orange ring",
    "cyan cross",
    "pink heart",
    "black diamond",
]
#: Background "stuff" textures (index = ``Sample.background``); also WeCLIP's background prompts.
BACKGROUND_NAMES: list[str] = ["grass", "sand", "snow", "road", "dirt"]

#: WeCLIP's prompt template; one caption form uses it so the prompt is in distribution.
ORIGAMI_TEMPLATE = "a clean origami {}."

#: Object rendering styles of :class:`WorldConfig` (``object_style``).
OBJECT_STYLES: tuple[str, ...] = ("flat", "badge")

#: Index offset of each split (``index = offset + k`` for the ``k``-th, 1-based, item).
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 10_000_000, "test": 20_000_000, "pretrain": 100_000_000}

# Per-class colour family in HSV: (hue centre in degrees, hue jitter ±deg, (s_lo, s_hi), (v_lo, v_hi)).
# Hues avoid the backgrounds: grass is green (~95°), sand/dirt are low-saturation browns, snow is
# near-white and road is grey; "black" is kept darker than any background.
_CLASS_HSV: list[tuple[float, float, tuple[float, float], tuple[float, float]]] = [
    (0.0, 6.0, (0.80, 0.95), (0.75, 0.95)),  # red circle
    (225.0, 8.0, (0.75, 0.90), (0.70, 0.90)),  # blue square
    (52.0, 5.0, (0.80, 0.95), (0.90, 1.00)),  # yellow triangle
    (280.0, 8.0, (0.60, 0.80), (0.60, 0.80)),  # purple star
    (28.0, 4.0, (0.90, 1.00), (0.90, 1.00)),  # orange ring
    (185.0, 6.0, (0.75, 0.95), (0.80, 0.95)),  # cyan cross
    (330.0, 8.0, (0.45, 0.65), (0.90, 1.00)),  # pink heart
    (0.0, 180.0, (0.00, 0.10), (0.08, 0.20)),  # black diamond
]


def _hsv_centre_rgb(h: float, s: tuple[float, float], v: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, sum(s) / 2, sum(v) / 2)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


#: Typical (centre-of-family) RGB colour of each class, for documentation and previews.
CLASS_COLORS: list[tuple[int, int, int]] = [_hsv_centre_rgb(h, s, v) for h, _, s, v in _CLASS_HSV]

# Caption templates. ``{objs}`` is a list with articles ("a red circle and an orange ring"),
# ``{bare}`` the same without articles ("red circle and orange ring"), ``{bg}`` a background name.
_OBJ_BG_TEMPLATES = ["{objs} on {bg}.", "a photo of {objs} on {bg}.", "a picture of {objs} on {bg}.", "{objs} lying on {bg}."]
_OBJ_TEMPLATES = ["{objs}.", "a photo of {objs}.", "a picture of {objs}."]
_ORIGAMI_TEMPLATES = [ORIGAMI_TEMPLATE.replace("{}", "{bare}")]
_BG_TEMPLATES = ["{bg}.", "a photo of {bg}.", ORIGAMI_TEMPLATE.replace("{}", "{bg}")]
_FORMS = ("objects_background", "objects", "origami", "background")
_FORM_TEMPLATES = {
    "objects_background": _OBJ_BG_TEMPLATES,
    "objects": _OBJ_TEMPLATES,
    "origami": _ORIGAMI_TEMPLATES,
    "background": _BG_TEMPLATES,
}


@dataclass
class WorldConfig:
    """Parameters of the demo world. All sizes are relative to ``size`` (the image side, pixels).

    Attributes:
        size: square image side in pixels.
        n_classes: number of foreground classes used (the first ``n_classes`` of
            :data:`CLASS_NAMES`), 1..8.
        min_objects / max_objects: object count range for multi-object images.
        single_object_prob: probability that an image has exactly one object.
        min_scale / max_scale: object extent (≈ diameter of its bounding circle) as a fraction
            of ``size``.
        min_visible_frac: an object may be placed over earlier ones only if each earlier object
            keeps at least this fraction of its own pixels visible; otherwise another position is
            tried (``max_place_tries`` times) and, failing that, the object is dropped.
        max_place_tries: placement attempts per object.
        antialias: anti-alias object edges in the image (the mask is always hard).
        n_captions: captions stored in ``Sample.captions``.
        caption_form_weights: relative probabilities of the caption forms
            ``objects_background``, ``objects``, ``origami`` and ``background``.
        object_style: ``"flat"`` (the default world: each object is filled with its class colour)
            or ``"badge"``: each object's body is a striped texture shared by all classes and only
            a disk-shaped *badge* inside it (radius ``badge_scale`` × the object radius) carries
            the class colour. The mask still covers the whole object, so a classifier can name the
            class from the badge alone and its CAM covers only part of the object — the situation
            that CAM refinement (spec §4) exists for. See :data:`OBJECT_STYLES`.
        badge_scale: (lo, hi) range of the badge radius as a fraction of the object radius
            (``"badge"`` style only).
    """

    size: int = 256
    n_classes: int = len(CLASS_NAMES)
    min_objects: int = 1
    max_objects: int = 3
    single_object_prob: float = 0.5
    min_scale: float = 0.18
    max_scale: float = 0.45
    min_visible_frac: float = 0.5
    max_place_tries: int = 20
    antialias: bool = True
    n_captions: int = 4
    caption_form_weights: tuple = (0.35, 0.25, 0.3, 0.1)
    object_style: str = "flat"
    badge_scale: tuple = (0.55, 0.65)

    def __post_init__(self) -> None:
        self.caption_form_weights = tuple(float(w) for w in self.caption_form_weights)
        self.badge_scale = tuple(float(b) for b in self.badge_scale)
        if self.object_style not in OBJECT_STYLES:
            raise ValueError(f"object_style must be one of {OBJECT_STYLES}, got {self.object_style!r}")
        if len(self.badge_scale) != 2 or not 0.0 < self.badge_scale[0] <= self.badge_scale[1] <= 1.0:
            raise ValueError(f"badge_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.badge_scale}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")
        if not 1 <= self.n_classes <= len(CLASS_NAMES):
            raise ValueError(f"n_classes must be in 1..{len(CLASS_NAMES)}, got {self.n_classes}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if self.max_objects > self.n_classes:
            raise ValueError("max_objects cannot exceed n_classes (classes in an image are distinct)")
        if not 0.0 <= self.single_object_prob <= 1.0:
            raise ValueError("single_object_prob must be in [0, 1]")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError("need 0 < min_scale <= max_scale <= 1")
        if not 0.0 <= self.min_visible_frac <= 1.0:
            raise ValueError("min_visible_frac must be in [0, 1]")
        if self.max_place_tries < 1:
            raise ValueError("max_place_tries must be >= 1")
        if self.n_captions < 0:
            raise ValueError("n_captions must be >= 0")
        if len(self.caption_form_weights) != len(_FORMS) or min(self.caption_form_weights) < 0 or sum(self.caption_form_weights) <= 0:
            raise ValueError(f"caption_form_weights must be {len(_FORMS)} non-negative numbers with a positive sum")

    @property
    def class_names(self) -> list[str]:
        """The foreground class names in use."""
        return CLASS_NAMES[: self.n_classes]

    @property
    def class_prompts(self) -> list[str]:
        """The foreground prompt names in use."""
        return CLASS_PROMPTS[: self.n_classes]

    def to_dict(self) -> dict:
        """JSON-serialisable view of the config."""
        d = asdict(self)
        d["caption_form_weights"] = list(self.caption_form_weights)
        d["badge_scale"] = list(self.badge_scale)
        return d


@dataclass
class PlacedObject:
    """One drawn object: class id (0-based), centre (x, y) in pixels, radius in pixels, angle
    (radians, counter-clockwise), base RGB colour and shape parameters (e.g. a ring's inner radius)."""

    class_id: int
    center: tuple[float, float]
    radius: float
    angle: float
    color: tuple[int, int, int]
    params: dict = field(default_factory=dict)


@dataclass
class Sample:
    """A generated image with exact labels.

    Attributes:
        image: H×W×3 uint8 RGB.
        mask: H×W uint8; 0 background, ``i + 1`` for class ``i`` (visible pixels only).
        classes: sorted 0-based ids of the classes visible in ``mask``.
        background: index into :data:`BACKGROUND_NAMES`.
        captions: ``cfg.n_captions`` captions drawn from the caption forms.
        instances: H×W uint8; 0 background, ``k + 1`` for ``objects[k]`` (visible pixels only).
        objects: the placed objects in drawing order (later ones are on top).
        seed / index: what generated it.
    """

    image: np.ndarray
    mask: np.ndarray
    classes: list[int]
    background: int
    captions: list[str]
    instances: np.ndarray
    objects: list[PlacedObject] = field(default_factory=list)
    seed: int = 0
    index: int = 0

    @property
    def background_name(self) -> str:
        return BACKGROUND_NAMES[self.background]


# --------------------------------------------------------------------------------------------
# Smooth noise
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _interp_index(n_out: int, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Left grid index and smoothstep weight of each of ``n_out`` samples over an ``n_grid`` grid."""
    t = (np.arange(n_out, dtype=np.float64) + 0.5) / n_out * (n_grid - 1)
    i0 = np.minimum(np.floor(t).astype(np.intp), n_grid - 2)
    f = t - i0
    f = (f * f * (3.0 - 2.0 * f)).astype(np.float32)
    i0.setflags(write=False)
    f.setflags(write=False)
    return i0, f


def _value_noise(rng: np.random.Generator, size: int, gy: int, gx: Optional[int] = None) -> np.ndarray:
    """Smooth noise (size×size float32, roughly unit variance) from a (gy+1)×(gx+1) random grid.

    Separable smoothstep interpolation done with gathers (no BLAS: fast under CPU contention and
    bit-identical across machines and thread counts).
    """
    gx = gy if gx is None else gx
    g = rng.standard_normal((gy + 1, gx + 1), dtype=np.float32)
    ix, fx = _interp_index(size, gx + 1)
    iy, fy = _interp_index(size, gy + 1)
    h0 = g[:, ix]
    h = h0 + (g[:, ix + 1] - h0) * fx  # (gy+1, size)
    v0 = h[iy]
    out = v0 + (h[iy + 1] - v0) * fy[:, None]
    out *= np.float32(1.6)  # smoothstep interpolation loses ~ 1/1.6 of the std
    return out


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


# --------------------------------------------------------------------------------------------
# Backgrounds (float32 H×W×3 in 0..255)
# --------------------------------------------------------------------------------------------
def _background(kind: int, rng: np.random.Generator, size: int, fine: np.ndarray) -> np.ndarray:
    """Background ``kind`` as float32 3×H×W (channels first: much faster here) in 0..255.

    Every texture is written as ``P[..., None] * A + Q[..., None] * B`` with 2-D fields ``P``, ``Q``
    and colours ``A``, ``B`` (i.e. a spatially varying mix of two colours with a luminance
    modulation), so that only two full-colour array operations are needed.
    """
    f32 = np.float32
    ys, xs = _grid(size)
    low = _value_noise(rng, size, 3)
    mid = _value_noise(rng, size, 8)
    bright = f32(rng.uniform(0.9, 1.08))
    # gentle global lighting gradient
    ang = rng.uniform(0, 2 * math.pi)
    lum = (xs * f32(math.cos(ang)) + ys * f32(math.sin(ang))) * f32(rng.uniform(0.0, 0.08) / size)
    lum += f32(1.0)
    name = BACKGROUND_NAMES[kind]
    if name == "grass":
        a = np.array([60, 125, 40], f32) * f32(rng.uniform(0.9, 1.1, 3))
        b = np.array([105, 150, 45], f32)
        blades = _value_noise(rng, size, 10, 64)  # vertical-ish streaks
        t = np.clip(0.5 + 0.3 * low + 0.15 * mid, 0, 1)
        lum *= 1.0 + 0.08 * blades + 0.06 * fine
    elif name == "sand":
        a = np.array([220, 195, 145], f32) + f32(rng.uniform(-10, 10))
        b = np.array([195, 165, 115], f32)
        lam = rng.uniform(18, 36)
        th = rng.uniform(0, math.pi)
        phase = (xs * f32(math.cos(th)) + ys * f32(math.sin(th))) * f32(2 * math.pi / lam) + f32(2.5) * low
        t = np.clip(0.35 + 0.2 * mid + 0.15 * np.sin(phase), 0, 1)
        lum *= 1.0 + 0.07 * fine
    elif name == "snow":
        a = np.array([244, 246, 250], f32)
        b = np.array([196, 208, 226], f32)
        grad = ys * f32(rng.uniform(-0.3, 0.3) / size)
        t = np.clip(0.25 + 0.25 * low + 0.1 * mid + grad, 0, 1)
        lum *= 1.0 + 0.012 * fine
    elif name == "road":
        g = f32(rng.uniform(105, 135))
        a = (np.array([1.0, 1.0, 1.0], f32) + f32(rng.uniform(-0.04, 0.04)) * np.array([1, 0, -1], f32)) * g
        b = np.zeros(3, f32)
        t = np.zeros((size, size), f32)
        lum *= 1.0 + 0.07 * mid + 0.05 * low + 0.12 * fine
    else:  # dirt
        a = np.array([130, 95, 62], f32) * f32(rng.uniform(0.9, 1.1))
        b = np.array([92, 66, 44], f32)
        clumps = _value_noise(rng, size, 20)
        t = np.clip(0.4 + 0.2 * low + 0.2 * mid + 0.15 * clumps, 0, 1)
        lum *= 1.0 + 0.08 * fine
    lum *= bright
    img = np.multiply(lum[None], a.astype(f32)[:, None, None])
    img += (t * lum)[None] * (b - a).astype(f32)[:, None, None]
    return img


# --------------------------------------------------------------------------------------------
# Shapes: signed distance (in units of the object radius, negative inside) in local coordinates
# u (right) and v (up), the shape fitting in the unit disk.
# --------------------------------------------------------------------------------------------
_C36, _S36 = math.cos(math.radians(36)), math.sin(math.radians(36))


def _sd_circle(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 1.0


def _sd_square(u, v, p):
    return np.maximum(np.abs(u), np.abs(v)) - 0.72


def _sd_triangle(u, v, p):
    # equilateral, apex up, circumradius 1 (inradius 0.5), centred at its centroid
    d = -v  # bottom edge normal (0, -1)
    d = np.maximum(d, 0.8660254 * u + 0.5 * v)
    d = np.maximum(d, -0.8660254 * u + 0.5 * v)
    return d - 0.5


def _sd_star(u, v, p):
    r_in = p["inner"]
    theta = np.arctan2(u, v)  # 0 = straight up, so one point faces up
    sector = 2 * math.pi / 5
    psi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # 0 at outer vertices, 36° at inner
    rho = np.sqrt(u * u + v * v)
    qx, qy = rho * np.cos(psi), rho * np.sin(psi)
    ax, ay = 1.0, 0.0
    bx, by = r_in * _C36, r_in * _S36
    nx, ny = by - ay, -(bx - ax)  # perpendicular to AB, pointing away from the origin
    nn = math.hypot(nx, ny)
    nx, ny = nx / nn, ny / nn
    return (qx - ax) * nx + (qy - ay) * ny


def _sd_ring(u, v, p):
    rho = np.sqrt(u * u + v * v)
    return np.maximum(rho - 1.0, p["inner"] - rho)


def _sd_cross(u, v, p):
    w = p["arm"]
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.95, av - w), np.maximum(au - w, av - 0.95))


_HEART_H = 0.8
_HEART_C0 = -0.083


def _sd_heart(u, v, p):
    h, c0 = _HEART_H, _HEART_C0
    au = np.abs(u)
    dv = v - c0
    d = (au + np.abs(dv) - h) * 0.70710678  # rotated square (diamond)
    circ = np.sqrt((au - h / 2) ** 2 + (dv - h / 2) ** 2) - h * 0.70710678
    return np.minimum(d, circ)


def _sd_diamond(u, v, p):
    a = p["aspect"]
    return (np.abs(u) / a + np.abs(v) - 1.0) / math.sqrt(1.0 / (a * a) + 1.0)


_SHAPES = [_sd_circle, _sd_square, _sd_triangle, _sd_star, _sd_ring, _sd_cross, _sd_heart, _sd_diamond]


def _shape_params(cls: int, rng: np.random.Generator) -> tuple[float, dict]:
    """Random rotation (radians, counter-clockwise) and shape parameters for class ``cls``."""
    name = CLASS_NAMES[cls]
    if name == "heart":
        angle = rng.uniform(-0.4, 0.4)
    elif name == "diamond":
        angle = rng.uniform(-0.5, 0.5)
    else:
        angle = rng.uniform(0.0, 2 * math.pi)
    params: dict = {}
    if name == "star":
        params["inner"] = float(rng.uniform(0.40, 0.50))
    elif name == "ring":
        params["inner"] = float(rng.uniform(0.45, 0.60))
    elif name == "cross":
        params["arm"] = float(rng.uniform(0.28, 0.36))
    elif name == "diamond":
        params["aspect"] = float(rng.uniform(0.55, 0.68))
    return float(angle), params


def _object_color(cls: int, rng: np.random.Generator) -> np.ndarray:
    h, dh, (s0, s1), (v0, v1) = _CLASS_HSV[cls]
    hue = (h + rng.uniform(-dh, dh)) % 360.0
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return np.array([r, g, b], dtype=np.float32) * np.float32(255.0)


#: The class-independent body of ``"badge"`` objects: stripes between these two RGB colours
#: (charcoal and a light warm grey: no background is striped, and none is this dark).
_BODY_DARK = np.array([38.0, 36.0, 42.0], dtype=np.float32)
_BODY_LIGHT = np.array([182.0, 176.0, 168.0], dtype=np.float32)


def _badge_body(col: np.ndarray, shade: np.ndarray, u: np.ndarray, v: np.ndarray, win: tuple,
                obj: "PlacedObject", rng: np.random.Generator) -> np.ndarray:
    """3×h×w colour of a ``"badge"`` object: stripes (period 0.30–0.40 object radii, random
    direction) everywhere, the class colour ``col`` inside the badge disk."""
    f32 = np.float32
    th = rng.uniform(0, math.pi)
    period = rng.uniform(0.30, 0.40)
    phase = (u * f32(math.cos(th)) + v * f32(math.sin(th))) * f32(2 * math.pi / period)
    t = f32(0.5) + f32(0.5) * np.tanh(f32(4.0) * np.sin(phase + f32(rng.uniform(0, 2 * math.pi))))
    body = (_BODY_DARK[:, None, None] + (_BODY_LIGHT - _BODY_DARK)[:, None, None] * t[None]) * shade[None]
    bx, by = obj.params["badge_center"]
    ys = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] - f32(by)
    xs = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] - f32(bx)
    # anti-aliased disk edge (1 px), as the object outline
    a = np.clip(f32(obj.params["badge_radius"] + 0.5) - np.sqrt(xs * xs + ys * ys), 0.0, 1.0)
    return body + (col - body) * a[None]


def _local_sd(size: int, cx: float, cy: float, r: float, angle: float, sd, params) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance (pixels) of one object over its bounding window, plus local coords."""
    x0 = max(int(math.floor(cx - r - 1)), 0)
    x1 = min(int(math.ceil(cx + r + 2)), size)
    y0 = max(int(math.floor(cy - r - 1)), 0)
    y1 = min(int(math.ceil(cy + r + 2)), size)
    xs = np.arange(x0, x1, dtype=np.float32) - np.float32(cx)
    ys = np.arange(y0, y1, dtype=np.float32) - np.float32(cy)
    ca, sa = np.float32(math.cos(angle) / r), np.float32(math.sin(angle) / r)
    # u right, v up (image y points down), rotated by ``angle`` counter-clockwise
    u = xs[None, :] * ca - ys[:, None] * sa
    v = -(xs[None, :] * sa + ys[:, None] * ca)
    d = sd(u, v, params) * np.float32(r)
    return (slice(y0, y1), slice(x0, x1)), d.astype(np.float32, copy=False), u, v


def rasterize_object(obj: PlacedObject, size: int) -> np.ndarray:
    """Full (unoccluded) size×size boolean mask of ``obj``: pixels whose centre lies inside it.

    Uses exactly the rasterisation of :func:`generate_sample`, so for a sample the visible region
    of object ``k`` (``Sample.instances == k + 1``) is this mask minus those of later objects.
    """
    win, d, _, _ = _local_sd(size, obj.center[0], obj.center[1], obj.radius, obj.angle,
                             _SHAPES[obj.class_id], obj.params)
    out = np.zeros((size, size), dtype=bool)
    out[win] = d <= 0
    return out


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------
def _with_article(p: str) -> str:
    return ("an " if p[:1].lower() in "aeiou" else "a ") + p


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return items[0] if items else ""
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fill(template: str, prompts: Sequence[str], bg: str) -> str:
    return template.format(objs=_join([_with_article(p) for p in prompts]), bare=_join(prompts), bg=bg)


def caption_forms(classes: Sequence[int], background: int) -> dict[str, list[str]]:
    """All captions of an image with ``classes`` (0-based) on ``background``, grouped by form.

    Forms: ``objects_background`` ("a red circle and a blue square on grass."), ``objects``
    ("a photo of a red circle and a blue square."), ``origami`` ("a clean origami red circle and
    blue square." — WeCLIP's template) and ``background`` ("grass.", "a photo of grass.", "a clean
    origami grass."). Every object order is enumerated. Object forms are empty when ``classes`` is.
    """
    bg = BACKGROUND_NAMES[int(background)]
    prompts = [CLASS_PROMPTS[int(c)] for c in sorted(set(int(c) for c in classes))]
    out: dict[str, list[str]] = {}
    for form in _FORMS:
        caps: list[str] = []
        if form == "background":
            caps = [_fill(t, [], bg) for t in _FORM_TEMPLATES[form]]
        elif prompts:
            for t in _FORM_TEMPLATES[form]:
                for perm in permutations(prompts):
                    caps.append(_fill(t, perm, bg))
        out[form] = caps
    return out


def all_captions(sample_or_classes: Union[Sample, Sequence[int]], background: Optional[int] = None) -> list[str]:
    """Every caption form for a sample (or for ``classes`` + ``background``), in a fixed order."""
    if isinstance(sample_or_classes, Sample):
        classes, background = sample_or_classes.classes, sample_or_classes.background
    else:
        classes = sample_or_classes
        if background is None:
            raise ValueError("background is required when passing classes")
    forms = caption_forms(classes, int(background))
    return [c for form in _FORMS for c in forms[form]]


def _random_caption(classes: Sequence[int], background: int, rng: np.random.Generator, weights: Sequence[float]) -> str:
    w = np.asarray(weights, dtype=np.float64)
    if not classes:
        w = w * np.array([0.0, 0.0, 0.0, 1.0])
    if w.sum() <= 0:
        w = np.array([0.0, 0.0, 0.0, 1.0]) if not classes else np.array([1.0, 0.0, 0.0, 0.0])
    form = _FORMS[int(rng.choice(len(_FORMS), p=w / w.sum()))]
    templates = _FORM_TEMPLATES[form]
    t = templates[int(rng.integers(len(templates)))]
    prompts = [CLASS_PROMPTS[int(c)] for c in classes]
    order = rng.permutation(len(prompts)) if prompts else []
    return _fill(t, [prompts[i] for i in order], BACKGROUND_NAMES[int(background)])


def caption_for(sample: Sample, rng: np.random.Generator, cfg: Optional[WorldConfig] = None) -> str:
    """A fresh random caption for ``sample`` (random form, template and object order) from ``rng``.

    Use this for on-the-fly caption augmentation during CLIP pre-training; object forms always
    mention exactly the classes visible in the sample.
    """
    weights = (cfg or WorldConfig()).caption_form_weights
    return _random_caption(sample.classes, sample.background, rng, weights)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def generate_sample(seed: int, index: int, cfg: Optional[WorldConfig] = None) -> Sample:
    """Generate sample ``index`` of the world ``seed`` (deterministic; independent of other samples)."""
    cfg = cfg or WorldConfig()
    f32 = np.float32
    S = cfg.size
    ss = np.random.SeedSequence([int(seed), int(index)])
    # a fourth stream for badge placement, so the badge style keeps the flat world's layout (its
    # stripes are drawn from r_tex after the background, so only object shading differs)
    r_layout, r_tex, r_cap, r_badge = (np.random.default_rng(s) for s in ss.spawn(4))

    # ---- layout
    background = int(r_layout.integers(len(BACKGROUND_NAMES)))
    if cfg.max_objects == 1 or r_layout.random() < cfg.single_object_prob:
        n_obj = max(1, cfg.min_objects)
    else:
        n_obj = int(r_layout.integers(max(2, cfg.min_objects), cfg.max_objects + 1))
    n_obj = min(n_obj, cfg.n_classes)
    obj_classes = [int(c) for c in r_layout.choice(cfg.n_classes, size=n_obj, replace=False)]

    inst = np.zeros((S, S), dtype=np.uint8)
    areas: list[int] = []
    visible: list[int] = []
    placed: list[tuple[int, tuple, np.ndarray, np.ndarray, np.ndarray, PlacedObject]] = []
    for cls in obj_classes:
        lo, hi = cfg.min_scale, cfg.max_scale
        if n_obj == 1:
            lo = lo + (hi - lo) / 3  # single objects lean large
        angle, params = _shape_params(cls, r_layout)
        color = _object_color(cls, r_layout)
        accepted = None
        for _ in range(cfg.max_place_tries):
            r = 0.5 * S * r_layout.uniform(lo, hi)
            m = 0.9 * r
            cx = r_layout.uniform(m, S - m)
            cy = r_layout.uniform(m, S - m)
            win, d, u, v = _local_sd(S, cx, cy, r, angle, _SHAPES[cls], params)
            inside = d <= 0
            area = int(inside.sum())
            if area < 16:
                continue
            if placed:
                covered = np.bincount(inst[win][inside], minlength=len(placed) + 1)[1:]
                ok = all(visible[j] - int(covered[j]) >= cfg.min_visible_frac * areas[j] and visible[j] - int(covered[j]) > 0 for j in range(len(placed)))
                if not ok:
                    continue
                for j in range(len(placed)):
                    visible[j] -= int(covered[j])
            accepted = (win, d, u, v, inside, area, r, cx, cy)
            break
        if accepted is None:
            continue
        win, d, u, v, inside, area, r, cx, cy = accepted
        if cfg.object_style == "badge":
            # badge centre: a pixel from the deeper half of the object (so a ring's badge sits on
            # the band, not in the hole); radius relative to the object's
            depth = -d[inside]
            ys_in, xs_in = np.nonzero(inside)
            deep = np.flatnonzero(depth >= 0.5 * depth.max())
            j = int(deep[r_badge.integers(len(deep))])
            params = dict(params, badge_center=(float(win[1].start + xs_in[j]), float(win[0].start + ys_in[j])),
                          badge_radius=float(r * r_badge.uniform(*cfg.badge_scale)))
        k = len(placed) + 1
        inst[win][inside] = k
        areas.append(area)
        visible.append(area)
        obj = PlacedObject(cls, (float(cx), float(cy)), float(r), float(angle),
                           tuple(int(round(float(c))) for c in np.clip(color, 0, 255)), dict(params))
        placed.append((cls, win, d, u, v, obj))

    # ---- rendering
    fine = r_tex.random((S, S), dtype=f32)  # uniform, zero mean, unit variance
    fine -= f32(0.5)
    fine *= f32(math.sqrt(12.0))
    img = _background(background, r_tex, S, fine)
    for cls, win, d, u, v, obj in placed:
        color = np.asarray(obj.color, dtype=f32)
        la = r_tex.uniform(0, 2 * math.pi)
        shade = 1.0 + f32(r_tex.uniform(0.08, 0.18)) * (u * f32(math.cos(la)) + v * f32(math.sin(la)))
        if CLASS_NAMES[cls] == "circle":  # a little ball-like highlight
            shade = shade + f32(0.12) * np.exp(-((u + 0.35) ** 2 + (v - 0.35) ** 2) * f32(4.0))
        shade = shade + f32(0.03) * fine[win]
        col = color[:, None, None] * shade[None]
        if CLASS_NAMES[cls] == "diamond":
            col = col + f32(8.0) * shade[None]  # keep some visible shading on black
        if cfg.object_style == "badge":
            col = _badge_body(col, shade, u, v, win, obj, r_tex)
        if cfg.antialias:
            a = np.clip(f32(0.5) - d, 0.0, 1.0)
        else:
            a = (d <= 0).astype(f32)
        region = img[(slice(None),) + win]
        region += (col - region) * a[None]
    img += f32(0.5)
    np.clip(img, 0, 255, out=img)
    chw = img.astype(np.uint8)
    image = np.empty((S, S, 3), dtype=np.uint8)
    for c in range(3):
        image[..., c] = chw[c]

    lut = np.zeros(256, dtype=np.uint8)
    objects = []
    for k, (cls, *_rest) in enumerate(placed):
        lut[k + 1] = cls + 1
        objects.append(_rest[-1])
    mask = lut[inst]
    # every kept object has visible pixels (placement guarantees it), so this equals unique(mask) - 1
    classes = sorted(int(p[0]) for p, vis in zip(placed, visible) if vis > 0)
    captions: list[str] = []
    for _ in range(cfg.n_captions):
        for _try in range(8):  # prefer distinct captions
            c = _random_caption(classes, background, r_cap, cfg.caption_form_weights)
            if c not in captions:
                break
        captions.append(c)
    return Sample(image=image, mask=mask, classes=classes, background=background, captions=captions,
                  instances=inst, objects=objects, seed=int(seed), index=int(index))


def iter_samples(seed: int, start: int = 0, cfg: Optional[WorldConfig] = None, stop: Optional[int] = None) -> Iterator[Sample]:
    """Yield ``generate_sample(seed, i, cfg)`` for ``i = start, start + 1, ...`` (up to ``stop``).

    For CLIP pre-training use ``start=SPLIT_OFFSETS["pretrain"]`` (disjoint from val/test) or the
    train range (``start=1``).
    """
    cfg = cfg or WorldConfig()
    i = int(start)
    while stop is None or i < stop:
        yield generate_sample(seed, i, cfg)
        i += 1


# --------------------------------------------------------------------------------------------
# VOC-style layout on disk
# --------------------------------------------------------------------------------------------
def sample_name(split: str, k: int) -> str:
    """File stem of the ``k``-th (1-based) image of ``split``: ``demo_<split>_<k:06d>``."""
    return f"demo_{split}_{k:06d}"


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


_WORKER_STATE: dict = {}


def _write_one(job: tuple) -> dict:
    split, k = job
    st = _WORKER_STATE
    cfg, seed, out, overwrite, quality = st["cfg"], st["seed"], st["out"], st["overwrite"], st["quality"]
    s = generate_sample(seed, SPLIT_OFFSETS[split] + k, cfg)
    name = sample_name(split, k)
    jpg = out / "JPEGImages" / f"{name}.jpg"
    png = out / "SegmentationClassAug" / f"{name}.png"
    if overwrite or not jpg.exists():
        atomic_write_bytes(jpg, _jpeg_bytes(s.image, quality))
    if overwrite or not png.exists():
        save_png_atomic(png, s.mask, palette=voc_palette())  # palette PNG: pixel value = class index
    return {"name": name, "split": split, "classes": s.classes, "background": s.background,
            "background_name": s.background_name, "captions": s.captions}


def _init_worker(state: dict) -> None:
    _WORKER_STATE.clear()
    _WORKER_STATE.update(state)


def write_voc_layout(out_dir: Union[str, os.PathLike], n_train: int, n_val: int, seed: int = 0,
                     cfg: Optional[WorldConfig] = None, n_test: int = 0, workers: int = 1,
                     overwrite: bool = False, jpeg_quality: int = 95, progress: bool = False) -> dict:
    """Write a VOC-style data set of the demo world to ``out_dir`` and return its ``meta`` dict.

    Layout: ``JPEGImages/<name>.jpg`` (quality ``jpeg_quality``), ``SegmentationClassAug/<name>.png``
    (palette PNG, VOC palette, values 0..n_classes), ``train.txt`` / ``val.txt`` (/ ``test.txt`` when
    ``n_test``), ``cls_labels_onehot.npy`` (pickled dict name → float32[n_classes] multi-hot, as for
    VOC; load with ``np.load(p, allow_pickle=True).item()``), ``cls_labels.json`` (name → list of
    0/1 ints), ``captions.jsonl`` (one JSON object per image: name, split, classes, background,
    background_name, captions), ``classes.json`` (class_names, class_prompts, bg_prompts) and
    ``meta.json`` (generator/version, seed, config, counts, split index offsets, status).

    Split ``s`` image ``k`` (1-based) is ``generate_sample(seed, SPLIT_OFFSETS[s] + k, cfg)`` named
    ``demo_<s>_<k:06d>``, so splits never share random streams. Every file is written atomically
    (temp file + ``os.replace``). Re-running into the same folder resumes: existing images/masks are
    kept unless ``overwrite`` (they are identical anyway: same args → byte-identical files); the
    list/label/meta files are always rewritten. A folder made with a different seed, config or
    generator version is refused unless ``overwrite``.
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    for n, what in ((n_train, "n_train"), (n_val, "n_val"), (n_test, "n_test")):
        if n < 0:
            raise ValueError(f"{what} must be >= 0")
    if max(n_train, n_val, n_test) >= SPLIT_OFFSETS["val"] - SPLIT_OFFSETS["train"]:
        raise ValueError("at most 9,999,999 images per split")
    ident = {"generator": "weclip_infer.demo.world", "version": GENERATOR_VERSION, "seed": int(seed),
             "config": cfg.to_dict(), "jpeg_quality": int(jpeg_quality)}
    meta_path = out / "meta.json"
    if meta_path.exists() and not overwrite:
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old is None or any(old.get(k) != v for k, v in ident.items()):
            raise ValueError(f"{out} holds a demo world made with other settings (see {meta_path}); "
                             "use another folder or overwrite (--overwrite)")
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    meta = dict(ident)
    meta.update({"counts": counts, "n_classes": cfg.n_classes,
                 "split_index_offsets": {k: SPLIT_OFFSETS[k] for k in ("train", "val", "test")},
                 "naming": "demo_<split>_<k:06d> = generate_sample(seed, split_index_offsets[split] + k, config), k >= 1",
                 "status": "in_progress"})
    atomic_write_bytes(meta_path, _json_bytes(meta))

    jobs = [(split, k) for split in ("train", "val", "test") for k in range(1, counts[split] + 1)]
    state = {"cfg": cfg, "seed": int(seed), "out": out, "overwrite": bool(overwrite), "quality": int(jpeg_quality)}
    records: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
            for i, rec in enumerate(pool.imap(_write_one, jobs, chunksize=16)):
                records.append(rec)
                if progress and (i + 1) % 500 == 0:
                    print(f"  {i + 1}/{len(jobs)}", flush=True)
    else:
        _init_worker(state)
        for i, job in enumerate(jobs):
            records.append(_write_one(job))
            if progress and (i + 1) % 500 == 0:
                print(f"  {i + 1}/{len(jobs)}", flush=True)

    for split in ("train", "val", "test"):
        names = [r["name"] for r in records if r["split"] == split]
        if split != "test" or n_test:
            atomic_write_bytes(out / f"{split}.txt", "".join(n + "\n" for n in names).encode())
    onehot: dict[str, np.ndarray] = {}
    plain: dict[str, list[int]] = {}
    for r in records:
        v = np.zeros(cfg.n_classes, dtype=np.float32)
        v[r["classes"]] = 1.0
        onehot[r["name"]] = v
        plain[r["name"]] = [int(x) for x in v]
    buf = io.BytesIO()
    np.save(buf, onehot, allow_pickle=True)
    atomic_write_bytes(out / "cls_labels_onehot.npy", buf.getvalue())
    atomic_write_bytes(out / "cls_labels.json", (json.dumps(plain) + "\n").encode())
    atomic_write_bytes(out / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    atomic_write_bytes(out / "classes.json", _json_bytes({
        "class_names": cfg.class_names, "class_prompts": cfg.class_prompts, "bg_prompts": list(BACKGROUND_NAMES),
        "class_colors": [list(c) for c in CLASS_COLORS[: cfg.n_classes]]}))
    fg_hist = np.zeros(cfg.n_classes, dtype=np.int64)
    for r in records:
        fg_hist[r["classes"]] += 1
    meta["status"] = "complete"
    meta["images_per_class"] = {cfg.class_names[i]: int(fg_hist[i]) for i in range(cfg.n_classes)}
    atomic_write_bytes(meta_path, _json_bytes(meta))
    return meta


# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------
def preview_grid(seed: int = 0, n: int = 16, cfg: Optional[WorldConfig] = None, start: int = 1,
                 ncols: int = 4, with_masks: bool = True) -> np.ndarray:
    """An RGB mosaic of ``n`` samples (each image, and its colourised mask beside it if
    ``with_masks``), for eyeballing the world."""
    from weclip_infer.palette import colorize

    cfg = cfg or WorldConfig()
    tiles = []
    for s in iter_samples(seed, start, cfg, stop=start + n):
        t = s.image
        if with_masks:
            t = np.concatenate([t, np.full((cfg.size, 4, 3), 255, np.uint8), colorize(s.mask)], axis=1)
        tiles.append(t)
    th, tw = tiles[0].shape[:2]
    nrows = (n + ncols - 1) // ncols
    pad = 6
    grid = np.full((nrows * (th + pad), ncols * (tw + pad), 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid[r * (th + pad): r * (th + pad) + th, c * (tw + pad): c * (tw + pad) + tw] = t
    return grid
